"""The activation clip ratios of one decoder layer, learned against the full-precision layer's output
(``--a-clip-learn STEPS``), after its weights are quantized.

The grid search (:mod:`quadllm.steps.clipping`) chooses each linear input's ratio for that linear's
own output. Inside a layer the errors interact: q and k's errors pass through the softmax, the
attention output's error feeds o_proj, gate's through the SiLU. Here every ratio of the layer is a
trainable scalar (one per quantized tensor: the readers of one norm share theirs), trained jointly
with Adam on the mean squared error between the quantized layer's output (INT4 weights, every
activation quantizer on) and the float layer's output (float weights, nothing quantized) for the
same calibration inputs, one batch a step. The error is each token's relative to its norm
(``--a-clip-learn-loss token``, :func:`quadllm.core.clipping.block_error`), since the next layer's
RMSNorm divides every token by its norm; the plain squared error (``mse``) lets the few tokens with
huge hidden states choose the ratios, and was measured worse (results/smollm2_ablation.md). The rounding is a straight-through estimator, so the
ratio gets LSQ's gradient (:func:`quadllm.core.quantizers.fake_quant_act`).

The ratios start from what the layer has (the grid search's, or ``--a-clip``) and are kept only if
the error over all calibration batches went down; they are stored like the searched ones (the
``act_clip`` buffer), rounded to :data:`~quadllm.core.clipping.LEARNED_CLIP_STEP`, so nothing changes
at run time. Cost: the float layer's outputs once per calibration batch (held in memory, as large as
the layer's inputs), ``STEPS`` forward and backward passes of one layer on one batch, and two
forward passes over all batches (the error before and after).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import ArchAdapter
from ..core.clipping import LEARNED_CLIP_MIN, round_learned_clip
from .calibration import LayerInputs, input_owners
from .layer_fit import act_quantized_linears, act_quantizers_on, float_targets, layer_error, train_layer

log = logging.getLogger(__name__)

__all__ = ["LEARN_LR", "learn_layer_act_clips"]

#: Adam's learning rate for the clip ratios (about 0.3 of movement over 60 steps at most)
LEARN_LR = 5e-3


@torch.no_grad()
def learn_layer_act_clips(layer: nn.Module, adapter: ArchAdapter, inputs: LayerInputs, reference: nn.Module,
                          steps: int, index: int, loss: str = "token") -> dict[str, float]:
    """Train the clip ratio of every activation-quantized linear of ``layer`` (weights quantized)
    for ``steps`` batches of ``inputs`` against ``reference``
    (:func:`~quadllm.steps.layer_fit.float_copy`, taken before the weights were quantized) on the
    error ``loss`` names (:func:`~quadllm.core.clipping.block_error`); returns the ratio each linear
    keeps (unchanged where training did not lower the error over all batches)."""
    lins = act_quantized_linears(layer, adapter)
    names = list(lins)
    if not names or steps <= 0:
        return {}
    owners = input_owners(layer, adapter, names)
    start = {owner: float(lins[owner].act.clip_ratio) for owner in set(owners.values())}
    params = {owner: torch.tensor(c, dtype=torch.float32, requires_grad=True) for owner, c in start.items()}
    targets = float_targets(reference, inputs)
    try:
        for name in names:
            lins[name].clip_param = params[owners[name]]
        with act_quantizers_on(lins.values()):
            err_start = layer_error(layer, inputs, targets, loss)

            def clamp() -> None:
                for p in params.values():
                    p.clamp_(LEARNED_CLIP_MIN, 1.0)

            train_layer(layer, inputs, targets, list(params.values()), steps, LEARN_LR, loss, after_step=clamp)
            for p in params.values():
                p.fill_(round_learned_clip(float(p)))
            err_end = layer_error(layer, inputs, targets, loss)
        if not err_end < err_start:  # worse, or NaN
            for owner, p in params.items():
                p.fill_(start[owner])
    finally:
        for lin in lins.values():
            lin.clip_param = None
    kept = err_end < err_start
    chosen = {name: float(params[owners[name]]) for name in names}
    for name, clip in chosen.items():
        lins[name].set_act_clip(clip)
    log.debug("layer %d: learned clips %s, output error %.4g -> %.4g (%s)", index,
              {o: round(float(p), 4) for o, p in params.items()}, err_start, err_end, "kept" if kept else "discarded")
    return chosen
