"""Splitting a linear's input into its top principal coordinates and the rest (``--down-rank``).

QUAD's residual basis ``Q = [P, I - P Pᵀ]`` keeps the outlier subspace of the residual stream in
full precision. The same split applies to the input ``z`` of any one linear ``y = W z``:

    u = Pᵀ z                 (k coordinates, full precision)
    e = z - P u              (n coordinates, quantized)
    y = [W P, W (I - P Pᵀ)] · [u; e] = W P Pᵀ z + W (I - P Pᵀ) z = W z

because ``(I - P Pᵀ)`` is idempotent when ``P`` has orthonormal columns. Unlike the residual
basis it cannot be fused into the writers of ``z`` (the MLP's SiLU product is not linear), so it
runs online: two products with ``P`` (``2·k·n`` multiply-adds per token). ``P`` is the top-k
eigenvectors of ``E[z zᵀ]`` on the calibration data, so ``e`` carries the least energy any
rank-k split leaves behind.

The o_proj input (``--o-rank``) is split without extra width: each KV head's values are rotated
offline (:func:`head_basis`, fused into v_proj and o_proj) so that their top principal coordinates
come first in every head; the online mixing across heads keeps that set of coordinates closed, and
:class:`Reordered` puts them first, where o_proj keeps them in full precision.
"""

from __future__ import annotations

import torch
from torch import nn

from .hadamard import orthogonal_matrix

__all__ = ["eigenvectors_descending", "top_eigenvectors", "split_weight", "SubspaceSplit", "head_basis", "leading_order", "Reordered"]


def eigenvectors_descending(moment: torch.Tensor) -> torch.Tensor:
    """All orthonormal eigenvectors [n, n] (float64, as columns) of the symmetric ``moment``
    (symmetrized first), by decreasing eigenvalue: the one eigendecomposition every principal
    subspace here is cut from."""
    m = moment.to(torch.float64)
    evals, evecs = torch.linalg.eigh((m + m.T) / 2)
    return evecs[:, torch.argsort(evals, descending=True)]


def top_eigenvectors(moment: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` orthonormal eigenvectors [n, k] (float64) of the symmetric ``moment`` [n, n] with
    the largest eigenvalues, largest first."""
    if moment.ndim != 2 or moment.shape[0] != moment.shape[1]:
        raise ValueError(f"moment must be square, got {tuple(moment.shape)}")
    if not 0 < k < moment.shape[0]:
        raise ValueError(f"k={k} must be in [1, {moment.shape[0]})")
    if not torch.isfinite(moment).all():
        raise FloatingPointError("the second moment has NaN or Inf entries")
    return eigenvectors_descending(moment)[:, :k].contiguous()


def split_weight(weight: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``[W P, W (I - P Pᵀ)]`` [out, k + n] (float64) for ``weight`` W [out, n] and ``basis`` P [n, k]:
    the weight that reads :class:`SubspaceSplit`'s output and computes ``W z``."""
    w = weight.to(torch.float64)
    p = basis.to(torch.float64)
    wp = w @ p
    return torch.cat([wp, w - wp @ p.T], dim=1)


class SubspaceSplit(nn.Module):
    """Online ``z -> [Pᵀ z, z - P Pᵀ z]`` after an optional ``base`` transform (``z = base(x)``).

    ``basis`` P [n, k] is a buffer (saved in the checkpoint); the output has ``k + n`` coordinates,
    the first ``k`` of which the reading :class:`~quadllm.nn.modules.QuadLinear` keeps in full
    precision (its ``rank``)."""

    def __init__(self, basis: torch.Tensor, base: nn.Module | None = None) -> None:
        super().__init__()
        if basis.ndim != 2 or not 0 < basis.shape[1] < basis.shape[0]:
            raise ValueError(f"basis must be [n, k] with 0 < k < n, got {tuple(basis.shape)}")
        self.base = base
        self.register_buffer("basis", basis.detach().clone(memory_format=torch.contiguous_format))

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    @property
    def in_features(self) -> int:
        return self.basis.shape[0]

    @property
    def out_features(self) -> int:
        return self.basis.shape[0] + self.basis.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x) if self.base is not None else x
        p = self.basis.to(z.dtype)
        u = z @ p
        return torch.cat([u, z - u @ p.T], dim=-1)

    def extra_repr(self) -> str:
        return f"n={self.in_features}, k={self.rank}"


# --- the o_proj input: per-KV-head principal coordinates (``--o-rank``) --------------------------

def head_basis(moment: torch.Tensor, k: int) -> torch.Tensor:
    """The orthogonal rotation R [hd, hd] (float64) of one KV head's values whose first ``k`` output
    coordinates are the projections on the top-``k`` eigenvectors of ``moment`` (``E[v vᵀ]``, [hd, hd])
    and whose other ``hd - k`` are spread by an orthogonal (Hadamard where one exists, else DCT)
    rotation of the rest: ``R = blockdiag(I_k, O_{hd-k}) Uᵀ`` with U the eigenvectors, largest first."""
    hd = moment.shape[0]
    if not 0 < k < hd:
        raise ValueError(f"k={k} must be in [1, {hd})")
    u = eigenvectors_descending(moment)
    rest = orthogonal_matrix(hd - k)
    block = torch.block_diag(torch.eye(k, dtype=torch.float64), rest)
    return block @ u.T


def leading_order(groups: int, inner: int, k: int) -> torch.Tensor:
    """The permutation (an index [groups * inner]) that puts coordinate ``j < k`` of every group
    first, group by group, then the others in their order: the order in which a linear whose first
    ``groups * k`` inputs stay in full precision reads ``groups`` heads of ``inner`` coordinates."""
    idx = torch.arange(groups * inner).reshape(groups, inner)
    return torch.cat([idx[:, :k].reshape(-1), idx[:, k:].reshape(-1)])


class Reordered(nn.Module):
    """Online ``x -> base(x)[..., index]``: a fixed reordering of a base transform's output
    (``index`` from :func:`leading_order`, a non-persistent buffer rebuilt from the shapes)."""

    def __init__(self, index: torch.Tensor, base: nn.Module | None = None) -> None:
        super().__init__()
        if sorted(index.tolist()) != list(range(index.numel())):
            raise ValueError("index must be a permutation")
        self.base = base
        self.register_buffer("index", index.to(torch.long), persistent=False)

    @property
    def in_features(self) -> int:
        return self.index.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x) if self.base is not None else x
        return z.index_select(-1, self.index)

    def extra_repr(self) -> str:
        return f"n={self.index.numel()}"
