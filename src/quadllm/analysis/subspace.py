"""The outlier subspace as linear algebra (pure functions, float64).

``M`` is a residual-stream second moment ``E[x xᵀ]`` (d×d, symmetric PSD), ``P`` a d×r matrix
with orthonormal columns. The energy a subspace captures is ``tr(Pᵀ M P) / tr(M)``: the share of
``E|x|²`` that lies in it; the top-r eigenvectors of ``M`` capture the most any r-dimensional
subspace can (Ky Fan), so ``captured / best`` says how well a saved subspace still fits new data.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.modules import QuadEmbedding

__all__ = ["spectrum", "top_subspace", "energy_captured", "best_energy", "energy_by_rank", "principal_angles",
           "saved_subspace"]


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


def saved_subspace(model: nn.Module) -> torch.Tensor:
    """The outlier subspace a QUAD model was built with, from its embedding map.

    The embedding map is ``Qᵀ`` with ``Q = [P H_r, (I - PPᵀ) H_d]``, so its first r rows are
    ``(P H_r)ᵀ``: the same column space as ``P`` (``H_r`` is orthogonal)."""
    emb = next((m for m in model.modules() if isinstance(m, QuadEmbedding)), None)
    info = getattr(model, "quadllm_info", None) or {}
    r = int((info.get("structure") or {}).get("rank", 0))
    if emb is None or emb.proj is None or r == 0:
        raise ValueError("this model has no outlier subspace (not a QUAD model, or rank 0)")
    return emb.proj[:r].T.to(torch.float64)
