"""``quadllm report``: one self-contained HTML file showing what QUAD does to a model.

Sections: activation outliers before and after the transform, the residual spectrum and the
energy each rank captures, per-layer quantization error of RTN / QuaRot / QUAD, the tokens that
carry the largest activations, each decoder linear's precision (a checkpoint's) and the
checkpoint's memory breakdown. Every figure is embedded
in the HTML (base64 PNG, no network) and also written beside it as a PNG; the numbers behind
the figures go to a JSON file with the same stem.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ...arch import get_adapter
from ...config import DEFAULT_RANK, QuantConfig
from ...data.text import load_text, sample_calibration
from ...io.checkpoint import is_checkpoint
from ...io.files import atomic_write
from ...io.sources import fp16_size_bytes, load_model
from ...pipelines.in_memory import transform
from ...pipelines.loading import load
from ...steps.calibration import residual_second_moment
from ..subspace import energy_by_rank, spectrum
from . import figures
from .collect import input_stats, linear_errors, module_precisions, token_outliers
from .html import render

log = logging.getLogger(__name__)

REPORT_RANKS = (8, 16, 32, 64, 128)
SECTIONS = ("outliers", "spectrum", "errors", "tokens", "precision", "memory")

__all__ = ["build_report", "write_report", "SECTIONS"]


def _memory(meta: dict[str, Any] | None, original_fp16: int) -> dict[str, Any] | None:
    if not meta:
        return None
    parts = {k: v for k, v in meta["sizes"]["tensor_bytes"].items() if v}
    total = sum(parts.values())
    return {"parts": parts, "total": total, "original_fp16": original_fp16, "saving": original_fp16 - total,
            "saving_share": 1 - total / original_fp16, "rank": meta["structure"]["rank"],
            "hidden_size": meta["structure"]["hidden_size"]}


def build_report(spec: str | None, out_html: str | Path, calib: str | None = None, samples: int = 4,
                 seqlen: int = 512, rank: int | None = None, seed: int = 0, data_dir: str | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Load a checkpoint (and its original) or an original model, then :func:`write_report`."""
    meta = None
    if spec is not None and spec != "default" and is_checkpoint(spec):
        quantized, tok, meta = load(spec)
        original = load_model((meta.get("original_model") or {}).get("spec"))[0]
        cfg = QuantConfig.from_dict(meta["quant_config"])
        subject = f"checkpoint {spec}"
    else:
        original, tok, source = load_model(spec)
        quantized = None
        cfg = QuantConfig(method="quad", rank=rank, seed=seed)
        subject = f"model {source.spec if source else spec} (not quantized: the QUAD transform is applied exactly)"
    text = load_text(calib if calib is not None else cfg.calib, "calib", data_dir=data_dir)
    ids = sample_calibration(tok, text.text, samples, seqlen, seed)
    log.info("report on %d x %d tokens of %s", samples, seqlen, text.origin)
    return write_report(original, tok, quantized, meta, cfg, ids, out_html, subject, text.origin, seed, progress)


@torch.no_grad()
def write_report(original, tok, quantized, meta: dict[str, Any] | None, cfg: QuantConfig, ids: torch.Tensor,
                 out_html: str | Path, subject: str, origin: str, seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Measure ``original`` and ``quantized`` (None: ``original`` transformed exactly with ``cfg``)
    on ``ids`` [n, T], draw, and write the HTML, PNGs and JSON; returns the numbers."""
    t0 = time.perf_counter()
    out_html = Path(out_html)
    r = cfg.rank
    samples, seqlen = ids.shape
    adapter = get_adapter(original)
    moment = residual_second_moment(original, adapter, ids, progress=progress)
    evals = spectrum(moment)
    energy = energy_by_rank(evals, sorted({k for k in (*REPORT_RANKS, r) if 0 < k <= adapter.hidden_size}))
    before = input_stats(original, ids)
    if quantized is None:
        quantized = copy.deepcopy(original)
        transform(quantized, cfg, ids, progress=False, moment=moment if r else None)
    precisions = module_precisions(quantized) if meta else None  # before a transformed copy stands in
    after = input_stats(quantized, ids)
    errors = linear_errors(original, ids, r or DEFAULT_RANK, cfg.mode, seed, moment)
    tokens = token_outliers(original, tok, ids)
    memory = _memory(meta, fp16_size_bytes(original))
    data = {"subject": subject, "calibration": {"origin": origin, "samples": samples, "seqlen": seqlen,
                                                 "seed": seed},
            "rank": r, "mode": cfg.mode, "hidden_size": adapter.hidden_size, "layers": adapter.num_layers,
            "spectrum": {"eigenvalues": evals.tolist(), "energy_by_rank": energy},
            "inputs_before": before, "inputs_after": after, "linear_errors": errors, "tokens": tokens,
            "precision": precisions, "memory": memory}
    pngs = {f"outliers_{i}": figures.outlier_heatmap(before[k], after.get(k), k) for i, k in enumerate(before)}
    pngs["crest"] = figures.crest_plot(before, after)
    pngs["spectrum"] = figures.spectrum_plot(evals.tolist(), energy, r)
    pngs["errors"] = figures.error_plot(errors)
    if memory:
        pngs["memory"] = figures.memory_plot(memory["parts"], memory["original_fp16"])
    stem = out_html.with_suffix("")
    files = {}
    for name, png in pngs.items():
        p = stem.parent / f"{stem.name}_{name}.png"
        atomic_write(p, png)
        files[name] = str(p)
    data["seconds"] = round(time.perf_counter() - t0, 1)
    data["figures"] = files
    atomic_write(stem.with_suffix(".json"), (json.dumps(data, indent=1, default=str) + "\n").encode())
    atomic_write(out_html, render(data, pngs).encode())
    log.info("wrote %s (%d figures, numbers in %s)", out_html, len(pngs), stem.with_suffix(".json"))
    return data
