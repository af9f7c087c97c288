"""Tests for quadllm.core.quantizers against explicit reference definitions."""

from __future__ import annotations

import math

import pytest
import torch

from quadllm.core.quantizers import (
    asym_params,
    clipped_scales,
    dequantize_weight,
    fake_quant_act,
    fake_quant_asym,
    fake_quant_kv,
    fake_quant_weight,
    pack_int4,
    qrange,
    quantize_weight,
    row_absmax,
    unpack_int4,
    weight_clip_ratios,
    weight_scales,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ref_fq_err(row: torch.Tensor, scale: float, bits: int, norm: float) -> float:
    """sum |Q(w) - w|**norm of one row/group for one scale (float64 reference)."""
    qmin, qmax = qrange(bits)
    q = torch.clamp(torch.round(row.double() / scale), qmin, qmax) * scale
    return float((q - row.double()).abs().pow(norm).sum())


# ---------------------------------------------------------------------------
# qrange
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("bits,expected", [(2, (-2, 1)), (3, (-4, 3)), (4, (-8, 7)), (8, (-128, 127))])
def test_qrange(bits, expected):
    assert qrange(bits) == expected


# ---------------------------------------------------------------------------
# weight_scales
# ---------------------------------------------------------------------------


def test_weight_scales_per_channel_is_rowmax_over_qmax():
    torch.manual_seed(0)
    w = torch.randn(5, 12)
    s = weight_scales(w, bits=4, group_size=0, mse=False)
    assert s.shape == (5, 1)
    expected = torch.tensor([[max(abs(float(v)) for v in row) / 7] for row in w])
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    s8 = weight_scales(w, bits=8, group_size=0, mse=False)
    torch.testing.assert_close(s8, expected * 7 / 127, rtol=1e-6, atol=0)


def test_weight_scales_per_group_hand_computed():
    w = torch.tensor(
        [
            [1.0, -2.0, 3.0, 0.5, -7.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0, 14.0, -21.0, 3.0, 1.0, 1.0, 1.0, 1.0, -1.0],
            [-3.5, 1.0, 1.0, 1.0, 0.7, -0.7, 0.1, 0.0, 0.0, 0.0, 0.0, 0.35],
        ]
    )[:, :8]  # [3, 8]
    s = weight_scales(w, bits=4, group_size=4, mse=False)
    assert s.shape == (3, 2)
    # group maxima: row0 (3, 7), row1 (0, 21), row2 (3.5, 0.7); divided by qmax = 7
    expected = torch.tensor([[3 / 7, 1.0], [1e-12 / 7, 3.0], [0.5, 0.1]])
    torch.testing.assert_close(s, expected, rtol=1e-6, atol=0)
    assert bool((s > 0).all()), "an all-zero group must still get a positive scale"


def test_weight_scales_group_size_must_divide():
    with pytest.raises(ValueError):
        weight_scales(torch.randn(2, 10), group_size=4, mse=False)


def test_weight_scales_half_precision_input():
    torch.manual_seed(1)
    w = torch.randn(4, 16)
    for dt in (torch.float16, torch.bfloat16):
        s = weight_scales(w.to(dt), group_size=8, mse=False)
        ref = weight_scales(w.to(dt).float(), group_size=8, mse=False)
        assert torch.equal(s, ref)


@pytest.mark.parametrize("group_size", [0, 16])
def test_weight_scales_mse_never_larger_and_lower_error(group_size):
    torch.manual_seed(2)
    w = torch.randn(16, 64, dtype=torch.float64) * torch.rand(16, 1, dtype=torch.float64)
    s_max = weight_scales(w, group_size=group_size, mse=False)
    s_mse = weight_scales(w, group_size=group_size, mse=True)
    assert s_mse.shape == s_max.shape
    assert bool((s_mse <= s_max).all())
    assert bool((s_mse < s_max).any()), "the clipping search never clipped anything on Gaussian rows"

    g = group_size or w.shape[1]
    wg = w.reshape(16, -1, g)
    total_mse = total_max = 0.0
    for r in range(wg.shape[0]):
        for j in range(wg.shape[1]):
            e_mse = _ref_fq_err(wg[r, j], float(s_mse[r, j]), 4, 2.4)
            e_max = _ref_fq_err(wg[r, j], float(s_max[r, j]), 4, 2.4)
            assert e_mse <= e_max * (1 + 1e-12)
            # the chosen scale is one of the candidates p * wmax / qmax, p = 1 - i/100, i < 80
            ratio = float(s_mse[r, j] / s_max[r, j])
            i = round((1 - ratio) * 100)
            assert 0 <= i < 80 and abs(ratio - (1 - i / 100)) < 1e-9
            # ... and the best of them (brute-force reference over the grid)
            best = min(
                _ref_fq_err(wg[r, j], (1 - k / 100) * float(s_max[r, j]), 4, 2.4) for k in range(80)
            )
            assert e_mse <= best * (1 + 1e-9)
            total_mse += e_mse
            total_max += e_max
    assert total_mse < total_max


def test_weight_scales_mse_clips_outlier():
    # An outlier ~3x the bulk's range: the max-based scale wastes the grid on it, and the
    # clipping search trades a small error on the outlier for a finer grid on the rest.
    torch.manual_seed(3)
    w = torch.randn(2, 128)
    w[0, 17] = 8.0
    s_max = weight_scales(w, mse=False)
    s_mse = weight_scales(w, mse=True)
    assert float(s_max[0, 0]) == pytest.approx(8.0 / 7, rel=1e-6)
    assert float(s_mse[0, 0]) < float(s_max[0, 0])
    assert _ref_fq_err(w[0], float(s_mse[0, 0]), 4, 2.4) < _ref_fq_err(w[0], float(s_max[0, 0]), 4, 2.4)


def test_weight_scales_mse_keeps_max_scale_when_clipping_cannot_help():
    # A lone huge outlier over values far below half a step: every shrink only adds error
    # on the outlier (the rest rounds to 0 anyway), so the search keeps p = 1.
    torch.manual_seed(3)
    w = torch.randn(1, 64) * 0.1
    w[0, 17] = 10.0
    assert torch.equal(weight_scales(w, mse=True), weight_scales(w, mse=False))


# ---------------------------------------------------------------------------
# quantize_weight / dequantize_weight
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [0, 4])
def test_quantize_weight_matches_reference_loop(group_size):
    torch.manual_seed(4)
    w = torch.randn(3, 8)
    s = weight_scales(w, group_size=group_size, mse=True)  # clipped: some codes saturate
    q = quantize_weight(w, s)
    assert q.dtype == torch.int8 and q.shape == w.shape
    g = group_size or 8
    for i in range(3):
        for j in range(8):
            ref = min(max(round(float(w[i, j]) / float(s[i, j // g])), -8), 7)
            assert int(q[i, j]) == ref


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [0, 8])
def test_quantize_weight_codes_in_range_and_error_bound(bits, group_size):
    torch.manual_seed(5)
    qmin, qmax = qrange(bits)
    w = torch.randn(16, 32) * 3
    # clipped scales: codes must saturate at the range ends
    s_clip = weight_scales(w, bits, group_size, mse=False) * 0.5
    q = quantize_weight(w, s_clip, bits)
    assert q.dtype == torch.int8
    assert int(q.min()) == qmin and int(q.max()) == qmax

    s = weight_scales(w, bits, group_size, mse=False)
    q = quantize_weight(w, s, bits)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    wd = dequantize_weight(q, s)
    assert wd.dtype == torch.float32 and wd.shape == w.shape
    g = group_size or 32
    s_full = s.repeat_interleave(g, dim=1)
    err = (wd - w).abs()
    assert bool((err <= s_full / 2 * (1 + 1e-5)).all())
    # with clipped scales, the error bound holds wherever the value is not clipped
    s_full_c = s_clip.repeat_interleave(g, dim=1)
    wdc = dequantize_weight(quantize_weight(w, s_clip, bits), s_clip)
    unclipped = (w / s_full_c >= qmin - 0.5) & (w / s_full_c <= qmax + 0.5)
    assert bool(unclipped.any()) and bool((~unclipped).any())
    assert bool(((wdc - w).abs()[unclipped] <= s_full_c[unclipped] / 2 * (1 + 1e-5)).all())


@pytest.mark.parametrize("group_size", [0, 4])
def test_quantize_dequantize_exact_on_grid(group_size):
    torch.manual_seed(6)
    codes = torch.randint(-8, 8, (6, 16), dtype=torch.int8)
    G = 16 // (group_size or 16)
    scales = torch.rand(6, G) * 0.1 + 0.01
    w = dequantize_weight(codes, scales)
    g = group_size or 16
    expected = codes.float() * scales.repeat_interleave(g, dim=1)
    assert torch.equal(w, expected)
    assert torch.equal(quantize_weight(w, scales), codes)
    assert torch.equal(dequantize_weight(quantize_weight(w, scales), scales), w)
    assert dequantize_weight(codes, scales, torch.float64).dtype == torch.float64


# ---------------------------------------------------------------------------
# fake_quant_act
# ---------------------------------------------------------------------------


def _ref_fake_quant_act(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    """Per-row symmetric quantize-dequantize with explicit Python loops (float64 input)."""
    qmin, qmax = qrange(bits)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        vals = [float(v) for v in rows[r]]
        m = max(abs(v) for v in vals)
        scale = max(m * clip / qmax, 1e-8)
        for c, v in enumerate(vals):
            q = min(max(round(v / scale), qmin), qmax)  # round half to even, like torch
            out[r, c] = q * scale
    return out.reshape(x.shape)


def test_row_absmax_is_max_of_abs_including_negative_extremes_and_strided_views():
    x = torch.randn(5, 7, 33, generator=_gen(3)) * 4
    x[0, 0, 5] = -100.0  # the extreme of this row is negative
    x[1, 1] = 0.0
    assert torch.equal(row_absmax(x), x.abs().amax(dim=-1, keepdim=True))
    view = x[..., 3:]
    assert torch.equal(row_absmax(view), view.abs().amax(dim=-1, keepdim=True))
    assert row_absmax(x)[0, 0, 0] == 100.0


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.9, 0.5])
def test_fake_quant_act_matches_reference(bits, clip):
    torch.manual_seed(7)
    x = torch.randn(2, 3, 8, dtype=torch.float64) * torch.rand(2, 3, 1, dtype=torch.float64) * 5
    x[1, 2] = 0.0  # an all-zero token
    y = fake_quant_act(x, bits, clip)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, _ref_fake_quant_act(x, bits, clip))
    assert bool((y[1, 2] == 0).all())


def test_fake_quant_act_float32_close_to_reference():
    torch.manual_seed(8)
    x = torch.randn(10, 16)
    y = fake_quant_act(x, 4, 0.9)
    ref = _ref_fake_quant_act(x.double(), 4, 0.9).float()
    scale = x.abs().amax(-1, keepdim=True) * 0.9 / 7
    # at most a rare rounding-boundary flip (one step) - normally identical up to ulps
    diff = (y - ref).abs()
    assert bool((diff <= scale * 1e-5).float().mean() > 0.99)


def test_fake_quant_act_grid_saturation_and_rows_independent():
    torch.manual_seed(9)
    bits, clip = 4, 0.6
    qmin, qmax = qrange(bits)
    x = torch.randn(6, 32, dtype=torch.float64) * torch.tensor([[0.01], [1.0], [100.0], [3.0], [0.5], [7.0]])
    y = fake_quant_act(x, bits, clip)
    scale = clip * x.abs().amax(-1, keepdim=True) / qmax
    k = y / scale
    assert torch.allclose(k, k.round(), atol=1e-9), "outputs must lie on the grid k*scale"
    assert bool((k.round() >= qmin).all() and (k.round() <= qmax).all())
    hi = x / scale > qmax + 0.5
    lo = x / scale < qmin - 0.5
    assert bool(hi.any()) and bool(lo.any())
    assert torch.allclose(y[hi], (qmax * scale).expand_as(y)[hi])
    assert torch.allclose(y[lo], (qmin * scale).expand_as(y)[lo])
    # each row on its own gives the same result; changing one row leaves the others alone
    for r in range(x.shape[0]):
        assert torch.equal(fake_quant_act(x[r : r + 1], bits, clip), y[r : r + 1])
    x2 = x.clone()
    x2[2] *= 1000
    y2 = fake_quant_act(x2, bits, clip)
    keep = [0, 1, 3, 4, 5]
    assert torch.equal(y2[keep], y[keep])


def test_fake_quant_act_bits16_passthrough():
    x = torch.randn(3, 5)
    assert torch.equal(fake_quant_act(x, 16), x)
    assert torch.equal(fake_quant_act(x, 16, clip_ratio=0.5), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quant_act_preserves_row_absmax(dtype):
    torch.manual_seed(10)
    x = torch.randn(200, 24, dtype=dtype) * torch.rand(200, 1, dtype=dtype) * 10
    y = fake_quant_act(x, 4, 1.0)
    m = x.abs().amax(-1)
    idx = x.abs().argmax(-1)
    ym = y.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    # the max maps to exactly +-qmax * scale = +-max (up to the rounding of 7 * (max / 7))
    eps = torch.finfo(dtype).eps
    assert torch.allclose(ym, x.gather(-1, idx.unsqueeze(-1)).squeeze(-1), rtol=2 * eps, atol=0)
    assert torch.allclose(y.abs().amax(-1), m, rtol=2 * eps, atol=0)


# ---------------------------------------------------------------------------
# fake_quant_kv
# ---------------------------------------------------------------------------


def _ref_fake_quant_kv(x: torch.Tensor, bits: int, clip: float) -> torch.Tensor:
    levels = 2**bits - 1
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(rows)
    for r in range(rows.shape[0]):
        vals = [float(v) for v in rows[r]]
        mx, mn = max(vals) * clip, min(vals) * clip
        scale = max((mx - mn) / levels, 1e-8)
        zero = round(-mn / scale)
        for c, v in enumerate(vals):
            q = min(max(round(v / scale) + zero, 0), levels)
            out[r, c] = (q - zero) * scale
    return out.reshape(x.shape)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.875])
def test_asymmetric_activations_match_the_reference_and_beat_symmetric_on_skewed_rows(bits, clip):
    g = _gen(5)
    x = torch.nn.functional.silu(3 * torch.randn(6, 32, generator=g, dtype=torch.float64))  # skewed, as after SiLU
    y = fake_quant_act(x, bits, clip, sym=False)
    assert torch.allclose(y, _ref_fake_quant_kv(x, bits, clip), rtol=0, atol=1e-12)  # one asymmetric definition
    assert torch.equal(fake_quant_asym(x, bits, clip), y) and torch.equal(fake_quant_kv(x, bits, clip), y)
    scale, zero = asym_params(x, bits, clip)
    assert torch.equal(zero, torch.round(zero)) and scale.shape == zero.shape == (6, 1)
    if clip == 1.0:
        assert (y - x).pow(2).sum() < (fake_quant_act(x, bits, 1.0) - x).pow(2).sum()
    assert torch.equal(fake_quant_act(x, 16, clip, sym=False), x)


def test_asymmetric_activations_pass_a_straight_through_gradient():
    x = torch.linspace(-1, 3, 16, dtype=torch.float64).reshape(2, 8).requires_grad_(True)
    y = fake_quant_act(x, 4, 1.0, sym=False)
    assert torch.allclose(y.detach(), fake_quant_act(x.detach(), 4, 1.0, sym=False))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def _kv_scale(x: torch.Tensor, bits: int) -> torch.Tensor:
    return ((x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / (2**bits - 1)).clamp_min(1e-8)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("clip", [1.0, 0.95])
def test_fake_quant_kv_matches_reference(bits, clip):
    torch.manual_seed(11)
    x = torch.randn(2, 2, 3, 8, dtype=torch.float64) + torch.randn(2, 2, 3, 1, dtype=torch.float64)
    y = fake_quant_kv(x, bits, clip)
    assert y.shape == x.shape
    assert torch.allclose(y, _ref_fake_quant_kv(x, bits, clip), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quant_kv_error_bound_and_levels(bits):
    torch.manual_seed(12)
    x = torch.randn(64, 16) * torch.rand(64, 1) * 4 + torch.randn(64, 1)
    y = fake_quant_kv(x, bits)
    s = _kv_scale(x, bits)
    assert bool(((y - x).abs() <= s / 2 * (1 + 1e-4) + 1e-7).all())
    k = (y / s).round()
    assert torch.allclose(y, k * s, rtol=1e-5, atol=1e-6)
    assert bool(((k.amax(-1) - k.amin(-1)) <= 2**bits - 1).all())


def test_fake_quant_kv_idempotent_random():
    torch.manual_seed(13)
    x = torch.randn(4, 8, 32, 16) * 2 + 0.5
    y = fake_quant_kv(x, 4)
    y2 = fake_quant_kv(y, 4)
    assert torch.allclose(y2, y, rtol=1e-6, atol=1e-6 * float(y.abs().max()))


def test_fake_quant_kv_min_max_within_half_step():
    torch.manual_seed(14)
    x = torch.randn(128, 16) * 3
    y = fake_quant_kv(x, 4)
    s = _kv_scale(x, 4).squeeze(-1)
    assert bool(((y.amin(-1) - x.amin(-1)).abs() <= s / 2 * (1 + 1e-4)).all())
    assert bool(((y.amax(-1) - x.amax(-1)).abs() <= s / 2 * (1 + 1e-4)).all())


def test_fake_quant_kv_min_max_exact_when_zero_point_exact():
    # rows whose minimum is 0 have an exact integer zero point: min and max both survive
    torch.manual_seed(15)
    x = torch.rand(32, 16)
    x = x - x.amin(-1, keepdim=True)
    y = fake_quant_kv(x, 4)
    assert torch.equal(y.amin(-1), x.amin(-1))
    assert torch.allclose(y.amax(-1), x.amax(-1), rtol=1e-6, atol=0)


def test_fake_quant_kv_constant_and_passthrough():
    x = torch.full((2, 8), 1.5)
    x[1] = 0.0
    y = fake_quant_kv(x, 4)
    assert torch.isfinite(y).all()
    assert torch.allclose(y, x, rtol=1e-6, atol=1e-7)
    z = torch.randn(3, 4)
    assert torch.equal(fake_quant_kv(z, 16), z)


# ---------------------------------------------------------------------------
# pack_int4 / unpack_int4
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [1, 2, 7, 16, 33])
def test_pack_unpack_round_trip(cols):
    torch.manual_seed(17)
    q = torch.randint(-8, 8, (5, cols), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8
    assert p.shape == (5, math.ceil(cols / 2))
    u = unpack_int4(p, cols)
    assert u.dtype == torch.int8 and u.shape == q.shape
    assert torch.equal(u, q)


def test_pack_known_layout():
    assert pack_int4(torch.tensor([[1, -1]], dtype=torch.int8)).tolist() == [[0xF1]]
    assert pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8)).tolist() == [[0x78]]
    assert pack_int4(torch.tensor([[1, -1, 3]], dtype=torch.int8)).tolist() == [[0xF1, 0x03]]
    # exhaustive: every (low, high) pair against the two's-complement nibble formula
    a, b = torch.meshgrid(torch.arange(-8, 8), torch.arange(-8, 8), indexing="ij")
    q = torch.stack([a.flatten(), b.flatten()], 1).to(torch.int8)  # [256, 2]
    p = pack_int4(q)
    expected = [[(int(lo) & 0xF) | ((int(hi) & 0xF) << 4)] for lo, hi in q.tolist()]
    assert p.tolist() == expected
    assert torch.equal(unpack_int4(p, 2), q)


def test_pack_unpack_errors():
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 2, dtype=torch.int32))
    with pytest.raises(TypeError):
        pack_int4(torch.zeros(2, 2))
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[0, -9]], dtype=torch.int8))
    with pytest.raises(TypeError):
        unpack_int4(torch.zeros(2, 2, dtype=torch.int8), 4)


def _sequential_weight_scales(w, bits=4, group_size=0, grid=100, max_shrink=0.8, norm=2.4):
    """GPTQ's clipping search as first written: one pass over the shrink factors on the whole
    weight, in its own precision, keeping a factor when it strictly lowers the error."""
    _, qmax = qrange(bits)
    wg = w.reshape(w.shape[0], -1, group_size or w.shape[1])
    wmax = wg.abs().amax(dim=-1).clamp_min(1e-12)
    best, best_err = wmax / qmax, torch.full_like(wmax, float("inf"))
    for i in range(int(max_shrink * grid)):
        s = (1.0 - i / grid) * wmax / qmax
        err = ((torch.clamp(torch.round(wg / s.unsqueeze(-1)), -qmax - 1, qmax) * s.unsqueeze(-1)) - wg)
        err = err.abs().pow(norm).sum(-1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("group_size", [0, 32])
def test_weight_scales_blocked_search_equals_the_sequential_one(monkeypatch, dtype, group_size):
    """Blocks of rows, float32 screening of float64 weights and the float64 re-search of close
    rows give exactly the scales of the one-pass search (several blocks, some exact ties)."""
    import quadllm.core.quantizers as qz

    monkeypatch.setattr(qz, "_SEARCH_BLOCK", 1000)  # about 8 rows of 128 per block
    torch.manual_seed(5)
    w = (torch.randn(70, 128, dtype=torch.float64) * torch.rand(70, 1, dtype=torch.float64)).to(dtype)
    w[3] = torch.linspace(-1, 1, 128, dtype=dtype)  # evenly spread rows make near-ties
    w[4] = 0.0  # every candidate has zero error: the first one wins
    w[5, :] = 0.25
    for bits in (4, 8):
        got = weight_scales(w, bits=bits, group_size=group_size, mse=True)
        ref = _sequential_weight_scales(w, bits=bits, group_size=group_size)
        assert got.dtype == ref.dtype == dtype
        assert torch.equal(got, ref), (got != ref).nonzero()[:5]


def test_weight_scales_screening_researches_close_rows(monkeypatch):
    """With an impossible margin every row is searched again in float64 and the result is the
    same; with none, float32 alone decides (and can differ only on rows within rounding)."""
    import quadllm.core.quantizers as qz

    torch.manual_seed(6)
    w = torch.randn(64, 256, dtype=torch.float64) * 0.02
    ref = _sequential_weight_scales(w)
    monkeypatch.setattr(qz, "_SCREEN_RTOL", 1.0)
    assert torch.equal(weight_scales(w), ref)
    calls = []
    real = qz._clip_errors
    monkeypatch.setattr(qz, "_clip_errors", lambda wg, *a: calls.append(wg.dtype) or real(wg, *a))
    monkeypatch.setattr(qz, "_SCREEN_RTOL", 1e-4)
    weight_scales(w)
    assert calls[0] == torch.float32


@pytest.mark.parametrize("group_size", [0, 4])
def test_weight_clip_ratios_and_clipped_scales_reproduce_the_searched_scales(group_size):
    g = torch.Generator().manual_seed(4)
    w = torch.randn(6, 16, generator=g, dtype=torch.float64) ** 3  # heavy tails: the search clips
    ratio = weight_clip_ratios(w, 4, group_size)
    assert ratio.shape == weight_scales(w, 4, group_size).shape and bool((ratio < 1).any())
    assert bool((ratio <= 1).all()) and bool((ratio >= 0.2).all())
    torch.testing.assert_close(clipped_scales(w, ratio, 4, group_size), weight_scales(w, 4, group_size),
                               rtol=1e-12, atol=0)
    assert torch.equal(weight_clip_ratios(w, 4, group_size, mse=False), torch.ones_like(ratio))


@pytest.mark.parametrize("group_size", [0, 4])
def test_fake_quant_weight_with_a_clip_ratio_saturates_and_gives_the_ratio_lsqs_gradient(group_size):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(5, 16, generator=g, dtype=torch.float64)
    qmin, qmax = qrange(4)
    wg = w.reshape(5, -1, group_size or 16)
    ratio = 0.5 + 0.5 * torch.rand(wg.shape[:2], generator=g, dtype=torch.float64)
    s = ratio.unsqueeze(-1) * wg.abs().amax(-1, keepdim=True) / qmax
    q = torch.clamp(torch.round(wg / s), qmin, qmax)
    torch.testing.assert_close(fake_quant_weight(w, 4, group_size, ratio), (q * s).reshape(5, 16), rtol=0, atol=1e-12)
    r = ratio.clone().requires_grad_()
    v = torch.randn(5, 16, generator=g, dtype=torch.float64)
    (v * fake_quant_weight(w, 4, group_size, r)).sum().backward()
    # d/d ratio of sum(v * clamp(round(w/s)) * s), s = ratio * absmax / qmax, rounding straight through:
    # inside the range q - w/s per weight, saturated ones q; times absmax / qmax
    inside = (torch.round(wg / s) >= qmin) & (torch.round(wg / s) <= qmax)
    dq = torch.where(inside, q - wg / s, q)
    expected = (v.reshape(wg.shape) * dq).sum(-1) * wg.abs().amax(-1) / qmax
    torch.testing.assert_close(r.grad, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("group_size", [0, 4])
def test_fake_quant_weight_is_absmax_round_to_nearest_with_a_straight_through_gradient(group_size):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 16, generator=g, dtype=torch.float64)
    _, qmax = qrange(4)
    wg = w.reshape(5, -1, group_size or 16)
    s = wg.abs().amax(-1, keepdim=True) / qmax
    ref = (torch.round(wg / s) * s).reshape(5, 16)
    torch.testing.assert_close(fake_quant_weight(w, 4, group_size), ref, rtol=0, atol=1e-12)
    # the gradient of sum(v * Q(w)): v through the rounding, plus each group's scale term
    wr = w.clone().requires_grad_()
    v = torch.randn(5, 16, generator=g, dtype=torch.float64)
    (v * fake_quant_weight(wr, 4, group_size)).sum().backward()
    q = torch.round(wg / s)
    vg = v.reshape(wg.shape)
    through_scale = ((vg * (q - wg / s)).sum(-1, keepdim=True) / qmax)  # d/d absmax of sum(v * q * s)
    onehot = (wg.abs() == wg.abs().amax(-1, keepdim=True)).to(torch.float64) * torch.sign(wg)
    expected = (vg + through_scale * onehot).reshape(5, 16)
    torch.testing.assert_close(wr.grad, expected, rtol=1e-9, atol=1e-9)
