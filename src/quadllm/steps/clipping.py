"""The activation clip ratio of every linear input of one decoder layer, searched on the
calibration data (``--a-clip-search``), after the layer's weights are quantized.

The groups of linears go in forward order (q/k/v, o_proj, gate/up, down_proj), each group's
inputs captured with the activation quantizers of the groups before it already on, so o_proj's
clip is chosen for the attention output the quantized q/k/v actually produce. The linears that
read one tensor (the readers of one norm) share one clip ratio, so that tensor is quantized once
at run time. The target of each linear is its full-precision weight (before GPTQ or RTN) applied
to the same input; the math is :func:`quadllm.core.clipping.search_act_clip`.

A stride over the calibration tokens keeps at most :data:`CLIP_SEARCH_TOKENS` of them, so the
search costs about 11 matrix products of that many rows per linear.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..core.clipping import search_act_clip
from ..nn.modules import QuadLinear
from .calibration import LayerInputs, capture_group

log = logging.getLogger(__name__)

__all__ = ["CLIP_SEARCH_TOKENS", "float_weights", "search_layer_act_clips"]

#: calibration tokens (at most) on which each clip ratio is chosen
CLIP_SEARCH_TOKENS = 2048


def float_weights(layer: nn.Module, adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    """A copy of the float weights of the layer's linears (before their quantization): the
    search's full-precision targets."""
    return {name: get_submodule(layer, name).weight.detach().clone() for name in adapter.all_linears}


@torch.no_grad()
def search_layer_act_clips(layer: nn.Module, adapter: ArchAdapter, inputs: LayerInputs,
                           reference: dict[str, torch.Tensor], index: int) -> dict[str, float]:
    """Set the clip ratio of every activation-quantized linear of ``layer`` (quantized weights)
    from ``inputs`` (the layer's calibration inputs) and ``reference`` (:func:`float_weights`
    taken before the weights were quantized); returns the ratio chosen per linear."""
    lins: dict[str, QuadLinear] = {name: get_submodule(layer, name) for name in adapter.all_linears}
    before = {name: lin.act_enabled for name, lin in lins.items()}
    tokens = sum(h.shape[0] * h.shape[1] for h in inputs.hidden)
    stride = max(1, math.ceil(tokens / CLIP_SEARCH_TOKENS))
    chosen: dict[str, float] = {}
    try:
        for lin in lins.values():
            lin.act_enabled = True
        for group in adapter.sequential_groups:
            names = [n for n in group if lins[n].act.enabled]
            if not names:
                continue
            rows: dict[str, list[torch.Tensor]] = {}

            def keep(owner: str, x: torch.Tensor) -> None:
                rows.setdefault(owner, []).append(x.detach().reshape(-1, x.shape[-1])[::stride].float())

            owners = capture_group(layer, adapter, names, inputs, keep)
            for owner, xs in rows.items():
                readers = [n for n in names if owners[n] == owner]
                x = torch.cat(xs)
                weights = [lins[n].full_weight().detach().float() for n in readers]
                targets = [x @ reference[n].float().T for n in readers]
                lead = lins[owner]
                best, errors = search_act_clip(x, weights, targets, lead.rank, lead.act.bits, lead.act.sym)
                for n in readers:
                    lins[n].set_act_clip(best)
                    chosen[n] = best
                log.debug("layer %d %s: clip %.4f (error %.4g, %.4g at 1.0)", index, "/".join(readers), best,
                          errors[best], errors[1.0])
    finally:
        for name, lin in lins.items():
            lin.act_enabled = before[name]
    return chosen
