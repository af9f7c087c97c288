"""GPTQ (Frantar et al., 2022) with full-precision columns.

Weights are quantized column by column; the error of each quantized column is spread over
the columns not yet processed through the inverse Hessian of the layer inputs. Columns
listed as full precision (QUAD's outlier columns) are processed last and never quantized,
so they absorb part of the quantization error of the others.

GPTAQ (GPTQv2, Li et al., 2025) changes the target: the quantized layer, fed the inputs ``x̃`` of the
quantized model, should reproduce the full-precision layer on the full-precision model's inputs
``x``: ``min_Q Σ_t ||Q x̃_t - W x_t||²``. With ``H = Σ x̃ x̃ᵀ`` and ``C = Σ x x̃ᵀ`` this is
``||(Q - W*) x̃||² + const`` for ``W* = W C H⁻¹`` (the least-squares map from ``x̃`` to ``W x``; the
constant does not depend on Q), so GPTQ on the target :func:`gptaq_target` with the same ``H``
minimizes GPTAQ's objective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .quantizers import clipped_scales, qrange, weight_scales

__all__ = ["GPTQResult", "gptq_quantize", "gptaq_target", "rtn_quantize", "HessianAccumulator", "CrossAccumulator"]


@dataclass
class GPTQResult:
    """Integer codes of the quantized columns (original order), their scales [out, G], and the
    (updated) full-precision columns."""

    codes: torch.Tensor  # int8 [out, n_quant]
    scales: torch.Tensor  # [out, G]
    fp_columns: torch.Tensor  # [out, rank]


#: Rows of the Hessian updated by one product (a single block up to this size, as one matmul).
_HESSIAN_ROWS = 2048


class HessianAccumulator:
    """Running ``H = 2/n * sum x xᵀ`` over the rows of the inputs a linear layer sees."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise FloatingPointError("non-finite values in GPTQ calibration activations")
        n = x.shape[0]
        self.H *= self.count / (self.count + n)
        self.count += n
        x = x.to(torch.float64, copy=True).mul_(math.sqrt(2.0 / self.count))  # one float64 copy
        rows = _HESSIAN_ROWS  # H += xᵀx by row blocks: no [n, n] temporary beside H
        for i in range(0, self.H.shape[0], rows):
            self.H[i:i + rows] += x[:, i:i + rows].T @ x


class CrossAccumulator:
    """Running ``C = 2/n * sum x_ref xᵀ`` over pairs of rows: the full-precision model's input of a
    linear (``x_ref``) and the quantized model's (``x``), on the same tokens (GPTAQ)."""

    def __init__(self, n: int) -> None:
        self.C = torch.zeros(n, n, dtype=torch.float64)
        self.count = 0

    def add(self, x_ref: torch.Tensor, x: torch.Tensor) -> None:
        x_ref = x_ref.reshape(-1, x_ref.shape[-1])
        x = x.reshape(-1, x.shape[-1])
        if x_ref.shape != x.shape:
            raise ValueError(f"paired inputs differ in shape: {tuple(x_ref.shape)} and {tuple(x.shape)}")
        if not (torch.isfinite(x_ref).all() and torch.isfinite(x).all()):
            raise FloatingPointError("non-finite values in GPTAQ calibration activations")
        n = x.shape[0]
        self.C *= self.count / (self.count + n)
        self.count += n
        self.C += (2.0 / self.count) * (x_ref.to(torch.float64).T @ x.to(torch.float64))


def gptaq_target(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01,
                 alpha: float = 1.0) -> torch.Tensor:
    """``W* = W C (H + λI)⁻¹`` (float64) for ``w`` [out, in], ``H`` = ``2/n Σ x̃ x̃ᵀ`` and ``C`` =
    ``2/n Σ x x̃ᵀ`` [in, in], with GPTQ's damping ``λ = damp * mean(diag H)``: the weight that maps the
    quantized model's inputs closest to the full-precision outputs. ``alpha`` < 1 applies only that
    share of the correction, ``W + alpha (W* - W)`` (GPTAQ's authors scale it by 0.25; the whole map,
    estimated from few calibration tokens, made SmolLM2 worse in the ablation)."""
    Hd = H.to(torch.float64, copy=True)
    dead = torch.diag(Hd) == 0
    Hd[dead, dead] = 1
    Hd.diagonal().add_(damp * torch.mean(torch.diag(Hd)))
    w64 = w.to(torch.float64)
    rhs = w64 @ C.to(torch.float64)  # [out, in]
    rhs[:, dead] = 0
    L = torch.linalg.cholesky(Hd)
    full = torch.cholesky_solve(rhs.T, L).T  # H symmetric: (H⁻¹ rhsᵀ)ᵀ = rhs H⁻¹
    if alpha == 1.0:  # bit-identical to the checkpoints made before alpha existed
        return full
    return w64 + alpha * (full - w64)


def _codes(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(w / scale), qmin, qmax)


def _scales(w: torch.Tensor, bits: int, group_size: int, mse: bool, clip: torch.Tensor | None) -> torch.Tensor:
    """Scales [out, G] of ``w``: searched (``mse``) or absmax, or from the clip ratios ``clip`` [out, G]."""
    return weight_scales(w, bits, group_size, mse) if clip is None else clipped_scales(w, clip, bits, group_size)


def rtn_quantize(w: torch.Tensor, rank: int, bits: int = 4, group_size: int = 0, mse: bool = True,
                 clip: torch.Tensor | None = None) -> GPTQResult:
    """Round-to-nearest: the first ``rank`` columns stay in full precision, the rest are
    quantized with (optionally MSE-searched) symmetric scales, or with the clip ratios ``clip``
    [out, G] given (a learned weight clip)."""
    wq = w[:, rank:]
    scales = _scales(wq, bits, group_size, mse, clip)
    g = wq.shape[1] // scales.shape[1]
    codes = _codes(wq.reshape(wq.shape[0], -1, g), scales.unsqueeze(-1), bits).reshape(wq.shape)
    return GPTQResult(codes.to(torch.int8), scales.to(w.dtype), w[:, :rank].clone())


def gptq_quantize(
    w: torch.Tensor,
    H: torch.Tensor,
    rank: int,
    bits: int = 4,
    group_size: int = 0,
    mse: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = 128,
    overwrite_h: bool = False,
    clip: torch.Tensor | None = None,
) -> GPTQResult:
    """GPTQ on ``w`` [out, in] with Hessian ``H`` [in, in].

    ``clip`` [out, G]: each row's (group's) clip ratio, used instead of the ``mse`` search: the
    scale maps that share of the row's (group's, as GPTQ reaches it) largest magnitude to qmax.

    With ``overwrite_h`` a float64 ``H`` becomes the working buffer of the inverse (its contents
    are lost): memory then holds one [in, in] matrix at a time, which matters for an MLP's
    down projection (14336 inputs: 1.6 GB each).

    The first ``rank`` input columns are kept in full precision: they are moved to the end of
    the processing order and receive error compensation but no rounding. With
    ``act_order`` the quantized columns are processed by decreasing Hessian diagonal; with
    groups and act-order the group scales are computed up front ("static groups") so that
    groups remain contiguous in the original column order.
    """
    out, inp = w.shape
    nq = inp - rank
    if nq <= 0:
        raise ValueError("nothing to quantize: all columns are full precision")
    if group_size and nq % group_size:
        raise ValueError(f"{nq} quantized columns are not a multiple of group size {group_size}")
    W = w.to(torch.float64, copy=True)
    H = H.to(torch.float64, copy=not overwrite_h)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    qcols = torch.arange(rank, inp)
    if act_order:
        qcols = qcols[torch.argsort(torch.diag(H)[rank:], descending=True)]
    perm = torch.cat([qcols, torch.arange(0, rank)])
    if not torch.equal(perm, torch.arange(inp)):
        W = W[:, perm]
        H = H.index_select(0, perm).index_select(1, perm)

    # damped inverse Hessian, upper Cholesky factor, all in one buffer (same values as
    # H + damp * mean(diag H) * I, then cholesky(cholesky_inverse(cholesky(H)), upper=True))
    H.diagonal().add_(damp * torch.mean(torch.diag(H)))
    try:
        torch.linalg.cholesky(H, out=H)
    except torch.linalg.LinAlgError as exc:  # pragma: no cover - damp makes this rare
        raise FloatingPointError("GPTQ: Hessian is not positive definite; raise --damp") from exc
    torch.cholesky_inverse(H, out=H)
    Hinv = torch.linalg.cholesky(H, upper=True, out=H)

    if group_size and not act_order:
        # groups never straddle a block, so a group's scale sees all earlier error updates
        block = max(1, block // group_size) * group_size
    G = (nq // group_size) if group_size else 1
    scales = torch.zeros(out, G, dtype=torch.float64)
    static = bool(group_size and act_order)
    if not group_size:
        scales[:, 0] = _scales(W[:, :nq], bits, 0, mse, clip)[:, 0]
    elif static:
        scales = _scales(w.to(torch.float64)[:, rank:], bits, group_size, mse, clip)

    codes = torch.zeros(out, nq, dtype=torch.int8)  # integers in [qmin, qmax]: exact in int8
    for i1 in range(0, nq, block):
        i2 = min(i1 + block, nq)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col]) - rank  # index among quantized columns, original order
            gi = (orig // group_size) if group_size else 0
            if group_size and not static and orig % group_size == 0:
                upcoming = torch.cat([W1[:, i:], W[:, i2:nq]], 1)[:, :group_size]
                scales[:, gi] = _scales(upcoming, bits, 0, mse, None if clip is None else clip[:, gi:gi + 1])[:, 0]
            s = scales[:, gi]
            w_col = W1[:, i]
            c = _codes(w_col, s, bits)
            codes[:, orig] = c
            err = (w_col - c * s) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    fp = W[:, nq:]  # the full-precision columns, in original order 0..rank-1
    return GPTQResult(codes, scales.to(w.dtype), fp.to(w.dtype))
