"""The calibration-drift check: does a checkpoint's outlier subspace still fit new data?

The residual second moment of the *original* model is measured on the new data and on reference
data from the calibration domain. For each, the energy the saved subspace ``P`` captures is
compared with the most any r-dimensional subspace could capture there (its own top-r
eigenvectors): ``fit = captured / best`` (1 = as good as recalibrating). Because a few massive
directions hold most of the energy (96% in the top 8 on SmolLM2), ``fit`` stays near 1 on almost
any text; the energy *left outside* the subspace, which is what reaches the 4-bit quantizer, is
the sensitive measure: ``leftover = (1 - captured) / (1 - best)`` (1 = as little as
recalibrating would leave). Principal angles between ``P`` and the re-estimated subspace are
reported too, and the quantized model's KL divergence from the original on both data sets.

The recalibration probe answers the deployment question directly: on the new data's evaluation
windows it quantizes the original model's activations (weights kept in full precision, the
checkpoint's mode and rank) once with the saved subspace and once with the subspace re-estimated
on the new data, and reports ``gain = KL(saved) / KL(re-estimated) - 1``: how much lower the
activation error would be after recalibrating.

The verdict is "recalibrate" when any of these holds, else "fits":
- ``leftover`` on the new data is more than ``leftover_factor`` times ``leftover`` on the reference;
- the fit on the new data falls more than ``fit_drop`` below the fit on the reference data;
- the quantized model's KL on the new data is more than ``kl_factor`` times the reference KL;
- the probe's ``gain`` exceeds ``gain_min``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..config import QuantConfig
from ..evaluation.perplexity import evaluate_many
from ..pipelines.in_memory import transform
from ..steps.calibration import residual_second_moment
from ..steps.transforms import set_activation_quant
from .subspace import energy_captured, principal_angles, saved_subspace, spectrum, top_subspace

log = logging.getLogger(__name__)

__all__ = ["DriftReport", "subspace_fit", "recalibration_probe", "check_drift", "recalibration_config", "activation_quantized",
           "compare_on_domains"]


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
                ("energy left to the quantizer, relative to recalibrating", "leftover", "{:.2f}x"),
                ("median principal angle to the re-estimated subspace (deg)", "median_angle_deg", "{:.1f}"),
                ("KL(original ‖ quantized) per token", "kl", "{:.4f}"),
                ("perplexity of the quantized model", "ppl", "{:.2f}")]
        lines = ["| | new data | reference data |", "| --- | ---: | ---: |"]
        for label, key, fmt in rows:
            vals = [fmt.format(d[key]) if d.get(key) is not None else "-" for d in (self.new, self.reference)]
            lines.append(f"| {label} | {vals[0]} | {vals[1]} |")
        probe = self.new.get("probe")
        if probe:
            lines.append(f"| activation-only KL, saved subspace → re-estimated on the new data | "
                         f"{probe['kl_saved']:.4f} → {probe['kl_recalibrated']:.4f} ({probe['gain']:+.0%}) | - |")
        return "\n".join(lines) + "\n"


def subspace_fit(moment: torch.Tensor, P: torch.Tensor) -> dict[str, float]:
    """How well ``P`` (d×r) fits data whose second moment is ``moment``."""
    r = P.shape[1]
    evals = spectrum(moment)
    captured = energy_captured(moment, P)
    best = float(evals[:r].sum() / evals.sum())
    angles = principal_angles(P, top_subspace(moment, r))
    leftover = (1 - captured) / max(1 - best, 1e-12)
    return {"captured": captured, "best": best, "fit": captured / best, "leftover": leftover,
            "median_angle_deg": float(angles.median()) * 180 / math.pi,
            "max_angle_deg": float(angles.max()) * 180 / math.pi}


def activation_quantized(original: nn.Module, moment: torch.Tensor, rank: int, mode: str, seed: int) -> nn.Module:
    """A copy of ``original`` whose linear inputs are quantized (``mode``) after the QUAD transform
    built from ``moment``; the weights stay in full precision."""
    cfg = QuantConfig(method="quad", rank=rank, mode=mode, seed=seed)
    m = copy.deepcopy(original)
    transform(m, cfg, None, progress=False, moment=moment)
    set_activation_quant(m, get_adapter(m), cfg)
    return m


@torch.no_grad()
def recalibration_probe(original: nn.Module, P: torch.Tensor, new_moment: torch.Tensor, windows: torch.Tensor,
                        mode: str = "w4a4", seed: int = 0) -> dict[str, float]:
    """Activation-only KL on ``windows`` with the saved subspace ``P`` and with the top-r subspace
    of ``new_moment`` (one pass of the original for both); ``gain`` = how much lower the KL gets
    by recalibrating (relative)."""
    r = P.shape[1]
    P = P.to(torch.float64)
    models = {"saved": activation_quantized(original, P @ P.T, r, mode, seed),  # top-r eigenspace = span(P)
              "recalibrated": activation_quantized(original, new_moment, r, mode, seed)}
    res = evaluate_many(models, windows, reference=original, progress=False)
    saved, recal = res["saved"]["kl"], res["recalibrated"]["kl"]
    return {"kl_saved": saved, "kl_recalibrated": recal, "gain": saved / max(recal, 1e-12) - 1}


@torch.no_grad()
def check_drift(quantized: nn.Module, original: nn.Module, new_samples: torch.Tensor, ref_samples: torch.Tensor,
                new_windows: torch.Tensor | None = None, ref_windows: torch.Tensor | None = None,
                fit_drop: float = 0.05, kl_factor: float = 2.0, leftover_factor: float = 1.5,
                gain_min: float | None = 0.1, progress: bool = True) -> DriftReport:
    """Compare the fit of ``quantized``'s subspace on new data with its fit on reference data.
    ``gain_min=None`` skips the recalibration probe (it needs ``new_windows``)."""
    P = saved_subspace(quantized, original)
    adapter = get_adapter(original)
    info = getattr(quantized, "quadllm_info", None) or {}
    mode = (info.get("quant_config") or {}).get("mode", "w4a4")
    seed = int((info.get("quant_config") or {}).get("seed", 0))
    out: dict[str, dict[str, Any]] = {}
    for name, samples, windows in (("new", new_samples, new_windows), ("reference", ref_samples, ref_windows)):
        moment = residual_second_moment(original, adapter, samples, progress=progress)
        out[name] = subspace_fit(moment, P)
        out[name]["samples"] = list(samples.shape)
        if windows is not None:
            res = evaluate_many({"q": quantized}, windows, reference=original, progress=progress)["q"]
            out[name].update(kl=res["kl"], ppl=res["ppl"], reference_ppl=res["reference_ppl"],
                             top1_agreement=res["top1_agreement"])
        if name == "new" and windows is not None and gain_min is not None:
            out[name]["probe"] = recalibration_probe(original, P, moment, windows, mode, seed)
            log.info("recalibration probe: activation-only KL %.4f with the saved subspace, %.4f re-estimated",
                     out[name]["probe"]["kl_saved"], out[name]["probe"]["kl_recalibrated"])
    reasons = []
    ratio = out["new"]["leftover"] / out["reference"]["leftover"]
    if ratio > leftover_factor:
        reasons.append(f"the saved subspace leaves {out['new']['leftover']:.2f}x the energy a recalibrated one would "
                       f"leave to the 4-bit quantizer on the new data, against {out['reference']['leftover']:.2f}x on "
                       f"the reference data ({ratio:.2f} times as much, > {leftover_factor:g})")
    drop = out["reference"]["fit"] - out["new"]["fit"]
    if drop > fit_drop:
        reasons.append(f"the saved subspace captures {out['new']['fit']:.3f} of the best possible energy on the "
                       f"new data against {out['reference']['fit']:.3f} on the reference data (a drop of {drop:.3f} "
                       f"> {fit_drop})")
    if out["new"].get("kl") is not None and out["reference"].get("kl") is not None \
            and out["new"]["kl"] > kl_factor * out["reference"]["kl"]:
        reasons.append(f"the KL to the original is {out['new']['kl']:.4f} on the new data, more than {kl_factor:g}x "
                       f"the {out['reference']['kl']:.4f} on the reference data")
    probe = out["new"].get("probe")
    if probe and probe["gain"] > gain_min:
        reasons.append(f"recalibrating on the new data would lower the activation-only KL from {probe['kl_saved']:.4f} "
                       f"to {probe['kl_recalibrated']:.4f} ({probe['gain']:.0%} > {gain_min:.0%})")
    verdict = "recalibrate" if reasons else "fits"
    return DriftReport(out["new"], out["reference"], verdict, reasons, P.shape[1],
                       {"fit_drop": fit_drop, "kl_factor": kl_factor, "leftover_factor": leftover_factor,
                        "gain_min": gain_min})


def recalibration_config(config: QuantConfig, new_data: str, new_share: float = 0.5) -> QuantConfig:
    """``config`` calibrated again on a mixture of its own calibration data and ``new_data``
    (``new_share`` of the windows from the new data), everything else as it was."""
    if not 0.0 < new_share <= 1.0:
        raise ValueError(f"the new data's share must be in (0, 1], got {new_share}")
    old = config.calib
    if old is None:  # the embedded default (what an offline run calibrated on)
        old = "wikitext2" if "wikitext" in str(config.extra.get("calib_origin", "")).lower() else "pydoc"
    calib = new_data if new_share == 1.0 else f"{old}*{1 - new_share:g}+{new_data}*{new_share:g}"
    return dataclasses.replace(config, calib=calib, extra={})


@torch.no_grad()
def compare_on_domains(models: dict[str, nn.Module], original: nn.Module,
                       windows: dict[str, torch.Tensor], progress: bool = True) -> list[dict[str, Any]]:
    """Perplexity and KL(original ‖ model) of each model on each domain's windows (one row per pair)."""
    rows = []
    for domain, w in windows.items():
        results = evaluate_many(models, w, reference=original, progress=progress)
        for name, res in results.items():
            rows.append({"model": name, "domain": domain, "kl": res["kl"], "ppl": res["ppl"],
                         "reference_ppl": res["reference_ppl"], "top1_agreement": res["top1_agreement"],
                         "windows": res["windows"]})
    return rows
