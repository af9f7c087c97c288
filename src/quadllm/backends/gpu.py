"""The ``gpu`` backend: one :class:`QuadLinear` forward on the Triton kernels of
:mod:`quadllm.backends.triton_kernels` (fused per-token quantization, then one W4A8/W4A4 GEMM
with the outlier branch and the scale epilogue fused).

Triton is optional (``pip install 'quadllm[gpu]'``): :func:`triton_available` says whether it
imports, :func:`gpu_available` whether a CUDA device can run it. With ``TRITON_INTERPRET=1`` the
same kernels run on the CPU through Triton's interpreter (for tests; far too slow for use).
"""

from __future__ import annotations

import functools
import os

import torch

from ..modules import QuadLinear

__all__ = ["TritonKernel", "gpu_available", "interpreting", "supports_gpu", "triton_available", "why_no_gpu"]


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
            and lin.group_size == 0 and (lin.in_features - lin.n_outlier) % 2 == 0)


class TritonKernel:
    """The ``gpu`` forward of one :class:`QuadLinear` (after its online transform): the packed
    INT4 weights are used as stored (no unpacked copy is kept)."""

    name = "gpu"

    def __call__(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor:
        from .triton_kernels import quantize_rows, w4a8_linear

        r = lin.n_outlier
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        codes, sx = quantize_rows(x2[:, r:], lin.act.bits, lin.act.clip_ratio)
        y = w4a8_linear(codes, sx, lin.qweight, lin.scales.reshape(-1), x2[:, :r] if r else None,
                        lin.w_outlier if r else None, lin.bias, out_dtype=x.dtype)
        return y.reshape(*lead, y.shape[-1])
