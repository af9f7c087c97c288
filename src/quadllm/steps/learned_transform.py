"""A learned affine transform of every quantized linear input of one decoder layer
(``--learn-transform STEPS``), trained against the float layer's output before the weights are
quantized: the FlatQuant-style step of issue 19's item 7.

The Hadamard rotations spread outliers with one fixed matrix for every layer. Here each quantized
input (the readers of one norm share theirs: q/k/v, gate/up; o_proj and down_proj have their own)
gets ``T = kron(L, R) diag(s)`` on its quantized coordinates (:mod:`quadllm.core.affine`), after
the fixed transforms QUAD already applies. ``T`` starts at the identity and is trained with Adam on
each token's output error relative to its norm (:func:`quadllm.core.clipping.block_error`,
``token``) between the layer with every quantizer in the loop (activations per token, weights
``W T⁻¹`` round-to-nearest with absmax scales, straight-through rounding) and the float layer, one
calibration batch a step. The trained transforms are kept only if they lower that error over all
calibration batches; otherwise the layer gets identity transforms (same structure, same output).
``W T⁻¹`` (float64) then replaces each weight, so GPTQ or RTN, the clip search and the learned clip
that follow see the transformed layer.

Run-time cost: ``T`` is applied online by every linear that reads it,
``n * (a + b + 1)`` multiply-adds per token for ``n = a * b`` coordinates
(:func:`quadllm.core.affine.affine_macs`). Quantization cost: ``STEPS`` forward and backward passes
of one layer on one batch, the float layer's outputs once per batch, and two forward passes over
all batches.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..arch import ArchAdapter
from ..config import QuantConfig
from ..core.affine import AffineTail, fuse_affine, identity_factors
from .calibration import LayerInputs, input_owners
from .layer_fit import (TrainedWeight, act_quantized_linears, act_quantizers_on, float_copy, float_targets,
                        layer_error, train_layer)

log = logging.getLogger(__name__)

__all__ = ["TRANSFORM_LOSS", "TRANSFORM_LR", "learn_layer_transforms"]

#: Adam's learning rate for the factors and scales (FlatQuant's for its transforms)
TRANSFORM_LR = 5e-3
#: the error trained on (:func:`quadllm.core.clipping.block_error`): what the next RMSNorm sees
TRANSFORM_LOSS = "token"


@torch.no_grad()
def learn_layer_transforms(layer: nn.Module, adapter: ArchAdapter, inputs: LayerInputs, config: QuantConfig,
                           index: int) -> bool:
    """Train, fuse and attach the transform of every activation-quantized input of ``layer`` (float
    weights) for ``config.learn_transform`` batches of ``inputs``; returns whether the trained
    transforms were kept (else identities are attached)."""
    lins = act_quantized_linears(layer, adapter)
    names = list(lins)
    steps = config.learn_transform
    if not names or steps <= 0:
        return False
    owners = input_owners(layer, adapter, names)
    dtype = lins[names[0]].weight.dtype
    params = {owner: [p.requires_grad_() for p in identity_factors(lins[owner].in_features - lins[owner].rank)]
              for owner in dict.fromkeys(owners.values())}
    targets = float_targets(float_copy(layer), inputs)
    bases = {name: lins[name].transform for name in names}
    try:
        for name in names:
            lin, factors = lins[name], params[owners[name]]
            lin.transform = AffineTail(lin.rank, *factors, base=bases[name])
            parametrize.register_parametrization(
                lin, "weight", TrainedWeight(lin.rank, config.w_bits, config.group_size, factors=factors))
        with act_quantizers_on(lins.values()):
            with parametrize.cached():
                err_start = layer_error(layer, inputs, targets, TRANSFORM_LOSS)
            train_layer(layer, inputs, targets, [p for ps in params.values() for p in ps], steps, TRANSFORM_LR,
                        TRANSFORM_LOSS, forward=parametrize.cached)
            with parametrize.cached():
                err_end = layer_error(layer, inputs, targets, TRANSFORM_LOSS)
    finally:
        for name in names:
            if parametrize.is_parametrized(lins[name], "weight"):
                parametrize.remove_parametrizations(lins[name], "weight", leave_parametrized=False)
            lins[name].transform = bases[name]
    kept = err_end < err_start  # False for NaN
    for name in names:
        lin = lins[name]
        # the stored factors, rounded to the model's dtype first, are the ones the weight is fused with
        factors = [p.detach().to(dtype) for p in params[owners[name]]] if kept else \
            identity_factors(lin.in_features - lin.rank, dtype)
        w = lin.weight.detach().to(torch.float64)
        k = lin.rank
        tail = fuse_affine(w[:, k:], *(f.to(torch.float64) for f in factors))
        lin.weight.data.copy_(torch.cat([w[:, :k], tail], dim=1).to(dtype))
        lin.transform = AffineTail(k, *(f.clone() for f in factors), base=bases[name])
    log.debug("layer %d: learned transforms, output error %.4g -> %.4g (%s)", index, err_start, err_end,
              "kept" if kept else "discarded")
    return kept
