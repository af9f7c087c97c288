"""Calibration data chosen for the user's domain (``quadllm calibrate-select``).

QUAD's outlier subspace P is the top-r eigenspace of the residual stream's second moment on the
calibration data. What matters on the user's traffic is the energy P leaves to the 4-bit quantizer
there, relative to what the traffic's own top-r subspace would leave (``leftover``, as in
:mod:`quadllm.analysis.drift`; 1 = as good as calibrating on the traffic itself).

Each candidate source's moment is measured once on the original model; a mixture's moment is the
weighted sum (windows drawn in those shares give that moment), so every mixture on a grid of
weights (multiples of ``1/steps``) is scored on a target sample without another forward pass. The
best few by ``leftover`` (within :data:`LEFTOVER_SLACK` of the best) then go through the activation-only KL probe (the model transformed with
that mixture's subspace, inputs quantized, weights in full precision, on target windows disjoint
from those the moment was measured on), and the lowest KL wins.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..evaluation.perplexity import evaluate_many
from ..steps.calibration import residual_second_moment
from .drift import activation_quantized, subspace_fit
from .subspace import top_subspace

log = logging.getLogger(__name__)

#: mixtures probed for KL leave at most this times the energy the best mixture leaves
LEFTOVER_SLACK = 1.25

__all__ = ["LEFTOVER_SLACK", "Selection", "mixture_grid", "select_calibration", "mixture_spec"]


def mixture_grid(k: int, steps: int) -> list[tuple[float, ...]]:
    """Every weight vector of ``k`` non-negative multiples of ``1/steps`` summing to 1."""
    if k < 1 or steps < 1:
        raise ValueError("need at least one candidate and one step")
    return [tuple(c / steps for c in combo) for combo in itertools.product(range(steps + 1), repeat=k)
            if sum(combo) == steps]


def mixture_spec(names: list[str], weights: tuple[float, ...]) -> str:
    """The ``--calib`` spec of a mixture (``A*0.75+B*0.25``; one source alone as itself)."""
    used = [(n, w) for n, w in zip(names, weights) if w > 0]
    if len(used) == 1:
        return used[0][0]
    return "+".join(f"{n}*{w:g}" for n, w in used)


@dataclass
class Selection:
    names: list[str]
    rows: list[dict[str, Any]]  # every mixture scored: weights, leftover, fit, (probed) kl
    chosen: tuple[float, ...]
    rank: int

    @property
    def spec(self) -> str:
        return mixture_spec(self.names, self.chosen)

    def table(self) -> str:
        lines = ["| mixture | energy left vs the target's own subspace | fit | activation-only KL |",
                 "| --- | ---: | ---: | ---: |"]
        for row in sorted(self.rows, key=lambda r: r["leftover"])[:12]:
            mark = " ← chosen" if tuple(row["weights"]) == self.chosen else ""
            kl = f"{row['kl']:.4f}" if row.get("kl") is not None else "-"
            lines.append(f"| {mixture_spec(self.names, tuple(row['weights']))}{mark} | {row['leftover']:.2f}x | "
                         f"{row['fit']:.3f} | {kl} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": self.names, "chosen": list(self.chosen), "spec": self.spec, "rank": self.rank,
                "rows": self.rows}


@torch.no_grad()
def select_calibration(original: nn.Module, candidates: dict[str, torch.Tensor], target: torch.Tensor,
                       probe: torch.Tensor, rank: int, steps: int = 4, probes: int = 3, mode: str = "w4a4",
                       seed: int = 0, progress: bool = True) -> Selection:
    """Choose the mixture of ``candidates`` (name -> calibration windows) whose subspace fits the
    ``target`` windows best, the best ``probes`` by leftover energy confirmed on ``probe`` windows."""
    adapter = get_adapter(original)
    names = list(candidates)
    moments = {name: residual_second_moment(original, adapter, w, progress=progress)
               for name, w in candidates.items()}
    target_moment = residual_second_moment(original, adapter, target, progress=progress)
    rows = []
    for weights in mixture_grid(len(names), steps):
        moment = sum(w * moments[n] for n, w in zip(names, weights))
        fit = subspace_fit(target_moment, top_subspace(moment, rank))
        rows.append({"weights": list(weights), "leftover": fit["leftover"], "fit": fit["fit"],
                     "captured": fit["captured"]})
    rows.sort(key=lambda r: (r["leftover"], r["weights"]))
    # the probe decides between mixtures that cover the target nearly as well as the best one, never
    # for one that leaves much more energy to the quantizer (its KL difference could be noise)
    probed = [r for r in rows[:probes] if r["leftover"] <= LEFTOVER_SLACK * rows[0]["leftover"]]
    for row in tqdm(probed, desc="KL probe", unit="mixture", disable=not progress):
        moment = sum(w * moments[n] for n, w in zip(names, row["weights"]))
        model = activation_quantized(original, moment, rank, mode, seed)
        row["kl"] = evaluate_many({"m": model}, probe, reference=original, progress=False)["m"]["kl"]
        log.info("%s: energy left %.2fx, KL %.4f", mixture_spec(names, tuple(row["weights"])), row["leftover"],
                 row["kl"])
    best = min(probed, key=lambda r: (r["kl"], r["leftover"]))
    return Selection(names, rows, tuple(best["weights"]), rank)
