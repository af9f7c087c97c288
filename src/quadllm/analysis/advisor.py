"""The rank advisor: which r to use for a model, from its spectrum and a quick error probe.

For each candidate r the model is transformed exactly (the residual second moment is measured
once and shared), its linear inputs are quantized per token as the mode says while the weights
stay in full precision, and the KL divergence from the original's next-token distribution is
measured on probe windows disjoint from the calibration windows. The advice is the smallest r
whose KL is within ``tolerance`` (relative) of the best candidate's, with the cost of the extra
full-precision dimensions spelled out.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..config import QuantConfig
from ..evaluation.perplexity import evaluate_many
from ..pipelines.in_memory import transform
from ..steps.calibration import residual_second_moment
from ..steps.transforms import set_activation_quant
from .subspace import best_energy, spectrum

log = logging.getLogger(__name__)

DEFAULT_RANKS = (0, 8, 16, 32, 64, 128)

__all__ = ["RankAdvice", "advise_rank", "DEFAULT_RANKS", "outlier_cost"]


@dataclass
class RankAdvice:
    rows: list[dict[str, Any]]
    recommended: int
    best: int
    tolerance: float
    hidden_size: int
    mode: str

    def table(self) -> str:
        lines = ["| r | energy in top-r | KL (activations only) | ppl | extra FP params | reader matmul cost |",
                 "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in self.rows:
            mark = " ← recommended" if row["rank"] == self.recommended else ""
            lines.append(f"| {row['rank']}{mark} | {100 * row['energy']:.1f}% | {row['kl']:.4f} | {row['ppl']:.2f} | "
                         f"{row['extra_params']:,} | +{100 * row['extra_cost']:.1f}% |")
        return "\n".join(lines) + "\n"

    def explanation(self) -> str:
        rec = next(r for r in self.rows if r["rank"] == self.recommended)
        best = next(r for r in self.rows if r["rank"] == self.best)
        return (f"Recommended r = {self.recommended}: the smallest rank whose activation-quantization KL "
                f"({rec['kl']:.4f}) is within {100 * self.tolerance:.0f}% of the best candidate's (r = {self.best}, "
                f"KL {best['kl']:.4f}). Each of the r dimensions is kept in full precision: r = {self.recommended} "
                f"adds {rec['extra_params']:,} FP16 outlier weights ({2 * rec['extra_params'] / 1e6:.1f} MB) and "
                f"makes every residual-reading matmul {100 * rec['extra_cost']:.1f}% wider "
                f"(d = {self.hidden_size}); a larger r buys less error for more memory and compute.")

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "recommended": self.recommended, "best": self.best, "tolerance": self.tolerance,
                "hidden_size": self.hidden_size, "mode": self.mode}


def outlier_cost(model: nn.Module, rank: int) -> tuple[int, float]:
    """(full-precision outlier weights, relative extra width of the reader matmuls) for ``rank``."""
    adapter = get_adapter(model)
    layer = adapter.layers(model)[0]
    outs = sum(layer.get_submodule(n).out_features for g in adapter.reader_groups for n in g.linears)
    return rank * outs * adapter.num_layers, rank / adapter.hidden_size


@torch.no_grad()
def advise_rank(model: nn.Module, calib: torch.Tensor, probe: torch.Tensor, ranks: tuple[int, ...] = DEFAULT_RANKS,
                mode: str = "w4a4", tolerance: float = 0.1, seed: int = 0, progress: bool = True) -> RankAdvice:
    """Advise a rank for ``model`` (left untouched) from ``calib`` [n, T] (moment) and ``probe``
    windows [m, T'] (KL against the original)."""
    adapter = get_adapter(model)
    d = adapter.hidden_size
    ranks = tuple(sorted({r for r in ranks if 0 <= r <= d}))
    if not ranks:
        raise ValueError(f"no candidate rank in [0, {d}]")
    moment = residual_second_moment(model, adapter, calib, progress=progress)
    evals = spectrum(moment)
    rows = []
    for r in tqdm(ranks, desc="rank probe", unit="rank", disable=not progress):
        cfg = QuantConfig(method="quad" if r else "quarot", rank=r, mode=mode, seed=seed)
        m = copy.deepcopy(model)
        transform(m, cfg, calib, progress=False, moment=moment if r else None)
        set_activation_quant(m, adapter, cfg)
        res = evaluate_many({"probe": m}, probe, reference=model, progress=False)["probe"]
        params, cost = outlier_cost(model, r)
        rows.append({"rank": r, "energy": best_energy(evals, r) if r else 0.0, "kl": res["kl"], "ppl": res["ppl"],
                     "top1_agreement": res["top1_agreement"], "extra_params": params, "extra_cost": cost})
        log.info("r=%d: KL %.4f, ppl %.2f", r, res["kl"], res["ppl"])
        del m
    best = min(rows, key=lambda row: row["kl"])
    ok = [row for row in rows if row["kl"] <= best["kl"] * (1 + tolerance)]
    recommended = min(row["rank"] for row in ok)
    return RankAdvice(rows, recommended, best["rank"], tolerance, d, mode)
