"""Tensor parallelism (TP > 1) for the row-parallel linears, o_proj and down_proj, simulated on one CPU.

A serving engine splits these linears by input columns: rank ``j`` holds the slice ``x_j`` of the
input (its heads, or its slice of the MLP's intermediate) and the matching weight columns, and the
partial outputs are summed by an all-reduce. A quadllm linear cannot be cut that way as it is,
for two reasons, each with its remedy:

- its online transform (QuaRot's Hadamard over the intermediate, the rotation across heads) mixes
  coordinates that live on different ranks. Either the transform is **aligned to the shards**
  (block-diagonal: ``kron(I_p, T_local)``, chosen when the model is quantized, a smaller transform
  that spreads outliers less), or every rank first **all-gathers** the input and computes its share
  of output rows (:func:`gathered_outputs`: exact for any transform, at the price of gathering the
  input instead of reducing the output);
- its per-token activation scale is the maximum over the whole row: the ranks all-reduce their
  local maxima (one number per token) before rounding (:func:`row_parallel_partials`).

The functions here are the reference of that math: they cut a :class:`~quadllm.nn.modules.QuadLinear`
into shards, compute what each rank would, and let tests check that the pieces add up to the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.hadamard import OnlineTransform
from ..core.quantizers import fake_quant_act, qrange, row_absmax
from .modules import QuadLinear

__all__ = ["aligned_transform", "gathered_outputs", "local_transform", "row_parallel_partials", "shard_bounds"]


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of each of ``shards`` equal slices of ``n`` columns."""
    if shards < 1 or n % shards:
        raise ValueError(f"{n} columns do not split into {shards} equal shards")
    size = n // shards
    return [(j * size, (j + 1) * size) for j in range(shards)]


def aligned_transform(local: OnlineTransform, shards: int) -> OnlineTransform:
    """``kron(I_shards, local)``: ``local`` applied to each shard on its own (block-diagonal)."""
    return OnlineTransform([shards, *local.factors()])


def local_transform(transform: OnlineTransform | None, shards: int) -> OnlineTransform | None:
    """The transform one rank applies to its shard (None: none), when ``transform`` is
    block-diagonal over ``shards``: its leading factors are identities whose orders multiply to a
    multiple of ``shards``.

    Raises:
        ValueError: when the transform mixes shards (a full Hadamard, the rotation across all heads).
    """
    if transform is None:
        return None
    factors = transform.factors()
    lead = 1
    for i, f in enumerate(factors):
        if not isinstance(f, int):
            break
        lead *= f
        if lead % shards == 0:
            rest = [lead // shards] if lead > shards else []
            local = rest + factors[i + 1:]
            return OnlineTransform(local) if any(not isinstance(f, int) for f in local) else None
    raise ValueError(f"the online transform [{transform.extra_repr()}] mixes coordinates across {shards} shards: "
                     "quantize with a transform aligned to them, or all-gather the input")


def gathered_outputs(layer: QuadLinear, x: torch.Tensor, shards: int) -> list[torch.Tensor]:
    """What each rank computes when it all-gathers the input: the layer on the whole ``x`` for its
    slice of output rows (the slices, concatenated, are the layer's output)."""
    with torch.no_grad():  # every rank transforms and rounds the whole input the same way
        z = layer.transform(x) if layer.transform is not None else x
        xq = z[..., layer.rank:]
        if layer.rounds_input:
            xq = fake_quant_act(xq, layer.act.bits, layer.act_clip_ratio(), layer.act.sym)
        outputs = []
        for lo, hi in shard_bounds(layer.out_features, shards):
            y = F.linear(xq, layer.dequantized_weight()[lo:hi])
            if layer.rank:
                y = y + F.linear(layer.outlier_input(z), layer.outlier_weight()[lo:hi])
            if layer.bias is not None:
                y = y + layer.bias[lo:hi]
            outputs.append(y)
    return outputs


def row_parallel_partials(layer: QuadLinear, x: torch.Tensor, shards: int) -> list[torch.Tensor]:
    """Each rank's partial output of the row-parallel ``layer`` (input columns split in ``shards``);
    their sum is the layer's output. Rank ``j`` applies the local transform to its slice, the ranks
    all-reduce (max) the per-token maximum of the quantized columns, and each multiplies its rounded
    slice by its weight columns; rank 0 holds the outlier coordinates (the first ``rank`` of its
    slice) and adds the bias.

    Raises:
        ValueError: the transform mixes shards, the outliers do not fit in shard 0, weight groups
        straddle shards, or the activations are asymmetric (their zero point needs a min/max
        all-reduce, not simulated here).
    """
    if not layer.quantized:
        raise ValueError("row_parallel_partials needs a quantized layer")
    if layer.act.enabled and not layer.act.sym:
        raise ValueError("asymmetric activations need an all-reduce of the per-token minimum and maximum")
    bounds = shard_bounds(layer.in_features, shards)
    size = bounds[0][1]
    r = layer.rank
    if r >= size:
        raise ValueError(f"{r} outlier coordinates do not fit in the first shard of {size}")
    if layer.group_size and (size % layer.group_size or r % layer.group_size):
        raise ValueError(f"weight groups of {layer.group_size} straddle shards of {size} columns")
    local = local_transform(layer.transform, shards)
    with torch.no_grad():
        z = [local(x[..., lo:hi]) if local is not None else x[..., lo:hi] for lo, hi in bounds]
        quant = [z[0][..., r:], *z[1:]]
        if layer.rounds_input:  # the all-reduce: one maximum per token
            absmax = torch.stack([row_absmax(q) for q in quant]).amax(0)
            qmin, qmax = qrange(layer.act.bits)
            scale = (absmax * layer.act_clip_ratio() / qmax).clamp_min(1e-8)
            quant = [(q / scale).round().clamp(qmin, qmax) * scale for q in quant]
        partials = []
        for j, ((lo, hi), q) in enumerate(zip(bounds, quant)):
            cols = slice(max(lo, r) - r, hi - r)
            y = F.linear(q, layer.dequantized_weight()[:, cols])
            if j == 0:
                if r:
                    y = y + F.linear(layer.outlier_input(z[0]), layer.outlier_weight())
                if layer.bias is not None:
                    y = y + layer.bias
            partials.append(y)
    return partials

