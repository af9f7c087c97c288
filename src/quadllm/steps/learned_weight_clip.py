"""The weight clip ratios of one decoder layer, learned against the full-precision layer's output
(``--w-clip-learn STEPS``) before its weights are quantized: issue 19 item 1's learnable weight
clipping, set against the MSE search.

The MSE search (:func:`quadllm.core.quantizers.weight_scales`) chooses each weight row's (group's)
clip for that row's own rounding error, blind to the inputs and to the rest of the layer.
OmniQuant's learnable weight clipping (LWC), which FlatQuant keeps, trains those ratios on the
layer's output instead. Here every quantized linear gets one ratio per row (group), starting from
the MSE search's, trained jointly with Adam on each token's output error relative to its norm
(:func:`quadllm.core.clipping.block_error`, ``token``) between the layer with every quantizer in
the loop (weights round-to-nearest with the scales ``ratio * absmax / qmax``, activations per
token, straight-through rounding) and the float layer, one calibration batch a step. The ratios are
kept only if they lower that error over all calibration batches; GPTQ or RTN then uses them in
place of the search (:func:`quadllm.core.gptq.gptq_quantize`'s ``clip``): the scales are what they
change, so nothing changes at run time.

The ratios are trained for round-to-nearest weights, and GPTQ's error compensation can undo what
they gain: :func:`keep_after_quantization` therefore quantizes the layer both ways (learned ratios,
and the search's on a copy) and keeps the one whose output is nearer the float layer's.

Cost: the float layer's outputs once per calibration batch, ``STEPS`` forward and backward passes
of one layer on one batch, and two forward passes over all batches; with GPTQ, a second GPTQ of the
layer (on a copy, one layer's weights more in memory) and two more forward passes.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch import ArchAdapter, get_submodule
from ..config import QuantConfig
from ..core.quantizers import weight_clip_ratios
from ..nn.modules import QuadLinear
from .calibration import LayerInputs
from .transforms import weight_quantized_names
from .layer_fit import TrainedWeight, act_quantized_linears, act_quantizers_on, layer_error, train_layer

log = logging.getLogger(__name__)

__all__ = ["WEIGHT_CLIP_LR", "WEIGHT_CLIP_MIN", "keep_after_quantization", "learn_layer_weight_clips"]

#: Adam's learning rate for the ratios (FlatQuant's for its learnable clipping)
WEIGHT_CLIP_LR = 5e-3
#: the smallest ratio allowed, the MSE search's smallest candidate (``1 - 0.8 * grid / grid``)
WEIGHT_CLIP_MIN = 0.2
#: the error trained on: what the next RMSNorm sees
WEIGHT_CLIP_LOSS = "token"


@torch.no_grad()
def learn_layer_weight_clips(layer: nn.Module, adapter: ArchAdapter, inputs: LayerInputs,
                             targets: list[torch.Tensor], config: QuantConfig,
                             index: int) -> dict[str, torch.Tensor] | None:
    """Train the clip ratios [out, G] of every linear of ``layer`` (float weights) for
    ``config.w_clip_learn`` batches of ``inputs`` against ``targets``, the float layer's outputs
    (:func:`~quadllm.steps.layer_fit.float_targets`); returns them per linear name, or None where
    they did not lower the layer's error over all batches (the MSE search then stays)."""
    steps = config.w_clip_learn
    if steps <= 0:
        return None
    lins: dict[str, QuadLinear] = {name: get_submodule(layer, name)
                                   for name in weight_quantized_names(adapter, config, index)}
    ratios = {name: weight_clip_ratios(lin.weight.detach()[:, lin.rank:].float(), config.w_bits, config.group_size,
                                       config.w_clip).requires_grad_()
              for name, lin in lins.items()}
    try:
        for name, lin in lins.items():
            parametrize.register_parametrization(
                lin, "weight", TrainedWeight(lin.rank, config.w_bits, config.group_size, ratio=ratios[name]))
        with act_quantizers_on(act_quantized_linears(layer, adapter).values()):
            with parametrize.cached():
                err_start = layer_error(layer, inputs, targets, WEIGHT_CLIP_LOSS)

            def clamp() -> None:
                for r in ratios.values():
                    r.clamp_(WEIGHT_CLIP_MIN, 1.0)

            train_layer(layer, inputs, targets, list(ratios.values()), steps, WEIGHT_CLIP_LR, WEIGHT_CLIP_LOSS,
                        after_step=clamp, forward=parametrize.cached)
            with parametrize.cached():
                err_end = layer_error(layer, inputs, targets, WEIGHT_CLIP_LOSS)
    finally:
        for lin in lins.values():
            if parametrize.is_parametrized(lin, "weight"):
                parametrize.remove_parametrizations(lin, "weight", leave_parametrized=False)
    kept = err_end < err_start  # False for NaN
    log.debug("layer %d: learned weight clips, output error %.4g -> %.4g (%s)", index, err_start, err_end,
              "kept" if kept else "discarded")
    return {name: r.detach() for name, r in ratios.items()} if kept else None


@torch.no_grad()
def keep_after_quantization(layer: nn.Module, adapter: ArchAdapter, inputs: LayerInputs,
                            targets: list[torch.Tensor], clips: dict[str, torch.Tensor],
                            quantize: Callable[[nn.Module, dict[str, torch.Tensor] | None], None],
                            index: int) -> bool:
    """Quantize ``layer`` (float weights) with ``quantize(layer, clips)`` and a copy of it with
    ``quantize(copy, None)`` (the search's scales); the layer keeps whichever weights give the output
    nearer the float layer's outputs ``targets`` over all calibration batches, every activation
    quantizer on (strictly nearer for the learned ones). Returns whether the learned ratios were kept."""
    searched = copy.deepcopy(layer)
    quantize(layer, clips)
    quantize(searched, None)
    errors = []
    for candidate in (layer, searched):
        with act_quantizers_on(act_quantized_linears(candidate, adapter).values()):
            errors.append(layer_error(candidate, inputs, targets, WEIGHT_CLIP_LOSS))
    kept = errors[0] < errors[1]  # False for NaN
    log.debug("layer %d: quantized with learned weight clips %.4g, with the search's %.4g (%s)", index,
              errors[0], errors[1], "kept" if kept else "discarded")
    if not kept:
        layer.load_state_dict(searched.state_dict())
    return kept
