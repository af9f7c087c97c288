"""Calibration passes: the residual stream's second moment, and the inputs of the first
decoder layer (from which GPTQ proceeds layer by layer)."""

from __future__ import annotations

import logging
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
    """Hidden states entering the first decoder layer, per batch, and the keyword arguments the
    layers are called with (positions, masks), which are the same for every batch of equal shape."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]


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
