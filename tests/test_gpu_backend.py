"""The ``gpu`` backend's Triton kernels against their reference definitions and the float simulation.

Without a CUDA device the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
by conftest.py before anything imports Triton), so their arithmetic is checked on every machine that has
Triton installed; the tests that need the real device skip, saying so.
"""

from __future__ import annotations

import pytest
import torch

from conftest import random_ids, tiny_model
from quadllm import QuantConfig, quantize
from quadllm.backends import BackendError, set_backend
from quadllm.backends.gpu import TritonKernel, gpu_available, triton_available, why_no_gpu
from quadllm.backends.int8 import act_codes
from quadllm.modules import QuadLinear
from quadllm.quantizers import pack_int4

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install 'quadllm[gpu]')")

DEVICE = "cuda" if gpu_available() else "cpu"
needs_gpu = pytest.mark.skipif(not gpu_available(), reason=f"needs the real device: {why_no_gpu()}")


def kernels():
    from quadllm.backends import triton_kernels

    return triton_kernels


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_rows_gives_the_cpu_codes_exactly(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 200, generator=g) * torch.linspace(0.1, 30, 200)
    x[3] = 0.0  # an all-zero row: the scale floor, codes 0
    x[5, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 7.0])  # ties: round half to even
    codes, scale = kernels().quantize_rows(x.to(DEVICE), bits, 0.9)
    ref_codes, ref_scale = act_codes(x, bits, 0.9)
    assert codes.dtype == torch.int8 and scale.shape == (37, 1)
    assert torch.equal(scale.cpu(), ref_scale)
    assert torch.equal(codes.cpu(), ref_codes)


@pytest.mark.parametrize("m,k,n,r,bias", [(5, 96, 70, 0, False), (33, 128, 48, 12, True), (16, 64, 64, 64, False)])
def test_w4a8_linear_matches_its_reference_definition(m, k, n, r, bias):
    g = torch.Generator().manual_seed(1)
    qx = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    qw = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    sx, sw = torch.rand(m, 1, generator=g) + 0.1, torch.rand(n, generator=g) + 0.1
    xo, wo = torch.randn(m, r, generator=g) * 50, torch.randn(n, r, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    ref = (qx.double() @ qw.double().t()) * sx.double() * sw.double()
    if r:
        ref += xo.double() @ wo.double().t()
    if bias:
        ref += b.double()
    dev = (lambda t: None if t is None else t.to(DEVICE))
    out = kernels().w4a8_linear(dev(qx), dev(sx), dev(pack_int4(qw)), dev(sw), dev(xo) if r else None,
                                dev(wo) if r else None, dev(b))
    assert out.shape == (m, n) and out.dtype == torch.float32
    assert torch.allclose(out.cpu().double(), ref, rtol=1e-5, atol=1e-3)


def test_w4a8_linear_rejects_mismatched_inputs():
    qx = torch.zeros(4, 10, dtype=torch.int8)
    with pytest.raises(ValueError, match="K must be even"):
        kernels().w4a8_linear(qx, torch.ones(4, 1), torch.zeros(3, 4, dtype=torch.uint8), torch.ones(3))
    with pytest.raises(TypeError, match="int8 codes"):
        kernels().w4a8_linear(qx.float(), torch.ones(4, 1), torch.zeros(3, 5, dtype=torch.uint8), torch.ones(3))


@pytest.mark.parametrize("cfg", [dict(method="quad", rank=8, mode="w4a4"), dict(method="quad", rank=8, mode="w4a4a8"),
                                 dict(method="quarot", mode="w4a8")])
def test_gpu_backend_matches_fake(cfg):
    model = tiny_model("llama", torch.float32)
    quantize(model, QuantConfig(weights="rtn", calib_samples=4, calib_seqlen=16, **cfg), random_ids(4, 16),
             progress=False)
    model.to(DEVICE)
    ids = random_ids(2, 12, seed=5).to(DEVICE)
    with torch.no_grad():
        ref = model(ids).logits
    counts = set_backend(model, "gpu")
    n = sum(isinstance(m, QuadLinear) for m in model.modules())
    assert counts == {"gpu": n}
    assert all(isinstance(m.kernel, TritonKernel) for m in model.modules() if isinstance(m, QuadLinear))
    with torch.no_grad():
        out = model(ids).logits
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-4, err


def test_gpu_backend_leaves_unsupported_layers_on_fake():
    model = tiny_model("llama", torch.float32)
    quantize(model, QuantConfig(weights="rtn", rank=8, mode="w4a16", calib_samples=4, calib_seqlen=16),
             random_ids(4, 16), progress=False)
    n = sum(isinstance(m, QuadLinear) for m in model.modules())
    assert set_backend(model.to(DEVICE), "gpu") == {"fake": n}


def test_gpu_backend_needs_a_cuda_model_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model("llama", torch.float32)
    quantize(model, QuantConfig(weights="rtn", rank=8, calib_samples=4, calib_seqlen=16), random_ids(4, 16),
             progress=False)
    with pytest.raises(BackendError, match="CUDA device"):
        set_backend(model, "gpu")


@needs_gpu
def test_gpu_kernels_in_half_precision_match_fake():
    model = tiny_model("llama", torch.float32)
    quantize(model, QuantConfig(weights="rtn", rank=8, calib_samples=4, calib_seqlen=16), random_ids(4, 16),
             progress=False)
    model.to("cuda", torch.float16)
    ids = random_ids(2, 64, seed=9).cuda()
    with torch.no_grad():
        ref = model(ids).logits.float()
        set_backend(model, "gpu")
        out = model(ids).logits.float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
