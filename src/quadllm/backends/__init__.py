"""Execution backends for quantized linears.

- ``fake``: the float simulation (quantize-dequantize); what research and fine-tuning use.
- ``cpu-int8``: INT8 GEMM with int32 accumulation (``torch._int_mm``) on the packed INT4 weights,
  per-token activation codes and a scale epilogue; the outlier columns stay a float matmul.
- ``gpu``: Triton kernels on a CUDA device (:mod:`quadllm.backends.gpu`): fused per-token
  quantization and one INT8-tensor-core GEMM on the packed INT4 weights with the outlier branch
  and scale epilogue fused; needs ``pip install 'quadllm[gpu]'``.
- ``auto``: ``gpu`` for a model on a CUDA device when Triton is installed, ``cpu-int8`` for a
  model on the CPU where ``torch._int_mm`` runs, else ``fake``.

:func:`set_backend` switches a loaded model in place; layers the integer path cannot run
(weight-only ``w4a16`` inputs, activations wider than 8 bits, grouped weight scales, training)
keep the float simulation, and :func:`set_backend` reports how many layers use which.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from ..modules import QuadLinear
from .gpu import TritonKernel, interpreting, supports_gpu, triton_available
from .int8 import act_codes, int8_linear, int_mm_available

log = logging.getLogger(__name__)

BACKENDS = ("fake", "cpu-int8", "gpu", "auto")

__all__ = ["BACKENDS", "BackendError", "Int8Kernel", "TritonKernel", "set_backend", "supports_int8"]


class BackendError(ValueError):
    """A backend that does not exist or cannot run here."""


def supports_int8(lin: QuadLinear) -> bool:
    """Whether ``lin`` can run on the INT8 path."""
    return (lin.quantized and lin.act.enabled and lin.act.bits <= 8 and lin.w_bits <= 8
            and lin.group_size == 0)


class Int8Kernel:
    """The ``cpu-int8`` forward of one :class:`QuadLinear` (after its online transform).

    ``cache_weights``: keep the transposed int8 weight codes (1 byte per weight, twice the packed
    size) instead of unpacking the INT4 codes at every call."""

    name = "cpu-int8"

    def __init__(self, cache_weights: bool = True) -> None:
        self.cache_weights = cache_weights
        self._wt: torch.Tensor | None = None
        self._key: tuple | None = None

    def weight_t(self, lin: QuadLinear) -> torch.Tensor:
        key = (lin.qweight.data_ptr(), lin.qweight._version)
        if self._wt is not None and self._key == key:
            return self._wt
        wt = lin.codes().t().contiguous()
        if self.cache_weights:
            self._wt, self._key = wt, key
        return wt

    def __call__(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor:
        r = lin.n_outlier
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xs = x2 if x2.dtype == torch.float32 else x2.float()
        codes, sx = act_codes(xs[:, r:], lin.act.bits, lin.act.clip_ratio)
        y = int8_linear(codes, sx, self.weight_t(lin), lin.scales.reshape(-1))
        if r:
            y.addmm_(xs[:, :r], lin.w_outlier.t().to(y.dtype))
        if lin.bias is not None:
            y += lin.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, y.shape[-1])


def set_backend(model: nn.Module, backend: str = "auto", cache_weights: bool = True) -> dict[str, int]:
    """Run ``model``'s quantized linears on ``backend``; returns ``{backend: number of layers}``."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    device = next(model.parameters()).device
    use_gpu = backend in ("gpu", "auto") and triton_available() and (device.type == "cuda" or (
        backend == "gpu" and interpreting()))
    use_int8 = backend in ("cpu-int8", "auto") and device.type == "cpu" and not use_gpu
    if backend == "gpu" and not use_gpu:
        if not triton_available():
            raise BackendError("the gpu backend needs Triton: pip install 'quadllm[gpu]'")
        raise BackendError(f"the gpu backend runs on a CUDA device; the model is on {device}")
    if backend == "cpu-int8":
        if device.type != "cpu":
            raise BackendError(f"the cpu-int8 backend runs on the CPU; the model is on {device}")
        if not int_mm_available():
            raise BackendError("torch._int_mm does not run on this CPU/torch build; use --backend fake")
    elif use_int8 and not int_mm_available():
        use_int8 = False
    counts: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, QuadLinear):
            if use_gpu and supports_gpu(m):
                m.kernel = TritonKernel()
                counts["gpu"] += 1
            elif use_int8 and supports_int8(m):
                m.kernel = Int8Kernel(cache_weights)
                counts["cpu-int8"] += 1
            else:
                m.kernel = None
                counts["fake"] += 1
    log.info("backend %s: %s", backend, ", ".join(f"{n} layers {k}" for k, n in sorted(counts.items())))
    return dict(counts)
