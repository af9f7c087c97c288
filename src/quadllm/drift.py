"""The calibration-drift check: does a checkpoint's outlier subspace still fit new data?

The residual second moment of the *original* model is measured on the new data and on reference
data from the calibration domain. For each, the energy the saved subspace ``P`` captures is
compared with the most any r-dimensional subspace could capture there (its own top-r
eigenvectors): ``fit = captured / best`` (1 = as good as recalibrating). Principal angles between
``P`` and the re-estimated subspace are reported too, and the quantized model's KL divergence from
the original on both data sets. The verdict is "recalibrate" when the fit on the new data falls
more than ``fit_drop`` below the fit on the reference data, or when its KL is more than
``kl_factor`` times the reference KL; else "fits".
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .arch import get_adapter
from .calibration import residual_second_moment
from .evaluate import evaluate_many
from .subspace import energy_captured, principal_angles, saved_subspace, spectrum, top_subspace

log = logging.getLogger(__name__)

__all__ = ["DriftReport", "subspace_fit", "check_drift"]


@dataclass
class DriftReport:
    new: dict[str, Any]
    reference: dict[str, Any]
    verdict: str
    reasons: list[str]
    rank: int
    thresholds: dict[str, float]

    @property
    def fits(self) -> bool:
        return self.verdict == "fits"

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": self.reasons, "rank": self.rank, "new": self.new,
                "reference": self.reference, "thresholds": self.thresholds}

    def table(self) -> str:
        rows = [("energy captured by the saved subspace", "captured", "{:.1%}"),
                ("energy the best rank-r subspace captures", "best", "{:.1%}"),
                ("fit (captured / best)", "fit", "{:.3f}"),
                ("median principal angle to the re-estimated subspace (deg)", "median_angle_deg", "{:.1f}"),
                ("KL(original ‖ quantized) per token", "kl", "{:.4f}"),
                ("perplexity of the quantized model", "ppl", "{:.2f}")]
        lines = ["| | new data | reference data |", "| --- | ---: | ---: |"]
        for label, key, fmt in rows:
            vals = [fmt.format(d[key]) if d.get(key) is not None else "-" for d in (self.new, self.reference)]
            lines.append(f"| {label} | {vals[0]} | {vals[1]} |")
        return "\n".join(lines) + "\n"


def subspace_fit(moment: torch.Tensor, P: torch.Tensor) -> dict[str, float]:
    """How well ``P`` (d×r) fits data whose second moment is ``moment``."""
    r = P.shape[1]
    evals = spectrum(moment)
    captured = energy_captured(moment, P)
    best = float(evals[:r].sum() / evals.sum())
    angles = principal_angles(P, top_subspace(moment, r))
    return {"captured": captured, "best": best, "fit": captured / best,
            "median_angle_deg": float(angles.median()) * 180 / math.pi,
            "max_angle_deg": float(angles.max()) * 180 / math.pi}


@torch.no_grad()
def check_drift(quantized: nn.Module, original: nn.Module, new_samples: torch.Tensor, ref_samples: torch.Tensor,
                new_windows: torch.Tensor | None = None, ref_windows: torch.Tensor | None = None,
                fit_drop: float = 0.05, kl_factor: float = 2.0, progress: bool = True) -> DriftReport:
    """Compare the fit of ``quantized``'s subspace on new data with its fit on reference data."""
    P = saved_subspace(quantized)
    adapter = get_adapter(original)
    out: dict[str, dict[str, Any]] = {}
    for name, samples, windows in (("new", new_samples, new_windows), ("reference", ref_samples, ref_windows)):
        moment = residual_second_moment(original, adapter, samples, progress=progress)
        out[name] = subspace_fit(moment, P)
        out[name]["samples"] = list(samples.shape)
        if windows is not None:
            res = evaluate_many({"q": quantized}, windows, reference=original, progress=progress)["q"]
            out[name].update(kl=res["kl"], ppl=res["ppl"], reference_ppl=res["reference_ppl"],
                             top1_agreement=res["top1_agreement"])
    reasons = []
    drop = out["reference"]["fit"] - out["new"]["fit"]
    if drop > fit_drop:
        reasons.append(f"the saved subspace captures {out['new']['fit']:.3f} of the best possible energy on the "
                       f"new data against {out['reference']['fit']:.3f} on the reference data (a drop of {drop:.3f} "
                       f"> {fit_drop})")
    if out["new"].get("kl") is not None and out["reference"].get("kl") is not None \
            and out["new"]["kl"] > kl_factor * out["reference"]["kl"]:
        reasons.append(f"the KL to the original is {out['new']['kl']:.4f} on the new data, more than {kl_factor:g}x "
                       f"the {out['reference']['kl']:.4f} on the reference data")
    verdict = "recalibrate" if reasons else "fits"
    return DriftReport(out["new"], out["reference"], verdict, reasons, P.shape[1],
                       {"fit_drop": fit_drop, "kl_factor": kl_factor})
