"""The ``gpu`` backend's Triton kernels against their reference definitions and the float simulation.

Without a CUDA device the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set
by conftest.py before anything imports Triton), so their arithmetic is checked on every machine that has
Triton installed; the tests that need the real device skip, saying so.
"""

from __future__ import annotations

import pytest
import torch
from conftest import quantize_tiny, random_ids

from quadllm.backends import BackendError, place
from quadllm.backends.gpu import (
    FusedTransform,
    TritonKernel,
    fused_transform_plan,
    gpu_available,
    triton_available,
    why_no_gpu,
)
from quadllm.backends.int8 import act_codes
from quadllm.core.hadamard import OnlineTransform
from quadllm.core.quantizers import pack_int4
from quadllm.nn.modules import QuadLinear

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


@pytest.mark.parametrize("transform,split", [
    (OnlineTransform.hadamard(14336), (28, 512, True, True)),  # Llama-3-8B down_proj: 28 x (32 x 16)
    (OnlineTransform.hadamard(1536), (12, 128, True, True)),  # SmolLM2 down_proj
    (OnlineTransform.hadamard(64), (1, 64, False, True)),  # a power of two: all in B
    (OnlineTransform.mixing(32, 128), (32, 128, True, False)),  # Llama-3-8B o_proj: heads only
    (OnlineTransform.mixing(9, 64), (9, 64, True, False)),  # SmolLM2 o_proj: 9 heads (DCT), padded to 16
    (OnlineTransform.hadamard(96), None),  # 12 x 8: B under 16 and 96 not a power of two
    (OnlineTransform([torch.eye(28)]), None),  # one factor that is not a power of two
    (OnlineTransform.hadamard(2 ** 16), None),  # larger than the register tile
    (torch.nn.Identity(), None),  # not a Kronecker transform
])
def test_fused_transform_plan_splits_the_factors_into_an_exact_tile(transform, split):
    plan = fused_transform_plan(transform)
    if split is None:
        assert plan is None
        return
    assert (plan.a_order, plan.b_order, plan.a is not None, plan.b is not None) == split
    assert plan.padded_a >= max(16, plan.a_order) and plan.padded_a * plan.b_order <= 32768
    assert torch.allclose(plan.dense(), transform.dense().double(), atol=1e-6)  # the same map, regrouped


def _transforms_for_kernel():
    return [OnlineTransform.hadamard(64), OnlineTransform.hadamard(1536), OnlineTransform.hadamard(14336),
            OnlineTransform.mixing(9, 64), OnlineTransform.mixing(3, 16)]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("index", range(5))
def test_transform_quantize_rows_gives_the_codes_of_the_transformed_rows(index, bits):
    transform = _transforms_for_kernel()[index]
    plan = fused_transform_plan(transform)
    g = torch.Generator().manual_seed(index)
    x = torch.randn(6, transform.n, generator=g) * torch.linspace(0.1, 30, transform.n)
    x[2] = 0.0  # the scale floor
    x[4, : transform.n // 3] *= 100  # one row with a block of large values
    codes, scale = kernels().transform_quantize_rows(x.to(DEVICE), FusedTransform(
        plan.a_order, plan.b_order, *(None if t is None else t.to(DEVICE) for t in (plan.a, plan.b))), bits, 0.9)
    ref_codes, ref_scale = act_codes(transform(x), bits, 0.9)
    assert codes.dtype == torch.int8 and codes.shape == x.shape and scale.shape == (6, 1)
    assert torch.allclose(scale.cpu(), ref_scale, rtol=1e-5, atol=0)
    # the transform sums in another order than torch's matmuls: a code may differ by one at a rounding boundary
    diff = (codes.cpu().int() - ref_codes.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3
    with pytest.raises(ValueError, match="do not match"):
        kernels().transform_quantize_rows(x[:, 1:].to(DEVICE), plan, bits)


def test_gpu_backend_fuses_the_online_transforms_into_quantization(monkeypatch):
    """A model whose down_proj (128 = one Hadamard block) and o_proj (3 heads) transforms both fuse:
    fused, unfused and the float simulation give the same logits, and the fused kernel runs."""
    model = quantize_tiny("llama", model_kwargs=dict(intermediate_size=128), method="quad", rank=8, weights="rtn",
                          o_rank=0)  # o_rank reorders o_proj's input, which the fused transform does not do
    model.to(DEVICE)
    ids = random_ids(2, 12, seed=5).to(DEVICE)
    with torch.no_grad():
        ref = model(ids).logits
    fused_layers = [m for m in model.modules() if isinstance(m, QuadLinear) and m.transform is not None]
    assert len(fused_layers) == 4  # o_proj and down_proj of 2 layers
    k = kernels()
    calls = []
    original = k.transform_quantize_rows
    monkeypatch.setattr(k, "transform_quantize_rows", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    outs = {}
    for fuse in (True, False):
        place(model, "gpu")
        for m in model.modules():
            if isinstance(m, QuadLinear):
                m.kernel = TritonKernel(fuse_transform=fuse)
        calls.clear()
        with torch.no_grad():
            outs[fuse] = model(ids).logits
        assert len(calls) == (len(fused_layers) if fuse else 0)
    for out in outs.values():
        assert ((out - ref).norm() / ref.norm()).item() < 1e-4
    assert ((outs[True] - outs[False]).norm() / ref.norm()).item() < 1e-4


def test_w4a8_linear_rejects_mismatched_inputs():
    qx = torch.zeros(4, 10, dtype=torch.int8)
    with pytest.raises(ValueError, match="K must be even"):
        kernels().w4a8_linear(qx, torch.ones(4, 1), torch.zeros(3, 4, dtype=torch.uint8), torch.ones(3))
    with pytest.raises(TypeError, match="int8 codes"):
        kernels().w4a8_linear(qx.float(), torch.ones(4, 1), torch.zeros(3, 5, dtype=torch.uint8), torch.ones(3))


@pytest.mark.parametrize("cfg", [dict(method="quad", rank=8, mode="w4a4"), dict(method="quad", rank=8, mode="w4a4a8"),
                                 dict(method="quarot", mode="w4a8"),
                                 dict(method="quad", rank=8, mode="w4a4", a_clip_search=True),
                                 dict(method="quad", rank=8, mode="w4a4", a_clip_learn=30),
                                 dict(method="quad", rank=8, mode="w4a4", learn_transform=20),
                                 dict(method="quad", rank=8, mode="w4a4", down_rank=4),
                                 dict(method="quad", rank=8, mode="w4a4", o_rank=4)])
def test_gpu_backend_matches_fake(cfg):
    model = quantize_tiny("llama", weights="rtn", **cfg)
    model.to(DEVICE)
    ids = random_ids(2, 12, seed=5).to(DEVICE)
    with torch.no_grad():
        ref = model(ids).logits
    counts = place(model, "gpu")
    n = sum(isinstance(m, QuadLinear) for m in model.modules())
    assert counts == {"gpu": n}
    assert all(isinstance(m.kernel, TritonKernel) for m in model.modules() if isinstance(m, QuadLinear))
    with torch.no_grad():
        out = model(ids).logits
    err = ((out - ref).norm() / ref.norm()).item()
    assert err < 1e-4, err


def test_the_gpu_backend_refuses_asymmetric_activations_before_moving_anything():
    model = quantize_tiny("llama", weights="rtn", rank=8, act_sym=False).to(DEVICE)
    with pytest.raises(BackendError, match="no asymmetric per-token activation kernel"):
        place(model, "gpu")
    assert all(m.kernel is None for m in model.modules() if isinstance(m, QuadLinear))


def test_the_gpu_backend_refuses_int8_outlier_columns_before_moving_anything():
    model = quantize_tiny("llama", weights="rtn", rank=8, o_rank=2, o_rank_bits=8).to(DEVICE)
    with pytest.raises(BackendError, match="--o-rank-bits 8"):
        place(model, "gpu")
    assert all(m.kernel is None for m in model.modules() if isinstance(m, QuadLinear))


def test_gpu_backend_leaves_unsupported_layers_on_fake():
    model = quantize_tiny("llama", weights="rtn", rank=8, mode="w4a16")
    n = sum(isinstance(m, QuadLinear) for m in model.modules())
    assert place(model.to(DEVICE), "gpu") == {"fake": n}


def test_gpu_backend_needs_a_cuda_model_outside_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = quantize_tiny("llama", weights="rtn", rank=8)
    with pytest.raises(BackendError, match="CUDA device"):
        place(model, "gpu")


@needs_gpu
def test_gpu_kernels_in_half_precision_match_fake():
    model = quantize_tiny("llama", weights="rtn", rank=8)
    model.to("cuda", torch.float16)
    ids = random_ids(2, 64, seed=9).cuda()
    with torch.no_grad():
        ref = model(ids).logits.float()
        place(model, "gpu")
        out = model(ids).logits.float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-2
