"""The activation clipping search as pure functions: for the input ``x`` of one or more linears
(the readers of one tensor), the per-token clip ratio ``c`` whose quantized input gives the
outputs closest to the full-precision ones.

For a candidate ``c`` the error is ``sum_l ||[x_:r, Q_c(x_r:)] W_lᵀ - y_l||²`` over the linears
``l`` that read ``x``, where ``W_l`` is the quantized weight (outlier columns first, in full
precision) and ``y_l`` the full-precision layer's output for the same ``x``: the search sees the
weights' rounding error too and may compensate it. ``Q_c`` is :func:`~quadllm.core.quantizers.fake_quant_act`
with clip ratio ``c`` (per token, symmetric) applied to the columns ``r:`` only.

The candidates are multiples of 1/32 (exact in bfloat16 and float16, so a checkpoint's clip ratios
are the same in every precision): a coarse pass over every other one from 1 down to
:data:`MIN_CLIP`, then the two neighbours of the best.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .quantizers import fake_quant_act

__all__ = ["MIN_CLIP", "CLIP_STEP", "LEARNED_CLIP_MIN", "LEARNED_CLIP_STEP", "act_clip_error", "coarse_clips",
           "search_act_clip", "round_learned_clip", "block_error"]

#: the smallest clip ratio the search tries
MIN_CLIP = 0.5
#: the spacing of the candidates
CLIP_STEP = 1.0 / 32
#: the range and spacing of a learned clip ratio (``--a-clip-learn``): multiples of 1/256 are exact in
#: float16 and, within [0.5, 1], in bfloat16 (8 significant bits), so a checkpoint holds the trained value
LEARNED_CLIP_MIN = 0.25
LEARNED_CLIP_STEP = 1.0 / 256


def act_clip_error(x: torch.Tensor, weights: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                   rank: int, bits: int, clip: float, sym: bool = True) -> float:
    """``sum_l ||[x_:r, Q_clip(x_r:)] W_lᵀ - y_l||²`` for ``x`` [n, in], weights ``W_l`` [out_l, in]
    and targets ``y_l`` [n, out_l] (computed in float64 when ``x`` is float64); ``sym``: the
    quantizer's grid (False: asymmetric)."""
    xq = x.clone()
    xq[:, rank:] = fake_quant_act(x[:, rank:].clone(), bits, clip, sym)
    return float(sum(((xq @ w.T) - y).pow(2).sum() for w, y in zip(weights, targets)))


def coarse_clips() -> list[float]:
    """Every other candidate from 1 down to :data:`MIN_CLIP`."""
    n = round((1.0 - MIN_CLIP) / CLIP_STEP)
    return [1.0 - k * CLIP_STEP for k in range(0, n + 1, 2)]


def search_act_clip(x: torch.Tensor, weights: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                    rank: int, bits: int, sym: bool = True) -> tuple[float, dict[float, float]]:
    """The clip ratio with the smallest :func:`act_clip_error` (the largest ratio on ties) and
    the error of every candidate tried.

    The same errors, computed with one product per candidate: the readers' weights are stacked,
    and the part of every output that the full-precision columns give (``x_:r W_:rᵀ``, the same
    for every candidate) is taken off the targets once."""
    w = torch.cat(list(weights), dim=0)
    y = torch.cat(list(targets), dim=1)
    if rank:
        y = y - x[:, :rank] @ w[:, :rank].T
    w_q, x_q = w[:, rank:], x[:, rank:]
    errors: dict[float, float] = {}

    def err(c: float) -> float:
        if c not in errors:
            errors[c] = float((fake_quant_act(x_q.clone(), bits, c, sym) @ w_q.T - y).pow(2).sum())
        return errors[c]

    for c in coarse_clips():
        err(c)
    best = min(errors, key=lambda c: (errors[c], -c))
    for c in (best + CLIP_STEP, best - CLIP_STEP):
        if MIN_CLIP <= c <= 1.0:
            err(c)
    best = min(errors, key=lambda c: (errors[c], -c))
    return best, errors


def round_learned_clip(clip: float) -> float:
    """A trained clip ratio as stored: clamped to [:data:`LEARNED_CLIP_MIN`, 1] and rounded to the
    nearest multiple of :data:`LEARNED_CLIP_STEP`."""
    c = min(max(float(clip), LEARNED_CLIP_MIN), 1.0)
    return round(c / LEARNED_CLIP_STEP) * LEARNED_CLIP_STEP


def block_error(out: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """The error ``loss`` names (:data:`quadllm.config.LEARN_LOSSES`) between a block's output ``out`` and ``target``
    ([..., d], tokens along the other dimensions), averaged over tokens: ``token``,
    ``mean_t ||out_t - target_t||² / ||target_t||²``, each token's error as the next RMSNorm sees it
    (it divides every token by its norm); ``mse``, ``mean((out - target)²)``, which the few tokens
    with huge hidden states dominate."""
    diff = (out - target).pow(2)
    if loss == "mse":
        return diff.mean()
    if loss == "token":
        return (diff.sum(-1) / target.pow(2).sum(-1).clamp_min(1e-12)).mean()
    raise ValueError(f"loss must be 'token' or 'mse', got {loss!r}")
