"""The outlier subspaces of the inputs QUAD leaves alone, kept in full precision: down_proj's
(``--down-rank k``) and o_proj's (``--o-rank k``).

QUAD decomposes the residual stream only; the MLP's intermediate activations (down_proj's input)
reach INT4 after the online Hadamard alone. This step fits, per decoder layer, the top-k principal
directions of that input (after the Hadamard, activation quantization off, on the layer's
calibration inputs) and replaces down_proj by the exact split of
:mod:`quadllm.core.decompose`: its first ``k`` input coordinates, the projections on those
directions, stay in full precision as QUAD's outlier columns do; the rest is quantized as before.
It runs before the layer's weights are quantized, so GPTQ sees the split input.

o_proj's input is the attention output, each head a mixture of its KV head's values: the top-k
principal coordinates of each KV head's values (:func:`~quadllm.core.decompose.head_basis`) are
fused into v_proj's rows and o_proj's columns, and o_proj reads the first k coordinates of every
head in full precision (:class:`~quadllm.core.decompose.Reordered` puts them first after the online
mixing across heads). Nothing is added online but a reordering, and no width.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..core.decompose import Reordered, SubspaceSplit, head_basis, leading_order, split_weight, top_eigenvectors
from ..nn.modules import QuadLinear
from .calibration import CalibrationError, LayerInputs, MomentAccumulator, capture_group, run_layer

log = logging.getLogger(__name__)

__all__ = ["split_linear", "decompose_down_proj", "empty_split_transform", "decompose_o_proj", "o_rank_transform"]


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


def o_rank_transform(adapter: ArchAdapter, base: nn.Module | None, k: int) -> Reordered:
    """o_proj's online transform with ``--o-rank k``: ``base`` (the mixing across heads), then the
    first ``k`` coordinates of every head first."""
    return Reordered(leading_order(adapter.num_heads, adapter.head_dim, k), base)


@torch.no_grad()
def decompose_o_proj(layer: nn.Module, adapter: ArchAdapter, inputs: LayerInputs, k: int, index: int) -> float:
    """Rotate each KV head's values of ``layer`` to their principal coordinates on ``inputs`` (v_proj's
    rows), with the inverse in o_proj's columns, and keep the first ``k`` of every head in full
    precision in o_proj; returns the share of the values' energy those coordinates hold. Exact on
    the float layer. Activation quantization must be off (the caller's job)."""
    nh, nkv, hd = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    v: QuadLinear = get_submodule(layer, adapter.v_proj)
    o: QuadLinear = get_submodule(layer, adapter.o_proj)
    if not 0 < k < hd:
        raise ValueError(f"--o-rank {k} must be in [1, {hd}) (the head dimension)")
    if o.quantized or o.rank or v.quantized:
        raise ValueError("o_proj and v_proj must be float, and o_proj without outlier columns")
    acc = torch.zeros(nkv, hd, hd, dtype=torch.float64)
    count = 0

    def add(_m, _args, out: torch.Tensor) -> None:
        nonlocal count
        vals = out.detach().reshape(-1, nkv, hd).to(torch.float64)
        if not torch.isfinite(vals).all():
            raise CalibrationError(f"layer {index} {adapter.v_proj}: NaN or Inf in the values")
        acc.add_(torch.einsum("tgi,tgj->gij", vals, vals))
        count += vals.shape[0]

    handle = v.register_forward_hook(add)
    try:
        for h, kw in zip(inputs.hidden, inputs.kwargs):
            run_layer(layer, h, kw)
    finally:
        handle.remove()
    moments = acc / max(count, 1)
    rot = torch.stack([head_basis(moments[g], k) for g in range(nkv)])  # [nkv, hd, hd]
    top = rot[:, :k]  # the rows that project on the top-k directions: their energy, without a second eigh
    energy = float((torch.einsum("gki,gij,gkj->g", top, moments, top)
                    / torch.einsum("gii->g", moments).clamp_min(1e-30)).mean())

    wv = v.weight.detach().to(torch.float64).reshape(nkv, hd, -1)
    v.weight.data.copy_(torch.einsum("gij,gjk->gik", rot, wv).reshape(nkv * hd, -1).to(v.weight.dtype))
    if v.bias is not None:
        bv = v.bias.detach().to(torch.float64).reshape(nkv, hd, 1)
        v.bias.data.copy_(torch.einsum("gij,gjk->gik", rot, bv).reshape(-1).to(v.bias.dtype))
    v.drop_dequantized()

    # o_proj read T a (T: its online transform); the values now give a_new = B a, so it must read
    # z = (T a_new)[order] with weight W T Bᵀ Tᵀ, columns in the same order
    per_head = rot[torch.arange(nh) // (nh // nkv)]
    B = torch.block_diag(*per_head)
    T = o.transform.dense().to(torch.float64) if o.transform is not None else torch.eye(nh * hd, dtype=torch.float64)
    w = o.weight.detach().to(torch.float64) @ T @ B.T @ T.T
    transform = o_rank_transform(adapter, o.transform, k)
    o.weight = nn.Parameter(w[:, transform.index].to(o.weight.dtype), requires_grad=False)
    o.transform = transform
    o.rank = nh * k
    o.drop_dequantized()
    log.debug("layer %d %s: top-%d coordinates per head hold %.1f%% of the values' energy", index,
              adapter.o_proj, k, 100 * energy)
    return energy
