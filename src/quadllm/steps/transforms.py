"""Exact (function-preserving) transforms of a transformers model into the QUAD basis.

Each step, per decoder layer (and for the embedding, final norm and head), leaves the model's
outputs unchanged up to rounding; :class:`quadllm.pipelines.recipe.LayerRecipe` applies them in order:

1. :func:`prepare_layer` / :func:`prepare_ends` swap in quadllm's modules and fuse every norm gain
   into the linears that read it (the final norm's gain into the head's input map).
2. :func:`residual_basis` builds ``Q = [P·H_r, (I - P Pᵀ)·H_d]`` (d × (d+r)) from the top-r
   eigenvectors P of the residual stream's second moment; ``Q Qᵀ = I``.
3. :func:`transform_layer` / :func:`transform_ends` move the residual stream to ``h' = Qᵀ h``:
   readers become ``W Q``, writers ``Qᵀ W``, the embedding gains ``Qᵀ`` and the head ``Q``.
4. :func:`online_transform_layer` adds QuaRot's online rotations: a Hadamard before down_proj,
   and before o_proj an orthogonal mix across heads (Hadamard when the head count has one, an
   orthonormal DCT otherwise, e.g. SmolLM2's 9 heads) combined with a per-head Hadamard fused
   into v_proj.
5. :func:`attach_layer_kv_quant` (not exact: the KV cache's fake quantizer) and
   :func:`set_layer_activation_quant` (the linears' activation quantizers) prepare quantization.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule, set_submodule
from ..config import QuantConfig, module_key
from ..core.decompose import eigenvectors_descending
from ..core.hadamard import OnlineTransform, kron_transform, orthogonal_matrix, random_hadamard
from ..nn.modules import KVQuant, QuadEmbedding, QuadHead, QuadLinear, QuadRMSNorm
from .calibration import CalibrationError

log = logging.getLogger(__name__)


def norm_eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps", "epsilon"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise NotImplementedError(f"cannot find epsilon of {type(norm).__name__}")


def _norm_gain(norm: nn.Module, dim: int) -> torch.Tensor:
    w = getattr(norm, "weight", None)
    if w is None:
        return torch.ones(dim, dtype=torch.float64)
    return w.detach().to(torch.float64)


def _to_quad_linear(lin: nn.Linear, weight: torch.Tensor, dtype: torch.dtype) -> QuadLinear:
    q = QuadLinear(weight.shape[1], weight.shape[0], bias=lin.bias is not None, dtype=dtype)
    q.weight.data.copy_(weight.to(dtype))
    if lin.bias is not None:
        q.bias.data.copy_(lin.bias.detach().to(dtype))
    return q


@torch.no_grad()
def prepare_layer(layer: nn.Module, adapter: ArchAdapter, dtype: torch.dtype) -> None:
    """One decoder layer of :func:`prepare_layer`: quadllm linears, norm gains fused into readers."""
    d = adapter.hidden_size
    for group in adapter.reader_groups:
        norm = get_submodule(layer, group.norm)
        g = _norm_gain(norm, d)
        for name in group.linears:
            lin = get_submodule(layer, name)
            w = lin.weight.detach().to(torch.float64) * g.unsqueeze(0)
            set_submodule(layer, name, _to_quad_linear(lin, w, dtype))
        set_submodule(layer, group.norm, QuadRMSNorm(d, norm_eps(norm)))
    for name in adapter.writers:
        lin = get_submodule(layer, name)
        set_submodule(layer, name, _to_quad_linear(lin, lin.weight.detach(), dtype))


@torch.no_grad()
def prepare_ends(model: nn.Module, adapter: ArchAdapter, dtype: torch.dtype) -> None:
    """The embedding, final norm and head part of :func:`prepare_layer` (final gain into the head)."""
    d = adapter.hidden_size
    final = adapter.final_norm(model)
    g = _norm_gain(final, d)
    adapter.set_final_norm(model, QuadRMSNorm(d, norm_eps(final)))
    emb = adapter.embedding(model)
    head = adapter.head(model)
    tied = adapter.tied and head.weight is emb.weight
    qemb = QuadEmbedding(emb.weight.detach(), None)
    adapter.set_embedding(model, qemb)
    head_bias = getattr(head, "bias", None)
    proj = torch.diag(g).to(dtype)
    if tied:
        qhead = QuadHead(proj, tied_to=qemb, bias=None if head_bias is None else head_bias.detach())
    else:
        qhead = QuadHead(proj, weight=head.weight.detach(), bias=None if head_bias is None else head_bias.detach())
    adapter.set_head(model, qhead)
    model.config.quadllm_tied_head = tied


def residual_basis(moment: torch.Tensor | None, rank: int, seed: int, rotate: bool = True,
                   hidden_size: int | None = None) -> torch.Tensor:
    """``Q`` [d, d+r], with ``Q Qᵀ = I``.

    ``P`` = the ``rank`` eigenvectors of ``moment`` with the largest eigenvalues; the r part is
    rotated by a randomized Hadamard ``H_r`` and the d part by ``H_d`` (seeded). ``rank == 0``
    gives QuaRot's ``H_d``; ``rotate=False`` with rank 0 gives the identity.
    """
    if moment is None and rank:
        raise ValueError("a second moment is needed for rank > 0")
    d = moment.shape[0] if moment is not None else hidden_size
    if moment is not None and not torch.isfinite(moment).all():
        raise CalibrationError("the residual second moment has NaN or Inf entries (bad calibration data?)")
    if rank and rank > d:
        raise ValueError(f"rank {rank} is larger than the hidden size {d}")
    if rank == 0:
        if d is None:
            raise ValueError("hidden size unknown")
        return random_hadamard(d, seed) if rotate else torch.eye(d, dtype=torch.float64)
    P = eigenvectors_descending(moment)[:, :rank]
    Hr = random_hadamard(rank, seed + 1) if rotate else torch.eye(rank, dtype=torch.float64)
    Hd = random_hadamard(d, seed) if rotate else torch.eye(d, dtype=torch.float64)
    rest = torch.eye(d, dtype=torch.float64) - P @ P.T
    return torch.cat([P @ Hr, rest @ Hd], dim=1)


@torch.no_grad()
def transform_ends(model: nn.Module, adapter: ArchAdapter, Q: torch.Tensor) -> None:
    """The embedding gains ``Qᵀ`` and the head ``Q``."""
    Q = Q.to(torch.float64)
    emb: QuadEmbedding = adapter.embedding(model)
    dtype = emb.proj.dtype if emb.proj is not None else adapter.head(model).proj.dtype
    d = Q.shape[0]
    old = emb.proj.detach().to(torch.float64) if emb.proj is not None else torch.eye(d, dtype=torch.float64)
    emb.proj = nn.Parameter((Q.T @ old).to(dtype), requires_grad=False)
    head: QuadHead = adapter.head(model)
    hp = head.proj.detach().to(torch.float64) if head.proj is not None else torch.eye(d, dtype=torch.float64)
    head.proj = nn.Parameter((hp @ Q).to(dtype), requires_grad=False)


@torch.no_grad()
def transform_layer(layer: nn.Module, adapter: ArchAdapter, Q: torch.Tensor, rank: int) -> None:
    """One decoder layer in the basis ``h' = Qᵀ h``: readers ``W Q``, writers ``Qᵀ W``."""
    Q = Q.to(torch.float64)
    for group in adapter.reader_groups:
        for name in group.linears:
            lin: QuadLinear = get_submodule(layer, name)
            dtype = lin.weight.dtype
            w = lin.weight.detach().to(torch.float64) @ Q
            new = QuadLinear(w.shape[1], w.shape[0], rank=rank, bias=lin.bias is not None, dtype=dtype)
            new.weight.data.copy_(w.to(dtype))
            if lin.bias is not None:
                new.bias.data.copy_(lin.bias)
            set_submodule(layer, name, new)
    for name in adapter.writers:
        lin = get_submodule(layer, name)
        dtype = lin.weight.dtype
        w = Q.T @ lin.weight.detach().to(torch.float64)
        new = QuadLinear(w.shape[1], w.shape[0], bias=lin.bias is not None, dtype=dtype, transform=lin.transform)
        new.weight.data.copy_(w.to(dtype))
        if lin.bias is not None:
            new.bias.data.copy_((Q.T @ lin.bias.detach().to(torch.float64)).to(dtype))
        set_submodule(layer, name, new)


def head_rotation(head_dim: int) -> torch.Tensor:
    """The per-head orthogonal map (normalized Hadamard, or DCT when none exists)."""
    return orthogonal_matrix(head_dim)


def online_transforms(adapter: ArchAdapter, layer: nn.Module) -> dict[str, OnlineTransform]:
    """The online transform before each writer of ``layer`` that carries one: the Hadamard of the
    intermediate size before down_proj, the mixing across heads before o_proj."""
    return {adapter.down_proj: OnlineTransform.hadamard(get_submodule(layer, adapter.down_proj).in_features),
            adapter.o_proj: OnlineTransform.mixing(adapter.num_heads, adapter.head_dim)}


@torch.no_grad()
def online_transform_layer(layer: nn.Module, adapter: ArchAdapter) -> None:
    """Hadamard before down_proj; head mixing before o_proj with a per-head Hadamard fused into v_proj."""
    nh, nkv, hd = adapter.num_heads, adapter.num_kv_heads, adapter.head_dim
    H_hd = head_rotation(hd)
    transforms = online_transforms(adapter, layer)
    down: QuadLinear = get_submodule(layer, adapter.down_proj)
    t = transforms[adapter.down_proj]
    _fuse_input_transform(down, t, [f.to(torch.float64) if isinstance(f, torch.Tensor) else f for f in t.factors()])

    v: QuadLinear = get_submodule(layer, adapter.v_proj)
    wv = v.weight.detach().to(torch.float64).reshape(nkv, hd, -1)
    v.weight.data.copy_(torch.einsum("ij,hjk->hik", H_hd, wv).reshape(nkv * hd, -1).to(v.weight.dtype))
    if v.bias is not None:
        bv = v.bias.detach().to(torch.float64).reshape(nkv, hd)
        v.bias.data.copy_((bv @ H_hd.T).reshape(-1).to(v.bias.dtype))

    o: QuadLinear = get_submodule(layer, adapter.o_proj)
    o.weight.data.copy_(kron_transform(o.weight.detach().to(torch.float64),
                                       [orthogonal_matrix(nh), H_hd]).to(o.weight.dtype))
    o.transform = transforms[adapter.o_proj]


def _fuse_input_transform(lin: QuadLinear, transform: OnlineTransform, factors: list[torch.Tensor]) -> None:
    """Online ``x -> T x`` before ``lin`` and ``W -> W Tᵀ`` so that ``lin`` is unchanged."""
    lin.weight.data.copy_(kron_transform(lin.weight.detach().to(torch.float64), factors).to(lin.weight.dtype))
    lin.transform = transform


def kv_rotation(adapter: ArchAdapter, rotate: bool) -> torch.Tensor | None:
    return head_rotation(adapter.head_dim).T.contiguous() if rotate else None


def attach_layer_kv_quant(layer: nn.Module, adapter: ArchAdapter, bits: int, clip: float,
                          rot: torch.Tensor | None) -> None:
    attn = get_submodule(layer, adapter.attention)
    dtype = next(layer.parameters()).dtype
    attn.quad_kv = KVQuant(bits, clip, None if rot is None else rot.to(dtype).clone())  # one per layer


def set_layer_activation_quant(layer: nn.Module, adapter: ArchAdapter, config: QuantConfig, index: int) -> None:
    """The activation quantizer of every linear of decoder layer ``index`` (the mode's, or an override's)."""
    for name in adapter.all_linears:
        lin: QuadLinear = get_submodule(layer, name)
        lin.act = config.act_spec(adapter.role(name), module_key(index, name))


def set_activation_quant(model: nn.Module, adapter: ArchAdapter, config: QuantConfig) -> None:
    for index, layer in enumerate(adapter.layers(model)):
        set_layer_activation_quant(layer, adapter, config, index)


def weight_quantized_names(adapter: ArchAdapter, config: QuantConfig, index: int,
                           names: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The linears of decoder layer ``index`` (of ``names``, default all) whose weights are quantized:
    all but those an override keeps in full precision."""
    return tuple(name for name in (adapter.all_linears if names is None else names)
                 if config.module_setting(adapter.role(name), module_key(index, name)).weights)


def set_act_enabled(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, QuadLinear):
            m.act_enabled = enabled
