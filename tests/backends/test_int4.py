"""The ``cpu-int4`` backend: torch's CPU INT4 GEMM fed with the activation codes gives the integer
sums of ``cpu-int8`` rounded once to bfloat16, the VNNI kernel gives them exactly (so every output is
``cpu-int8``'s), and the model the float simulation's outputs within that rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import quantize_tiny, random_ids

from quadllm.backends import Int4Kernel, Int8Kernel, place
from quadllm.backends import int4 as int4_module
from quadllm.backends.int4 import (Int4Layout, VnniLayout, int4_code_mm, int4_mm, int4pack_available, int4pack_group,
                                   pack_for_int4_mm)
from quadllm.backends.int8 import act_codes, asym_act_codes
from quadllm.nn.modules import QuadLinear

pytestmark = pytest.mark.skipif(not int4pack_available(), reason="torch's CPU INT4 GEMM does not run here")



@pytest.fixture(params=["vnni", "torch"])
def kernel(request, monkeypatch):
    """cpu-int4 on each INT4 kernel: the VNNI one (skipped where it does not run) and torch's op."""
    if request.param == "torch":
        monkeypatch.setattr(int4_module, "vnni_unavailable_reason", lambda: "the test asks for torch's op")
    elif int4_module.vnni_unavailable_reason() is not None:
        pytest.skip(f"the VNNI kernel does not run here: {int4_module.vnni_unavailable_reason()}")
    return request.param


#: widths the op takes (inputs multiples of 32, outputs of 16): hidden 64 + rank 16
DIMS = dict(hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=128)


@pytest.mark.parametrize("n,k,act_bits", [(32, 96, 4), (48, 64, 8), (16, 256, 4), (144, 576, 8),
                                          (40, 504, 4), (12, 48, 8), (648, 1536, 4)])
def test_code_mm_is_the_integer_sum_rounded_once_to_bfloat16(n, k, act_bits):
    """Widths the op does not take (K not a multiple of 32, N not of 16) are padded with zero codes."""
    g = torch.Generator().manual_seed(n + k)
    half = 2 ** (act_bits - 1)
    qw = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    qx = torch.randint(-half, half, (5, k), generator=g, dtype=torch.int8)
    layout = pack_for_int4_mm(qw)
    assert layout.pad_k == -k % 32 and (k + layout.pad_k) % layout.group == 0
    assert layout.scale_zero.shape[1] == n + -n % 16
    exact = qx.long() @ qw.long().t()  # well inside float32's exact integers
    got = int4_code_mm(qx, layout, n)
    assert got.dtype == torch.bfloat16 and torch.equal(got, exact.float().to(torch.bfloat16))


@pytest.mark.parametrize("n,k,group", [(40, 64, 32), (32, 128, 64), (16, 96, 32)])
def test_group_scales_give_the_dequantized_product(n, k, group):
    """With a scale per row and group the op computes ``a @ (codes * scales)ᵀ`` (the scales in
    bfloat16), accumulated in float32 and rounded once to bfloat16."""
    g = torch.Generator().manual_seed(n + k + group)
    qw = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scales = (torch.rand(n, k // group, generator=g) + 0.1).to(torch.bfloat16)
    a = torch.randn(3, k, generator=g).to(torch.bfloat16)
    layout = pack_for_int4_mm(qw, scales)
    assert layout.group == group and layout.pad_k == 0
    ref = a.double() @ (qw.double() * scales.double().repeat_interleave(group, 1)).t()
    got = int4_mm(a, layout, n)
    assert got.shape == (3, n) and got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item())
    with pytest.raises(ValueError, match="groups of a multiple of 32"):
        pack_for_int4_mm(qw, scales[:, :1].repeat(1, k // 16))


def test_groups_and_codes_the_op_cannot_take():
    assert int4pack_group(48) is None and int4pack_group(96) == 32 and int4pack_group(512) == 256
    with pytest.raises(ValueError, match="-8..7"):
        pack_for_int4_mm(torch.full((16, 64), 9, dtype=torch.int8))


@pytest.mark.parametrize("cfg", [
    dict(method="quad", rank=16, mode="w4a4"),
    dict(method="quad", rank=16, mode="w4a4a8"),
    dict(method="quad", rank=16, mode="w4a4", act_sym=False),
    dict(method="quarot", mode="w4a8"),
    dict(method="quad", rank=16, mode="w4a4", o_rank=4),
])
def test_each_linear_is_the_int8_paths_sum_rounded_once(cfg, kernel):
    """Per linear, on the decode path: the same codes as cpu-int8 (and so fake), the integer sum
    (rounded to bfloat16 by torch's op), then the same float epilogue: within 2^-8 of each
    |sum| x scales, and equal with the VNNI kernel's exact sums."""
    model = quantize_tiny("llama", weights="rtn", model_kwargs=DIMS, **cfg)
    lins = [m for m in model.modules() if isinstance(m, QuadLinear)]
    # o-rank 4 x 4 heads leaves o_proj 48 quantized columns, a width the op takes padded
    assert all(Int4Kernel.supports(m) and Int4Kernel.packs(m) for m in lins)
    layouts = [Int4Kernel().packed(m) for m in lins]
    assert all(isinstance(lay, VnniLayout if kernel == "vnni" else Int4Layout) for lay in layouts)
    if kernel == "torch":
        assert any(lay.pad_k for lay in layouts) == bool(cfg.get("o_rank"))
    g = torch.Generator().manual_seed(5)
    for lin in lins:
        x = torch.randn(3, lin.in_features, generator=g) * 3
        int4, int8 = Int4Kernel(), Int8Kernel()
        y4, y8 = int4(lin, x), int8(lin, x)
        if kernel == "vnni":
            if int4.outlier16(lin) is None:
                assert torch.equal(y4, y8)
            else:  # the outlier columns' float32 sums in another order (the next test)
                assert torch.allclose(y4, y8, rtol=1e-5, atol=1e-5 * y8.abs().max().item())
            continue
        xq = x[:, lin.rank:]
        if lin.act.sym:
            codes, sx = act_codes(xq, lin.act.bits, lin.act.clip_ratio)
            sums = codes.double() @ lin.codes().double().t()
        else:
            codes, sx, zx = asym_act_codes(xq, lin.act.bits, lin.act.clip_ratio)
            sums = codes.double() @ lin.codes().double().t()
        bound = 2.0 ** -8 * sums.abs() * sx.double() * lin.scales.reshape(-1).double()
        assert ((y4.double() - y8.double()).abs() <= bound + 1e-5 * y8.abs().double().max()).all()


@pytest.mark.parametrize("cfg", [dict(mode="w4a4"), dict(mode="w4a4", act_sym=False), dict(mode="w4a4", o_rank=4)])
def test_float16_outlier_weights_are_read_in_float16(cfg, kernel):
    """Outlier weights that float16 holds (as a loaded checkpoint's, stored in float16): with the VNNI kernels a float16 copy, the same products summed in another order (within
    float32 rounding of cpu-int8's), and a decode step reads 2 bytes per outlier weight; torch's op
    keeps the float32 addmm, and so does a weight float16 does not hold."""
    model = quantize_tiny("llama", weights="rtn", model_kwargs=DIMS, method="quad", rank=16, **cfg)
    g = torch.Generator().manual_seed(6)
    lins = [m for m in model.modules() if isinstance(m, QuadLinear) and m.rank]
    assert len(lins) >= 5 * 2  # q, k, v, gate, up per layer (and o_proj with o-rank)
    for lin in lins:
        with torch.no_grad():
            lin.w_outlier.copy_(lin.w_outlier.half().float())
        int4, int8 = Int4Kernel(), Int8Kernel()
        x = torch.randn(3, lin.in_features, generator=g) * 3
        y4, y8 = int4(lin, x), int8(lin, x)
        held = int4.outlier16(lin)
        if kernel == "torch":
            assert held is None and torch.allclose(y4, y8, rtol=2 ** -7, atol=1e-3 * y8.abs().max().item())
            continue
        assert held is not None and held.dtype == torch.float16
        scale = (x[:, :lin.rank].abs() @ lin.w_outlier.abs().t()).max().item()
        assert (y4 - y8).abs().max().item() <= 1e-5 * scale + 1e-6
        held_bytes = sum(t.numel() * t.element_size() for t in (lin.qweight, lin.scales, lin.w_outlier)) \
            - lin.qweight.numel() - lin.w_outlier.numel() * (lin.w_outlier.element_size() - 2)
        assert int4.own_decode_bytes(lin) == held_bytes + int4_module.layout_bytes(int4.packed(lin))
        # a changed weight that float16 does not hold (fine-tuning in float32) is found again, not read in float16
        with torch.no_grad():
            lin.w_outlier.add_(1e-6 * torch.randn(lin.w_outlier.shape, generator=g))
        assert int4.outlier16(lin) is None
        assert torch.equal(int4(lin, x), int8(lin, x))


def test_model_outputs_match_fake_within_the_rounding_and_prefill_is_cpu_int8s(kernel):
    model = quantize_tiny("llama", weights="rtn", model_kwargs=DIMS, method="quad", rank=16, mode="w4a4")
    step = random_ids(1, 1, seed=2)  # one token: the decode path
    long = random_ids(1, Int4Kernel.decode_rows + 5, seed=3)  # past decode_rows: cpu-int8's path
    with torch.no_grad():
        ref_step = model(step).logits
        n = sum(isinstance(m, QuadLinear) for m in model.modules())
        assert place(model, "cpu-int4") == {"cpu-int4": n}
        step4, long4 = model(step).logits, model(long).logits
        place(model, "cpu-int8")
        long8 = model(long).logits
    assert ((step4 - ref_step).norm() / ref_step.norm()).item() < 5e-3
    assert torch.equal(long4, long8)
    kernels = [m.kernel for m in model.modules() if isinstance(m, QuadLinear)]
    assert all(not isinstance(k, Int4Kernel) for k in kernels)  # cpu-int8 replaced them
