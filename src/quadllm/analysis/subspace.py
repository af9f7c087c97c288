"""The outlier subspace as linear algebra (pure functions, float64).

``M`` is a residual-stream second moment ``E[x xᵀ]`` (d×d, symmetric PSD), ``P`` a d×r matrix
with orthonormal columns. The energy a subspace captures is ``tr(Pᵀ M P) / tr(M)``: the share of
``E|x|²`` that lies in it; the top-r eigenvectors of ``M`` capture the most any r-dimensional
subspace can (Ky Fan), so ``captured / best`` says how well a saved subspace still fits new data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import QuadllmError
from ..nn.modules import QuadEmbedding

__all__ = ["spectrum", "top_subspace", "energy_captured", "best_energy", "energy_by_rank", "principal_angles",
           "SubspaceError", "saved_subspace"]


def _sym(m: torch.Tensor) -> torch.Tensor:
    m = m.to(torch.float64)
    return (m + m.T) / 2


def spectrum(moment: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``moment`` in descending order (negative rounding noise clipped to 0)."""
    return torch.linalg.eigvalsh(_sym(moment)).flip(0).clamp_min(0)


def top_subspace(moment: torch.Tensor, rank: int) -> torch.Tensor:
    """The d×rank matrix of the eigenvectors of ``moment`` with the largest eigenvalues."""
    evals, evecs = torch.linalg.eigh(_sym(moment))
    return evecs[:, torch.argsort(evals, descending=True)[:rank]]


def energy_captured(moment: torch.Tensor, P: torch.Tensor) -> float:
    """``tr(Pᵀ M P) / tr(M)`` for ``P`` with orthonormal columns."""
    m = _sym(moment)
    P = P.to(torch.float64)
    return float(torch.trace(P.T @ m @ P) / torch.trace(m))


def best_energy(evals_desc: torch.Tensor, rank: int) -> float:
    """The largest energy share any rank-dimensional subspace captures."""
    return float(evals_desc[:rank].sum() / evals_desc.sum())


def energy_by_rank(evals_desc: torch.Tensor, ranks: list[int]) -> dict[int, float]:
    return {r: best_energy(evals_desc, r) for r in ranks}


def principal_angles(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Principal angles (radians, ascending) between the column spaces of ``A`` and ``B``
    (orthonormal columns): ``arccos`` of the singular values of ``Aᵀ B``."""
    s = torch.linalg.svdvals(A.to(torch.float64).T @ B.to(torch.float64)).clamp(-1, 1)
    return torch.arccos(s).sort().values


class SubspaceError(QuadllmError, ValueError):
    """A model without the outlier subspace an analysis needs."""


def saved_subspace(model: nn.Module, original: nn.Module | None = None) -> torch.Tensor:
    """The outlier subspace a QUAD model was built with (orthonormal columns, [d, r]).

    quadllm's layout: the embedding map is ``Qᵀ`` with ``Q = [P H_r, (I - PPᵀ) H_d]``, so its first r
    rows are ``(P H_r)ᵀ``: the same column space as ``P`` (``H_r`` is orthogonal).
    The stock layout (:mod:`quadllm.io.stock_layout`) stores only the product of the original table
    ``E`` and that map, rounded to FP16; its first r columns are ``E P H_r``, so ``P H_r`` is their
    least-squares solution against the ``original`` model's table (``E`` has full column rank), good
    to the tables' FP16 rounding."""
    info = getattr(model, "quadllm_info", None) or {}
    r = int((info.get("structure") or {}).get("rank", 0))
    if r == 0:
        raise SubspaceError("this model has no outlier subspace (not a QUAD model, or rank 0)")
    emb = next((m for m in model.modules() if isinstance(m, QuadEmbedding)), None)
    if emb is not None and emb.proj is not None:
        return emb.proj[:r].T.to(torch.float64)
    if emb is not None or original is None:
        raise SubspaceError("the outlier subspace of a checkpoint in the stock layout is read against the "
                            "original model's embedding, which was not given")
    table = original.get_input_embeddings().weight.detach().to(torch.float64)
    fused = model.get_input_embeddings().weight.detach()[:, :r].to(torch.float64)
    if table.shape[0] != fused.shape[0]:
        raise SubspaceError(f"the original model's vocabulary ({table.shape[0]}) is not the checkpoint's "
                            f"({fused.shape[0]})")
    basis, _ = torch.linalg.qr(torch.linalg.lstsq(table, fused).solution)
    return basis
