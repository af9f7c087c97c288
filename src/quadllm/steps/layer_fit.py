"""Training part of one decoder layer against the float layer's output, shared by the learned steps
(the activation clip :mod:`quadllm.steps.learned_clip`, the transform
:mod:`quadllm.steps.learned_transform`, the weight clip :mod:`quadllm.steps.learned_weight_clip`):
the float copy that gives the targets, the quantizers switched on, the fake-quantized weight a
linear trains with, the training loop, and the layer's error over all calibration batches (the
keep-or-discard test they all apply)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..core.affine import fuse_affine
from ..core.clipping import block_error
from ..core.quantizers import fake_quant_weight
from ..nn.modules import QuadLinear
from .calibration import LayerInputs, run_layer

__all__ = ["TrainedWeight", "act_quantized_linears", "act_quantizers_on", "float_copy", "float_targets", "layer_error",
           "train_layer"]


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


class TrainedWeight(nn.Module):
    """The weight a linear has while its layer trains (a parametrization of ``weight``): the first
    ``keep`` columns (full precision) as they are, the others round-to-nearest fake-quantized
    (:func:`~quadllm.core.quantizers.fake_quant_weight`, straight-through), after ``W T⁻¹`` for the
    transform ``factors`` (L, R, s) and with the clip ``ratio`` [out, G] when given."""

    def __init__(self, keep: int, bits: int, group_size: int, *, factors: Sequence[torch.Tensor] | None = None,
                 ratio: torch.Tensor | None = None) -> None:
        super().__init__()
        self.keep = keep
        self.bits = bits
        self.group_size = group_size
        self.factors = factors  # trained elsewhere: held, not registered
        self.ratio = ratio

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        k = self.keep
        tail = weight[:, k:] if self.factors is None else fuse_affine(weight[:, k:], *self.factors)
        tail = fake_quant_weight(tail, self.bits, self.group_size, self.ratio)
        return torch.cat([weight[:, :k], tail], dim=1) if k else tail


def act_quantized_linears(layer: nn.Module, adapter: ArchAdapter) -> dict[str, QuadLinear]:
    """The linears of ``layer`` whose inputs are quantized, by name, in the adapter's order."""
    lins: dict[str, QuadLinear] = {name: get_submodule(layer, name) for name in adapter.all_linears}
    return {name: lin for name, lin in lins.items() if lin.act.enabled}


@contextlib.contextmanager
def act_quantizers_on(lins: Iterable[QuadLinear]) -> Iterator[None]:
    """Every activation quantizer of ``lins`` switched on for the block (the pipelines calibrate
    with them off, as QuaRot does for GPTQ; a step that trains against the quantized layer's output
    needs them on), then back as it was."""
    lins = list(lins)
    before = [lin.act_enabled for lin in lins]
    try:
        for lin in lins:
            lin.act_enabled = True
        yield
    finally:
        for lin, on in zip(lins, before):
            lin.act_enabled = on


@torch.no_grad()
def float_targets(reference: nn.Module, inputs: LayerInputs) -> list[torch.Tensor]:
    """``reference``'s output for every calibration batch (held in memory, as large as the inputs)."""
    return [run_layer(reference, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]


def _cycle_batches(inputs: LayerInputs, targets: list[torch.Tensor],
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


def train_layer(layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor], params: Sequence[torch.Tensor],
                steps: int, lr: float, loss: str, *, after_step: Callable[[], None] | None = None,
                forward: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """Adam on ``params`` for ``steps`` calibration batches (cycling) on
    :func:`~quadllm.core.clipping.block_error` ``loss`` between ``layer``'s output and ``targets``.
    ``forward``: the context each forward and backward pass runs in; ``after_step``: called after
    each step (to project the parameters back onto their allowed range)."""
    opt = torch.optim.Adam(list(params), lr=lr)
    for h, kw, target in _cycle_batches(inputs, targets, steps):
        with torch.enable_grad(), forward():
            err = block_error(run_layer(layer, h, kw), target, loss)
            opt.zero_grad(set_to_none=True)
            err.backward()
        opt.step()
        if after_step is not None:
            with torch.no_grad():
                after_step()


@torch.no_grad()
def layer_error(layer: nn.Module, inputs: LayerInputs, targets: list[torch.Tensor], loss: str) -> float:
    """:func:`~quadllm.core.clipping.block_error` of ``layer``'s outputs over every calibration batch."""
    total, count = 0.0, 0
    for h, kw, y in zip(inputs.hidden, inputs.kwargs, targets):
        out = run_layer(layer, h, kw).double()
        total += float(block_error(out, y.double(), loss)) * out[..., 0].numel()
        count += out[..., 0].numel()
    return total / max(count, 1)
