"""Calibration passes: the residual stream's second moment, the inputs of the first decoder layer
(from which GPTQ proceeds layer by layer), and the inputs of a group of linears inside a layer."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import ArchAdapter, get_submodule
from ..errors import QuadllmError

log = logging.getLogger(__name__)


class CalibrationError(QuadllmError, FloatingPointError):
    """Calibration activations are unusable (NaN or Inf)."""


def _batches(samples: torch.Tensor, batch: int):
    for i in range(0, samples.shape[0], batch):
        yield samples[i:i + batch]


class MomentAccumulator:
    """Running ``E[x xᵀ]`` (float64, d×d) of the residual stream at the inputs of the norms it is
    attached to (every token of every norm input weighted equally; with ``normalized`` each token
    first scaled to unit norm)."""

    def __init__(self, d: int, normalized: bool = False) -> None:
        self.acc = torch.zeros(d, d, dtype=torch.float64)
        self.count = 0
        self.normalized = normalized

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if not torch.isfinite(x).all():
            raise CalibrationError("NaN or Inf in the residual stream during calibration; "
                                   "check the calibration data and the model weights")
        if self.normalized:
            x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        self.acc.add_(x.T @ x)
        self.count += x.shape[0]

    def attach(self, layer: nn.Module, adapter: ArchAdapter) -> list:
        """Pre-hooks on the norms of one decoder layer; returns the handles to remove."""
        return [get_submodule(layer, group.norm).register_forward_pre_hook(lambda _m, args: self.add(args[0]))
                for group in adapter.reader_groups]

    @property
    def moment(self) -> torch.Tensor:
        return self.acc / max(self.count, 1)


@torch.no_grad()
def residual_second_moment(model: nn.Module, adapter: ArchAdapter, samples: torch.Tensor, batch: int = 8,
                           normalized: bool = False, progress: bool = True) -> torch.Tensor:
    """``E[x xᵀ]`` (float64, d×d) of the residual stream at the input of every decoder layer's
    norms, every token of every norm input weighted equally. With ``normalized`` each token is
    first scaled to unit norm (every token's direction then counts equally)."""
    acc = MomentAccumulator(adapter.hidden_size, normalized)
    handles = []
    for layer in adapter.layers(model):
        handles += acc.attach(layer, adapter)
    try:
        bar = tqdm(list(_batches(samples, batch)), desc="residual moment", unit="batch", disable=not progress)
        for ids in bar:
            model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acc.moment


class _Stop(Exception):
    pass


@dataclass
class LayerInputs:
    """Hidden states entering a decoder layer, per batch, and the keyword arguments the layers are
    called with (positions, masks), which are the same for every batch of equal shape.
    ``reference``: the same batches' hidden states in the full-precision model (GPTAQ), or None."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]
    reference: list[torch.Tensor] | None = None


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: ArchAdapter, samples: torch.Tensor,
                         batch: int = 8) -> LayerInputs:
    layer0 = adapter.layers(model)[0]
    hidden: list[torch.Tensor] = []
    kwargs_list: list[dict[str, Any]] = []

    def pre_hook(_module, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states",)}
        kw["use_cache"] = False
        kw.pop("past_key_values", None)
        kw.pop("cache", None)
        kwargs_list.append(kw)
        raise _Stop

    handle = layer0.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for ids in _batches(samples, batch):
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    for h in hidden:
        if not torch.isfinite(h).all():
            raise CalibrationError("NaN or Inf in the embedding outputs of the calibration data")
    return LayerInputs(hidden, kwargs_list)


def run_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


class _GroupCaptured(Exception):
    """Raised from inside a layer's forward once every input of a group of linears has been seen."""


def input_owners(layer: nn.Module, adapter: ArchAdapter, names: Sequence[str]) -> dict[str, str]:
    """For each linear of ``names``, the first linear of ``names`` that reads the same tensor:
    the readers of one norm read one tensor, every other linear its own."""
    def source(name: str) -> int:
        for group in adapter.reader_groups:
            if name in group.linears:
                return id(get_submodule(layer, group.norm))
        return id(get_submodule(layer, name))

    first: dict[int, str] = {}
    return {name: first.setdefault(source(name), name) for name in names}


@torch.no_grad()
def capture_group(layer: nn.Module, adapter: ArchAdapter, names: Sequence[str], inputs: LayerInputs,
                  sink: Callable[[str, torch.Tensor], None]) -> dict[str, str]:
    """Run ``layer`` on every batch of ``inputs`` and hand each distinct input of the linears
    ``names`` (after their online transform, before activation quantization) to
    ``sink(owner, x)``; each batch's forward stops once all of them are seen (the rest of the
    layer cannot change them). Returns :func:`input_owners`."""
    owners = input_owners(layer, adapter, names)
    readers = sorted(set(owners.values()), key=list(names).index)
    seen: set[str] = set()

    def capture_for(owner: str):
        def capture(x: torch.Tensor) -> None:
            sink(owner, x)
            seen.add(owner)
            if len(seen) == len(readers):
                raise _GroupCaptured

        return capture

    lins = [get_submodule(layer, owner) for owner in readers]
    for owner, lin in zip(readers, lins):
        lin.capture = capture_for(owner)
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            seen.clear()
            try:
                run_layer(layer, h, kw)
            except _GroupCaptured:
                pass
    finally:
        for lin in lins:
            lin.capture = None
    return owners
