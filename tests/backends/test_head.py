"""The output head in bfloat16, INT8 (weights only, or W8A8) or INT4 (``place(head=...)``): the definitions, and the model's
logits within their rounding."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import quantize_tiny, random_ids, tiny_model

from quadllm.backends import BackendError, HeadKernel, place
from quadllm.backends import vnni
from quadllm.backends.head import HEAD_DECODE_ROWS, HEAD_INT4_GROUP, HEAD_ROTATION_SEED, int4_groups, int8_rows
from quadllm.core.hadamard import random_hadamard
from quadllm.backends.int4 import int4pack_available
from quadllm.core.quantizers import weight_scales
from quadllm.cli import main
from quadllm.nn.modules import QuadHead


def test_int8_rows_are_symmetric_per_row_codes_with_the_gemms_scale():
    g = torch.Generator().manual_seed(0)
    table = torch.randn(40, 24, generator=g) * torch.linspace(0.01, 5, 40)[:, None]
    codes, scale = int8_rows(table)
    assert codes.dtype == torch.int8 and scale.dtype == torch.bfloat16 and int(codes.abs().max()) <= 127
    s = scale.float()[:, None]
    assert torch.equal(codes.float(), (table / s).round().clamp(-127, 127))
    assert ((codes.float() * s - table).abs() <= 0.5 * s * (1 + 1e-6) + (table.abs() - 127 * s).clamp_min(0)).all()


def test_int4_groups_are_symmetric_codes_with_the_least_error_of_six_clips():
    g = torch.Generator().manual_seed(2)
    table = torch.randn(48, 64, generator=g) * torch.linspace(0.01, 5, 48)[:, None]
    table[3, :32] = 0  # an all-zero group
    codes, scales = int4_groups(table)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (48, 64 // HEAD_INT4_GROUP)
    assert int(codes.min()) >= -8 and int(codes.max()) <= 7 and not bool(codes[3, :32].any())
    s = scales.float().repeat_interleave(HEAD_INT4_GROUP, 1)
    assert torch.equal(codes.float(), (table / s).round().clamp(-8, 7))
    # each group's scale: one of the six shrunk absmax scales (before bfloat16), the one of least error
    absmax = table.reshape(48, -1, HEAD_INT4_GROUP).abs().amax(-1) / 7
    ratio = (scales.float() / absmax)[absmax > 0]
    candidates = torch.tensor([1.0, 0.95, 0.9, 0.85, 0.8, 0.75])
    assert ((ratio[:, None] - candidates).abs().amin(1) <= 2 ** -8 * 1.01).all()
    err = ((codes.float() * s - table) ** 2).sum()
    plain = weight_scales(table, 4, HEAD_INT4_GROUP, mse=False).to(torch.bfloat16).float().repeat_interleave(
        HEAD_INT4_GROUP, 1)
    assert err <= (((table / plain).round().clamp(-8, 7) * plain - table) ** 2).sum()


@pytest.mark.parametrize("precision,width", [("bf16", 32), ("int8", 32), ("int8", 56), ("int4", 64), ("int4", 56)])
def test_head_kernel_is_its_definition(precision, width):
    """Widths the INT8 GEMM cannot read (56: not a multiple of 16) and INT4 widths that are not whole
    groups of 32 are padded with zeros."""
    if precision == "int4" and not int4pack_available():
        pytest.skip("torch's CPU INT4 GEMM does not run on this build")
    g = torch.Generator().manual_seed(1)
    table, x = torch.randn(72, width, generator=g), torch.randn(2, 3, width, generator=g)
    bias = torch.randn(72, generator=g)
    got = HeadKernel(table, precision)(x, bias)
    xb = x.to(torch.bfloat16).double()
    if precision == "bf16":
        ref = xb @ table.to(torch.bfloat16).double().t()
    elif precision == "int8":
        codes, scale = int8_rows(table)
        ref = (xb @ codes.double().t()) * scale.double()
    else:
        codes, scales = int4_groups(torch.nn.functional.pad(table, (0, -width % HEAD_INT4_GROUP)))
        w = codes.double() * scales.double().repeat_interleave(HEAD_INT4_GROUP, 1)
        ref = xb @ w[:, :width].t()
    assert got.shape == (2, 3, 72) and got.dtype == torch.float32
    # the GEMM's output is bfloat16: one rounding of each logit (and of the bf16 GEMM's partial sums)
    assert torch.allclose(got.double() - bias.double(), ref, rtol=2 ** -7, atol=1e-2)
    with pytest.raises(ValueError, match="head precision"):
        HeadKernel(table, "int2")


@pytest.mark.parametrize("kernel", ["vnni", "torch"])
@pytest.mark.parametrize("width,tokens", [(48, 3), (56, 3), (56, HEAD_DECODE_ROWS + 5)])
def test_w8a8_head_is_its_definition(kernel, width, tokens, monkeypatch):
    """The rotated table's per-row INT8 codes against the rotated input's per-token INT8 codes: the
    integer sums exact on both kernels (so both give the same logits), scaled in float32; past
    HEAD_DECODE_ROWS rows the VNNI layout's codes go through torch's INT8 GEMM."""
    if kernel == "vnni" and vnni.vnni_unavailable_reason() is not None:
        pytest.skip(f"the VNNI kernel does not run here: {vnni.vnni_unavailable_reason()}")
    if kernel == "torch":
        monkeypatch.setenv(vnni.KERNEL_ENV, "torch")
    g = torch.Generator().manual_seed(3)
    table, x = torch.randn(70, width, generator=g), torch.randn(2, tokens, width, generator=g)
    x[..., 5] *= 30  # an outlier channel, as the final norm's output has
    bias = torch.randn(70, generator=g)
    head = HeadKernel(table, "w8a8")
    assert head.vnni == (kernel == "vnni")
    got = head(x, bias)
    r = random_hadamard(width, HEAD_ROTATION_SEED).float()
    codes, scale = int8_rows(table @ r.t(), torch.float32)
    assert scale.dtype == torch.float32
    xr = x.reshape(-1, width) @ r.t()
    xs = (xr.abs().amax(-1, keepdim=True) / 127).clamp_min(1e-8)
    xq = (xr / xs).round().clamp(-128, 127)
    sums = xq.double() @ codes.double().t()
    ref = (sums * xs.double() * scale.double()).reshape(2, tokens, 70)
    assert got.shape == (2, tokens, 70) and got.dtype == torch.float32
    assert torch.allclose(got.double() - bias.double(), ref, rtol=1e-6, atol=1e-5)
    # against the float head: INT8 on both sides; the rotation keeps the outlier channel from
    # taking every other column's resolution (per-token INT8 of the unrotated input is worse)
    exact = x @ table.t()
    err = ((got - bias - exact).norm() / exact.norm()).item()
    plain = (torch.round(x / (x.abs().amax(-1, keepdim=True) / 127)) * (x.abs().amax(-1, keepdim=True) / 127)) \
        @ (int8_rows(table, torch.float32)[0].float() * int8_rows(table, torch.float32)[1][:, None]).t()
    assert err < 0.5 * ((plain - exact).norm() / exact.norm()).item()


def test_place_gives_the_head_its_precision_and_takes_it_back():
    model = quantize_tiny("llama", weights="rtn", method="quad", rank=8)
    ids = random_ids(2, 12, seed=4)
    with torch.no_grad():
        ref = model(ids).logits
        for precision in ("bf16", "int8", "w8a8", "int4"):
            place(model, "fake", head=precision)
            head = next(m for m in model.modules() if isinstance(m, QuadHead))
            assert head.kernel is not None and head.kernel.precision == precision
            out = model(ids).logits
            # INT4's own rounding (about 9% of each weight, root mean square) is larger
            assert 0 < ((out - ref).norm() / ref.norm()).item() < (6e-2 if precision == "int4" else 2e-2)
        place(model, "fake")
        assert torch.equal(model(ids).logits, ref)
    with pytest.raises(BackendError, match="head precision"):
        place(model, "fake", head="fp8")
    # an nn.Linear head (an original or stock-layout model) becomes the same head in that precision
    original = tiny_model("llama-untied", torch.float32)
    with torch.no_grad():
        ref = original(ids).logits
        place(original, "fake", head="int8")
        assert isinstance(original.lm_head, QuadHead) and original.lm_head.own_weight is not None
        assert 0 < ((original(ids).logits - ref).norm() / ref.norm()).item() < 2e-2


def test_eval_with_an_int8_head_records_it(tiny_original, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 97} and{i % 13}" for i in range(6000)))
    ckpt, out = tmp_path / "q", tmp_path / "e.json"
    assert main(["quantize", "--model", str(tiny_original), "--rank", "8", "--weights", "rtn", "--calib", str(text),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--out", str(ckpt), "-q"]) == 0
    assert main(["eval", str(ckpt), "--head", "bf16", "--backend", "cpu-int8", "--data", str(text), "--max-windows",
                 "1", "--seqlen", "32", "--json", str(out), "-q"]) == 0
    result = json.loads(out.read_text())
    assert result["head"] == "bf16" and result["backend"] == "cpu-int8" and result["ppl"] > 1
    # the stock layout's head reads the expanded stream (48 + 8 wide, padded to 64 for the INT8 GEMM)
    assert main(["eval", str(ckpt), "--head", "int8", "--data", str(text), "--max-windows", "1", "--seqlen", "32",
                 "--json", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["head"] == "int8"
    # the W8A8 head on cpu-int4; a kernel choice it does not know is a one-line error (exit 2)
    assert main(["eval", str(ckpt), "--head", "w8a8", "--backend", "cpu-int4", "--data", str(text), "--max-windows",
                 "1", "--seqlen", "32", "--json", str(out), "-q"]) == 0
    assert json.loads(out.read_text())["head"] == "w8a8"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(vnni.KERNEL_ENV, "fastest")
        assert main(["eval", str(ckpt), "--head", "w8a8", "--backend", "cpu-int4", "--data", str(text),
                     "--max-windows", "1", "--seqlen", "32", "-q"]) == 2
    # an original model has no quadllm head: refused
    assert main(["eval", str(tiny_original), "--head", "int8", "--data", str(text), "--max-windows", "1",
                 "--seqlen", "32", "-q"]) == 2
