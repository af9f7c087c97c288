"""Execution backends for quantized linears: the registry, and placing a model on one.

- ``fake``: the float simulation (quantize-dequantize); what research and fine-tuning use.
- ``cpu-int8`` (:mod:`quadllm.backends.int8`): INT8 GEMM with int32 accumulation
  (``torch._int_mm``) on the packed INT4 weights, per-token activation codes and a scale
  epilogue; the outlier columns stay a float matmul.
- ``cpu-int4`` (:mod:`quadllm.backends.int4`): ``cpu-int8`` whose decode (up to 32 rows) reads the
  weights as packed INT4 through torch's CPU INT4 GEMM, fed with the activation codes; each
  integer sum is rounded once to bfloat16 there.
- ``gpu`` (:mod:`quadllm.backends.gpu`): Triton kernels on a CUDA device: fused per-token
  quantization and one INT8-tensor-core GEMM on the packed INT4 weights with the outlier branch
  and scale epilogue fused; needs ``pip install 'quadllm[gpu]'``.
- ``auto``: ``gpu`` where a CUDA device and Triton are there, else ``cpu-int8`` where
  ``torch._int_mm`` runs, else ``fake``.

Any placed model can also decode through :class:`quadllm.backends.compiled.CompiledDecoder` (a
static KV cache and the one-token step compiled by ``torch.compile``; ``generate --compile``,
``bench model --compile``), which removes most of the per-token framework cost on the CPU.

Loading a checkpoint gives a ``fake`` model on the CPU; :func:`place` is the one step that then
chooses the device and the kernel of every layer. Layers a kernel does not support (its
``supports``: weight-only ``w4a16`` inputs, activations wider than 8 bits, grouped weight scales)
keep the float simulation, and :func:`place` reports how many layers use which; a layer a kernel
``refuses`` (it would compute it otherwise than the checkpoint asks) stops :func:`place` with the reason.
On the CPU kernels, the linears of a layer that read one input (q/k/v, gate/up) run as one
(:mod:`quadllm.backends.siblings`) unless ``place(fuse=False)``.
"""

from __future__ import annotations

import logging
from collections import Counter

import torch
from torch import nn

from ..arch import get_adapter
from ..arch.base import get_submodule
from ..errors import QuadllmError
from ..nn.modules import QuadHead, QuadLinear
from .base import Kernel
from .gpu import TritonKernel
from .head import HEAD_PRECISIONS, HeadKernel
from .int4 import Int4Kernel
from .int8 import Int8Kernel
from .siblings import SiblingGroup, fusable

log = logging.getLogger(__name__)

#: the kernel of every backend but ``fake``, by name
KERNELS: dict[str, type[Kernel]] = {k.name: k for k in (Int8Kernel, Int4Kernel, TritonKernel)}
#: every ``--backend`` choice
BACKENDS: tuple[str, ...] = ("fake", *KERNELS, "auto")
#: the dtypes a model can run in (``--dtype``; bfloat16 on the fake backend only: the kernels take float32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

__all__ = ["BACKENDS", "DTYPES", "HEAD_PRECISIONS", "KERNELS", "HeadKernel", "BackendError", "Kernel", "Int4Kernel", "Int8Kernel", "TritonKernel",
           "resolve_backend", "place"]


class BackendError(QuadllmError, ValueError):
    """A backend that does not exist or cannot run here."""


def resolve_backend(backend: str) -> str:
    """The backend ``backend`` names here: ``auto`` becomes the fastest that can run."""
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    gpu, int8 = KERNELS["gpu"], KERNELS["cpu-int8"]
    if gpu.unavailable_reason() is None and gpu.device() == "cuda":  # not Triton's CPU interpreter
        return "gpu"
    return "cpu-int8" if int8.unavailable_reason() is None else "fake"


def place(model: nn.Module, backend: str = "auto", cache_weights: bool = True, head: str = "float",
          fuse: bool = True) -> dict[str, int]:
    """Move ``model`` to the device of ``backend`` and give every quantized linear its kernel
    (``fake``: none); returns ``{backend: number of layers}``.

    ``cache_weights`` (``cpu-int8``): keep each layer's transposed int8 codes instead of
    unpacking the INT4 codes at every call. ``head`` (:data:`HEAD_PRECISIONS`): the output head's
    precision on the CPU (:mod:`quadllm.backends.head`; ``float``: the model's own). ``fuse``: run
    the linears that read one input as one where the kernel can (:mod:`quadllm.backends.siblings`)."""
    if head not in HEAD_PRECISIONS:
        raise BackendError(f"unknown head precision {head!r}; choose one of {', '.join(HEAD_PRECISIONS)}")
    name = resolve_backend(backend)
    if head != "float" and name in KERNELS and KERNELS[name].device() != "cpu":
        raise BackendError(f"--head {head} runs on the CPU; the {name} backend keeps the model's head")
    kernel_cls = KERNELS.get(name)
    if kernel_cls is not None:
        reason = kernel_cls.unavailable_reason()
        if reason is not None:
            raise BackendError(reason)
        for m in model.modules():  # before anything moves
            if isinstance(m, QuadLinear) and (refusal := kernel_cls.refuses(m)) is not None:
                raise BackendError(refusal)
        device = next(model.parameters()).device
        if device.type != kernel_cls.device():
            model.to(kernel_cls.device())
    counts: Counter[str] = Counter()
    for m in model.modules():
        if isinstance(m, QuadLinear):
            if kernel_cls is not None and kernel_cls.supports(m):
                m.kernel = kernel_cls.create(cache_weights=cache_weights)
                counts[name] += 1
            else:
                m.kernel = None
                counts["fake"] += 1
    try:
        adapter = get_adapter(model)
    except QuadllmError:
        adapter = None
    groups = _group_siblings(model, adapter, cache_weights) if fuse and kernel_cls is not None \
        and kernel_cls.fuses_siblings and adapter is not None else 0
    _place_head(model, adapter, head)
    log.info("backend %s: %s%s%s", backend, ", ".join(f"{n} layers {k}" for k, n in sorted(counts.items())),
             f"; {groups} groups of linears reading one input run as one" if groups else "",
             f"; head {head}" if head != "float" else "")
    return dict(counts)


def _group_siblings(model: nn.Module, adapter, cache_weights: bool) -> int:
    """Give the linears of each reader group (the adapter's) one :class:`SiblingGroup` where they
    can run as one; the number of groups."""
    n = 0
    for layer in adapter.layers(model):
        for group in adapter.reader_groups:
            members = [get_submodule(layer, name) for name in group.linears]
            if all(isinstance(m, QuadLinear) for m in members) and fusable(members) is None:
                siblings = SiblingGroup(members, cache_weights)
                for m in members:
                    m.kernel.siblings = siblings
                n += 1
    return n


def _place_head(model: nn.Module, adapter, head: str) -> None:
    """Give the model's output head ``head``'s precision (a stock layout's ``nn.Linear`` head
    becomes the equivalent :class:`QuadHead` first, sharing its weight)."""
    module = adapter.head(model) if adapter is not None else None
    if head != "float" and isinstance(module, nn.Linear):
        module = QuadHead(None, weight=module.weight, bias=module.bias)
        adapter.set_head(model, module)
    if isinstance(module, QuadHead):
        try:
            module.kernel = None if head == "float" else HeadKernel(module.table(), head)
        except ValueError as exc:
            raise BackendError(f"--head {head}: {exc}") from None
    elif head != "float":
        raise BackendError(f"--head {head}: this model's output head ({type(module).__name__}) is not one quadllm knows")
