"""What training part of one decoder layer against the float layer's output needs, shared by the
learned clip (:mod:`quadllm.steps.learned_clip`) and the learned transform
(:mod:`quadllm.steps.learned_transform`): the float copy that gives the targets, the batches of a
training run, and the layer's error over all calibration batches."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn

from ..core.clipping import block_error
from ..nn.modules import QuadLinear
from .calibration import LayerInputs, run_layer

__all__ = ["cycle_batches", "float_copy", "float_targets", "layer_error"]


def float_copy(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` (float weights, before their quantization) that quantizes nothing: the
    source of the training targets."""
    ref = copy.deepcopy(layer)
    for m in ref.modules():
        if isinstance(m, QuadLinear):
            m.act_enabled = False
        kv = getattr(m, "quad_kv", None)
        if kv is not None:
            kv.bits = 16  # the rotation of q and k alone leaves q kᵀ as it was
    return ref


@torch.no_grad()
def float_targets(reference: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """``reference``'s output for every calibration batch (held in memory, as large as the inputs)."""
    return [run_layer(reference, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]


def cycle_batches(inputs: LayerInputs, targets: list[torch.Tensor],
                  steps: int) -> Iterator[tuple[torch.Tensor, dict, torch.Tensor]]:
    """``steps`` (input, keyword arguments, target) batches, cycling (the hidden states may be a
    store read from disk)."""
    done = 0
    while done < steps:
        for h, kw, y in zip(inputs.hidden, inputs.kwargs, targets):
            if done == steps:
                return
            yield h, kw, y
            done += 1


@torch.no_grad()
def layer_error(layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor], loss: str) -> float:
    """:func:`~quadllm.core.clipping.block_error` of ``layer``'s outputs over every calibration batch."""
    total, count = 0.0, 0
    for h, kw, y in zip(inputs.hidden, inputs.kwargs, targets):
        out = run_layer(layer, h, kw).double()
        total += float(block_error(out, y.double(), loss)) * out[..., 0].numel()
        count += out[..., 0].numel()
    return total / max(count, 1)
