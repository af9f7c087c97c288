"""Execution backends: the integer path gives the float simulation's results up to rounding."""

from __future__ import annotations

import pytest
import torch
from conftest import quantize_tiny, random_ids

from quadllm.backends import BackendError, Int8Kernel, place
from quadllm.backends.int8 import act_codes, asym_act_codes, int8_linear, int_mm_available
from quadllm.core.quantizers import fake_quant_act
from quadllm.nn.modules import QuadLinear

pytestmark = pytest.mark.skipif(not int_mm_available(), reason="torch._int_mm does not run on this CPU")


def test_act_codes_are_the_fake_quantizers_codes():
    x = torch.randn(40, 64) * torch.linspace(0.1, 30, 64)
    for bits in (4, 8):
        codes, scale = act_codes(x, bits, 0.9)
        assert codes.dtype == torch.int8
        assert torch.equal(codes.float() * scale, fake_quant_act(x.clone(), bits, 0.9))
        for rows in (1, 7, 40, 1000):  # blocks that split the rows unevenly, or hold them all
            blocked = act_codes(x[:, 3:], bits, 0.9, block_rows=rows)  # a strided view, as the kernel passes
            whole = act_codes(x[:, 3:].contiguous(), bits, 0.9)
            assert torch.equal(blocked[0], whole[0]) and torch.equal(blocked[1], whole[1])
    with pytest.raises(ValueError, match="block_rows"):
        act_codes(x, 4, block_rows=0)


def test_int8_linear_matches_its_reference_definition():
    g = torch.Generator().manual_seed(0)
    qx = torch.randint(-8, 8, (33, 48), generator=g, dtype=torch.int8)
    qw = torch.randint(-8, 8, (20, 48), generator=g, dtype=torch.int8)
    sx, sw = torch.rand(33, 1, generator=g) + 0.1, torch.rand(20, generator=g) + 0.1
    ref = (qx.double() @ qw.double().t()) * sx.double() * sw.double()
    out = int8_linear(qx, sx, qw.t().contiguous(), sw)
    assert torch.allclose(out.double(), ref, rtol=1e-6)
    # a product big enough for several threads' worth of the in-place int32 -> float32 epilogue:
    # exactly the int32 sums converted, then scaled
    qx = torch.randint(-128, 128, (300, 2048), generator=g, dtype=torch.int8)
    qw = torch.randint(-8, 8, (1000, 2048), generator=g, dtype=torch.int8)
    sx, sw = torch.rand(300, 1, generator=g) + 0.1, torch.rand(1000, generator=g) + 0.1
    sums = qx.long() @ qw.long().t()
    out = int8_linear(qx, sx, qw.t().contiguous(), sw)
    assert out.dtype == torch.float32
    assert torch.equal(out, sums.float().mul_(sx).mul_(sw))
    assert torch.equal(int8_linear(qx, sx.double(), qw.t().contiguous(), sw), sums.double().mul_(sx.double()).mul_(sw.double()))


@pytest.mark.parametrize("cfg", [
    dict(method="quad", rank=8, mode="w4a4"),
    dict(method="quad", rank=8, mode="w4a4a8", kv_bits=4),
    dict(method="quarot", mode="w4a8"),
    dict(method="quad", rank=8, mode="w4a16"),
    dict(method="quad", rank=8, mode="w4a4", group_size=16),
    dict(method="quad", rank=8, mode="w4a4", a_clip_search=True),
    dict(method="quad", rank=8, mode="w4a4", a_clip_learn=30),
    dict(method="quad", rank=8, mode="w4a4", learn_transform=20, o_rank=4, down_rank=4),
    dict(method="quad", rank=8, mode="w4a4", down_rank=4),
    dict(method="quad", rank=8, mode="w4a4a8", act_sym=False),
    dict(method="quad", rank=8, mode="w4a4", o_rank=4),
    dict(method="quad", rank=8, mode="w4a4", o_rank=4, o_rank_bits=8),
])
def test_cpu_int8_backend_matches_fake(arch, cfg):
    model = quantize_tiny(arch, weights="rtn", **cfg)
    ids = random_ids(3, 24, seed=11)
    with torch.no_grad():
        ref = model(ids).logits
    counts = place(model, "cpu-int8")
    n = sum(isinstance(m, QuadLinear) for m in model.modules())
    expect_int8 = 0 if cfg["mode"] == "w4a16" or cfg.get("group_size") else n
    assert counts.get("cpu-int8", 0) == expect_int8 and sum(counts.values()) == n
    with torch.no_grad():
        out = model(ids).logits
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-4, err
    if expect_int8:
        assert any(isinstance(m.kernel, Int8Kernel) for m in model.modules() if isinstance(m, QuadLinear))
    place(model, "fake")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)


def test_asymmetric_codes_and_the_zero_point_epilogue_match_their_definition():
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.silu(2 * torch.randn(40, 64, generator=g))
    for bits in (4, 8):
        codes, sx, zx = asym_act_codes(x, bits, 0.9)
        assert codes.dtype == torch.int8 and int(codes.min()) >= -(2 ** (bits - 1)) and int(codes.max()) < 2 ** (bits - 1)
        assert torch.allclose((codes.float() - zx) * sx, fake_quant_act(x, bits, 0.9, sym=False), atol=1e-6)
        qw = torch.randint(-8, 8, (24, 64), generator=g, dtype=torch.int8)
        sw = torch.rand(24, generator=g) + 0.1
        wt = qw.t().contiguous()
        sums = wt.sum(0, dtype=torch.int32).float()
        ref = ((codes.double() - zx.double()) @ qw.double().t()) * sx.double() * sw.double()
        out = int8_linear(codes, sx, wt, sw, zx, sums)
        assert torch.allclose(out.double(), ref, rtol=1e-6, atol=1e-6)


def test_weight_cache_is_optional_and_equal():
    model = quantize_tiny("llama", weights="rtn", rank=8)
    ids = random_ids(2, 20, seed=3)
    place(model, "cpu-int8", cache_weights=True)
    with torch.no_grad():
        a = model(ids).logits
    place(model, "cpu-int8", cache_weights=False)
    with torch.no_grad():
        b = model(ids).logits
    assert torch.equal(a, b)
    assert all(m.kernel._wt is None for m in model.modules() if isinstance(m, QuadLinear))


def test_unknown_backend_is_a_clear_error():
    model = quantize_tiny("llama", weights="rtn", rank=8)
    with pytest.raises(BackendError, match="unknown backend"):
        place(model, "tpu")


def test_the_registry_supplies_the_choices_and_auto_picks_cpu_int8_here():
    from quadllm.backends import BACKENDS, KERNELS, resolve_backend
    from quadllm.cli import build_parser

    assert BACKENDS == ("fake", *KERNELS, "auto") and set(KERNELS) == {"cpu-int8", "cpu-int4", "gpu"}
    eval_parser = build_parser()._subparsers._group_actions[0].choices["eval"]
    backend = next(a for a in eval_parser._actions if a.dest == "backend")
    assert tuple(backend.choices) == BACKENDS
    assert resolve_backend("auto") == ("cpu-int8" if KERNELS["cpu-int8"].unavailable_reason() is None else "fake")
    for name, kernel in KERNELS.items():
        assert kernel.name == name and callable(kernel.supports)


def test_loading_gives_a_fake_model_and_place_sets_the_kernels(tmp_path):
    from conftest import tiny_tokenizer

    from quadllm import load, save

    model = quantize_tiny("llama", weights="rtn", rank=8)
    save(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, _, _ = load(tmp_path / "ckpt")
    lins = [m for m in loaded.modules() if isinstance(m, QuadLinear)]
    assert all(m.kernel is None for m in lins) and next(loaded.parameters()).device.type == "cpu"
    assert place(loaded, "cpu-int8") == {"cpu-int8": len(lins)}
    assert all(isinstance(m.kernel, Int8Kernel) and m.kernel.extra_bytes() == 0 for m in lins)
