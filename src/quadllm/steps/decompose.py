"""The outlier subspace of down_proj's input, kept in full precision (``--down-rank k``).

QUAD decomposes the residual stream only; the MLP's intermediate activations (down_proj's input)
reach INT4 after the online Hadamard alone. This step fits, per decoder layer, the top-k principal
directions of that input (after the Hadamard, activation quantization off, on the layer's
calibration inputs) and replaces down_proj by the exact split of
:mod:`quadllm.core.decompose`: its first ``k`` input coordinates, the projections on those
directions, stay in full precision as QUAD's outlier columns do; the rest is quantized as before.
It runs before the layer's weights are quantized, so GPTQ sees the split input.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..core.decompose import SubspaceSplit, split_weight, top_eigenvectors
from ..nn.modules import QuadLinear
from .calibration import CalibrationError, LayerInputs, MomentAccumulator, capture_group

log = logging.getLogger(__name__)

__all__ = ["split_linear", "decompose_down_proj", "empty_split_transform"]


def split_linear(lin: QuadLinear, basis: torch.Tensor) -> None:
    """Make the float ``lin`` compute the same map through :class:`SubspaceSplit` (``basis`` [n, k]
    in the coordinates ``lin`` reads after its own transform), in place so that every reference to
    the module and its flags stay valid; its first ``k`` inputs become its rank."""
    if lin.quantized or lin.rank:
        raise ValueError("only a float linear without outlier columns can be split")
    dtype = lin.weight.dtype
    k = basis.shape[1]
    weight = split_weight(lin.weight.detach(), basis).to(dtype)
    lin.transform = SubspaceSplit(basis.to(dtype), lin.transform)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    lin.in_features += k
    lin.rank = k
    lin.drop_dequantized()


def empty_split_transform(lin: nn.Module, base: nn.Module | None, k: int, dtype: torch.dtype) -> SubspaceSplit:
    """The split transform's skeleton for loading a checkpoint (its basis comes from the file)."""
    return SubspaceSplit(torch.zeros(lin.in_features, k, dtype=dtype).fill_diagonal_(1.0), base)


@torch.no_grad()
def decompose_down_proj(layer: nn.Module, adapter: ArchAdapter, inputs: LayerInputs, k: int,
                        index: int) -> float:
    """Split ``layer``'s down_proj along the top-``k`` eigenvectors of its input's second moment on
    ``inputs``; returns the share of that input's energy they hold. Activation quantization must be
    off (the caller's job), so the moment is that of the float input."""
    name = adapter.down_proj
    lin: QuadLinear = get_submodule(layer, name)
    if not 0 < k < lin.in_features:
        raise ValueError(f"--down-rank {k} must be in [1, {lin.in_features}) (the intermediate size)")
    acc = MomentAccumulator(lin.in_features)
    try:
        capture_group(layer, adapter, [name], inputs, lambda _owner, x: acc.add(x))
    except CalibrationError as exc:
        raise CalibrationError(f"layer {index} {name}: {exc}") from exc
    moment = acc.moment
    basis = top_eigenvectors(moment, k)
    energy = float((basis.T @ moment @ basis).trace() / moment.trace().clamp_min(1e-30))
    split_linear(lin, basis)
    log.debug("layer %d %s: top-%d directions hold %.1f%% of the input energy", index, name, k, 100 * energy)
    return energy
