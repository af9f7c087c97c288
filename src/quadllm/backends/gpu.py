"""The ``gpu`` backend: one :class:`QuadLinear` forward on the Triton kernels of
:mod:`quadllm.backends.triton_kernels` (fused per-token quantization, then one W4A8/W4A4 GEMM
with the outlier branch and the scale epilogue fused).

The online transforms (the Hadamard before down_proj, the head mixing before o_proj) are fused
into the quantization kernel where their shape allows (:func:`fused_transform_plan`): the row is
read once, transformed in registers, and only its int8 codes are written. Elsewhere the
transform runs as torch matmuls first, as in the float simulation.

Triton is optional (``pip install 'quadllm[gpu]'``): :func:`triton_available` says whether it
imports, :func:`gpu_available` whether a CUDA device can run it. With ``TRITON_INTERPRET=1`` the
same kernels run on the CPU through Triton's interpreter (for tests; far too slow for use).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from ..core.hadamard import OnlineTransform
from ..nn.modules import QuadLinear
from .base import Kernel

__all__ = ["FusedTransform", "TritonKernel", "fused_transform_plan", "gpu_available", "gpu_refuses", "interpreting",
           "supports_gpu", "triton_available", "why_no_gpu"]

# the transformed row is held in registers as an [A, B] tile (A padded to a power of two >= 16)
MAX_TILE = 32768


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return hasattr(triton, "jit")


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_available() -> bool:
    """Whether the ``gpu`` backend can run real kernels here (Triton and a CUDA device)."""
    return triton_available() and torch.cuda.is_available()


def why_no_gpu() -> str | None:
    """None when :func:`gpu_available`, else the reason in words."""
    if not triton_available():
        return "Triton is not installed (pip install 'quadllm[gpu]')"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def supports_gpu(lin: QuadLinear) -> bool:
    """Whether ``lin`` can run on the Triton W4A8 kernel: packed INT4 per-channel weights, integer
    activations of at most 8 bits, an even number of quantized input columns."""
    return (lin.quantized and lin.act.enabled and lin.act.bits <= 8 and lin.w_bits == 4
            and lin.group_size == 0 and (lin.in_features - lin.rank) % 2 == 0)


def gpu_refuses(lin: QuadLinear) -> str | None:
    """The layers the gpu backend refuses: INT8 outlier columns and asymmetric activations (its
    kernels run the outlier columns in full precision and quantize symmetrically, and leaving those
    layers on the simulation would hide a slow path)."""
    if lin.rank and lin.act.outlier_bits < 16:
        return ("the gpu backend runs the outlier columns in full precision, not at INT8 (a checkpoint made "
                "with --o-rank-bits 8); run it with --backend cpu-int8 or fake")
    if lin.act.enabled and not lin.act.sym:
        return ("the gpu backend has no asymmetric per-token activation kernel (a checkpoint made with "
                "--act-asym); run it with --backend cpu-int8 or fake")
    return None


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _kron(factors: list[torch.Tensor | int]) -> torch.Tensor | None:
    """kron of the factors in float64 (ints are identities); None when all are identities."""
    if all(isinstance(f, int) for f in factors):
        return None
    out = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        m = torch.eye(f, dtype=torch.float64) if isinstance(f, int) else f.detach().cpu().to(torch.float64)
        out = torch.kron(out, m)
    return out


@dataclass(frozen=True)
class FusedTransform:
    """An online transform ``kron(A, B)`` of order ``a_order * b_order`` as the fused quantize
    kernel applies it: the row viewed as an [a_order, b_order] tile ``X`` becomes ``A X Bᵀ``.
    ``a`` / ``b`` are float32 matrices, or None for identities (no work)."""
    a_order: int
    b_order: int
    a: torch.Tensor | None
    b: torch.Tensor | None

    @property
    def padded_a(self) -> int:
        return max(16, 1 << (self.a_order - 1).bit_length())

    def dense(self) -> torch.Tensor:
        """The n x n matrix (for tests)."""
        a = torch.eye(self.a_order, dtype=torch.float64) if self.a is None else self.a.double()
        b = torch.eye(self.b_order, dtype=torch.float64) if self.b is None else self.b.double()
        return torch.kron(a, b)


def fused_transform_plan(transform: object) -> FusedTransform | None:
    """How the quantize kernel can apply ``transform`` itself, or None when it cannot.

    ``transform`` must be an :class:`OnlineTransform` ``kron(M_1, ..., M_k)``. Its factors are split
    in two groups, ``A = kron(M_1..M_i)`` and ``B = kron(M_i+1..M_k)``, so that ``B``'s order is a
    power of two of at least 16 (or B is an identity of power-of-two order, which costs nothing),
    ``A`` padded to a power of two of at least 16 times ``B``'s order fits :data:`MAX_TILE`, and
    ``B`` is at most 1024 (it is read by the kernel in [16, B] slices). Among the valid splits the
    smallest tile wins. Llama-3-8B's down_proj (14336 = 28 x 32 x 16) becomes A = 28, B = 512;
    its o_proj (32 heads x 128) A = 32 heads, B = I128; SmolLM2's o_proj A = 9 heads, B = I64.
    """
    if not isinstance(transform, OnlineTransform):
        return None
    factors = transform.factors()
    orders = transform.orders
    best: tuple[int, int] | None = None
    for i in range(len(factors) + 1):
        a_order, b_order = math.prod(orders[:i]), math.prod(orders[i:])
        b_identity = all(isinstance(f, int) for f in factors[i:])
        a_identity = all(isinstance(f, int) for f in factors[:i])
        if not _is_pow2(b_order):
            continue
        if not b_identity and not 16 <= b_order <= 1024:
            continue
        if not a_identity and b_order < 16:
            continue  # the A product is a tl.dot whose N dimension is B
        padded = max(16, 1 << (a_order - 1).bit_length())
        if padded * b_order > MAX_TILE:
            continue
        if best is None or padded * b_order < best[1]:
            best = (i, padded * b_order)
    if best is None:
        return None
    i = best[0]
    a, b = _kron(factors[:i]), _kron(factors[i:])
    return FusedTransform(math.prod(orders[:i]), math.prod(orders[i:]),
                          None if a is None else a.float().contiguous(), None if b is None else b.float().contiguous())


class TritonKernel(Kernel):
    """The ``gpu`` forward of one :class:`QuadLinear`: the packed INT4 weights are used as stored
    (no unpacked copy is kept).

    ``fuse_transform``: apply the layer's online transform inside the quantize kernel where
    :func:`fused_transform_plan` allows (see :meth:`fused_call`); False runs it as torch matmuls
    first, as the float simulation does."""
    name = "gpu"

    @classmethod
    def device(cls) -> str:
        return "cpu" if interpreting() else "cuda"  # the interpreter runs the kernels on the CPU (tests)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if not triton_available():
            return "the gpu backend needs Triton: pip install 'quadllm[gpu]'"
        if not interpreting() and not torch.cuda.is_available():
            return "the gpu backend runs on a CUDA device, and there is none (torch.cuda.is_available() is False)"
        return None

    supports = staticmethod(supports_gpu)
    refuses = staticmethod(gpu_refuses)

    def __init__(self, fuse_transform: bool = True) -> None:
        self.fuse_transform = fuse_transform
        self._plan: FusedTransform | None = None
        self._plan_key: tuple | None = None

    def plan(self, lin: QuadLinear, device: torch.device) -> FusedTransform | None:
        """The fused plan of ``lin.transform`` with its matrices on ``device`` (cached)."""
        t = lin.transform
        key = (id(t), str(device), tuple(f.data_ptr() for f in t.factors() if isinstance(f, torch.Tensor))) \
            if isinstance(t, OnlineTransform) else None
        if key is None:
            return None
        if key != self._plan_key:
            plan = fused_transform_plan(t)
            if plan is not None:
                plan = FusedTransform(plan.a_order, plan.b_order,
                                      None if plan.a is None else plan.a.to(device),
                                      None if plan.b is None else plan.b.to(device))
            self._plan, self._plan_key = plan, key
        return self._plan

    def fused_call(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor | None:
        """The forward of ``lin`` on its *untransformed* input, with the online transform done
        by the quantize kernel; None when this layer cannot fuse it (the caller then transforms
        ``x`` and calls the kernel as usual)."""
        if not self.fuse_transform or lin.rank or lin.transform is None:
            return None
        plan = self.plan(lin, x.device)
        if plan is None:
            return None
        from .triton_kernels import transform_quantize_rows, w4a8_linear  # Triton: optional

        lead = x.shape[:-1]
        codes, sx = transform_quantize_rows(x.reshape(-1, x.shape[-1]), plan, lin.act.bits, lin.act.clip_ratio)
        y = w4a8_linear(codes, sx, lin.qweight, lin.scales.reshape(-1), None, None, lin.bias, out_dtype=x.dtype)
        return y.reshape(*lead, y.shape[-1])

    def __call__(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor:
        """The forward of ``lin`` on its input after the online transform."""
        from .triton_kernels import quantize_rows, w4a8_linear  # Triton: optional

        r = lin.rank
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        codes, sx = quantize_rows(x2[:, r:], lin.act.bits, lin.act.clip_ratio)
        y = w4a8_linear(codes, sx, lin.qweight, lin.scales.reshape(-1), x2[:, :r] if r else None,
                        lin.w_outlier if r else None, lin.bias, out_dtype=x.dtype)
        return y.reshape(*lead, y.shape[-1])
