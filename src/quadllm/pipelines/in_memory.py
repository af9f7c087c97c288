"""The in-memory pipeline: the whole model in memory, quantized in place.

``quantize(model, config, calib_samples)`` turns a transformers causal LM into a QUAD model and
returns it; :func:`transform` applies only the exact part (the result reproduces the original's
logits). Both follow the :class:`~quadllm.pipelines.recipe.LayerRecipe`. Every step is logged
with its time; ``model.quadllm_info`` holds what a checkpoint must record (configuration,
structure, timings).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..config import ConfigError, QuantConfig
from ..io.storage import round_to_storage
from ..nn.modules import use_quad_attention
from ..steps.calibration import capture_layer_inputs, residual_second_moment, run_layer
from ..steps.transforms import set_act_enabled
from ..version import __version__
from .recipe import LayerRecipe, structure_of

log = logging.getLogger(__name__)

__all__ = ["transform", "quantize"]


@torch.no_grad()
def _transform(model: nn.Module, config: QuantConfig, calib_samples: torch.Tensor | None, progress: bool,
               moment: torch.Tensor | None) -> tuple[LayerRecipe, dict[str, Any]]:
    adapter = get_adapter(model)
    recipe = LayerRecipe(config, adapter)
    adapter.check(model)
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    dtype = next(model.parameters()).dtype
    for layer in adapter.layers(model):
        recipe.prepare(layer, dtype)
    recipe.prepare_ends(model, dtype)
    use_quad_attention(model)
    info["prepare_s"] = time.perf_counter() - t0

    if config.rank > 0 and moment is None:
        if calib_samples is None:
            raise ConfigError("QUAD with rank > 0 needs calibration samples")
        t0 = time.perf_counter()
        moment = residual_second_moment(model, adapter, calib_samples, config.calib_batch,
                                        normalized=config.moment == "normalized", progress=progress)
        info["moment_s"] = time.perf_counter() - t0
    info.update(recipe.fit_basis(moment))
    t0 = time.perf_counter()
    for layer in adapter.layers(model):
        recipe.transform(layer)
    recipe.transform_ends(model)
    if config.residual_transform:
        info["rotate_s"] = time.perf_counter() - t0
    return recipe, info


def transform(model: nn.Module, config: QuantConfig, calib_samples: torch.Tensor | None,
              progress: bool = True, moment: torch.Tensor | None = None) -> dict[str, Any]:
    """The exact part: fuse norms, estimate P, move to the expanded rotated basis, add the
    online transforms. Returns timings and spectrum facts. No quantization happens here.
    ``moment``: a residual second moment already measured on these samples (then reused)."""
    return _transform(model, config, calib_samples, progress, moment)[1]


@torch.no_grad()
def _quantize_weights(model: nn.Module, recipe: LayerRecipe, samples: torch.Tensor | None, progress: bool) -> None:
    """Every layer's weights: GPTQ on the outputs of the layers already quantized before it
    (activation quantization off while calibrating, as in QuaRot), or RTN."""
    adapter, config = recipe.adapter, recipe.config
    layers = adapter.layers(model)
    if not config.needs_layer_inputs:
        for i, layer in enumerate(tqdm(layers, desc="RTN weights", unit="layer", disable=not progress)):
            recipe.quantize_weights(layer, i, None)
        return
    if samples is None:
        raise ConfigError("GPTQ and the clip search need calibration samples")
    set_act_enabled(model, False)
    try:
        inputs = capture_layer_inputs(model, adapter, samples, config.calib_batch)
        desc = config.weights.upper() + (" + clip search" if config.searches_act_clips else "") + (
            " + learned clips" if config.learns_act_clips else "") + (
            " + learned transforms" if config.learns_transforms else "") + (
            " + learned weight clips" if config.w_clip_learn else "")
        bar = tqdm(layers, desc=desc, unit="layer", disable=not progress)
        for i, layer in enumerate(bar):
            t0 = time.perf_counter()
            float_layer = recipe.quantize_weights(layer, i, inputs)
            inputs.hidden = [run_layer(layer, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
            if float_layer is not None:  # GPTAQ: the full-precision model's hidden states too
                inputs.reference = [run_layer(float_layer, h, kw) for h, kw in zip(inputs.reference, inputs.kwargs)]
            del float_layer
            bar.set_postfix(sec=f"{time.perf_counter() - t0:.1f}")
    finally:
        set_act_enabled(model, True)


def quantize(model: nn.Module, config: QuantConfig, calib_samples: torch.Tensor | None = None,
             progress: bool = True) -> nn.Module:
    """Quantize ``model`` (a transformers causal LM of a supported family) in place."""
    if calib_samples is not None and calib_samples.dtype != torch.long:
        raise TypeError("calib_samples must be a LongTensor of token ids [n, seqlen]")
    log.info("quantizing: %s", config.describe())
    t_start = time.perf_counter()
    recipe, info = _transform(model, config, calib_samples, progress, None)
    for index, layer in enumerate(recipe.adapter.layers(model)):
        recipe.set_quantizers(layer, index)
    t0 = time.perf_counter()
    _quantize_weights(model, recipe, calib_samples, progress)
    info["weights_s"] = time.perf_counter() - t0
    info.update(recipe.facts())
    round_to_storage(model)
    info["quantize_s"] = time.perf_counter() - t_start
    model.quadllm_info = {
        "quant_config": config.to_dict(),
        "structure": structure_of(config, recipe.adapter),
        "timings": info,
        "library_version": __version__,
    }
    log.info("quantized in %.1f s", info["quantize_s"])
    return model
