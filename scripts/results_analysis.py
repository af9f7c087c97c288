#!/usr/bin/env python
"""Run the analysis tools on a model and record what they say: the outlier report of the QUAD
W4A4 r=64 checkpoint (with its per-layer error by linear type), the rank advisor on the original
model, and the drift check of that checkpoint on held-out WikiText-2 text (the calibration
domain) and on GSM8K questions and Python source (other domains). Each command runs through the
CLI in its own process, timed. The model is SmolLM2-135M-Instruct unless ``--model`` says.

Writes results/<model>_analysis.{md,json} and copies two of the report's figures to
results/figures/<model>_quad_r64_{spectrum,errors}.png (the README shows them); the full report
(HTML, every PNG, its JSON) stays in runs/<model>_report/.

    python scripts/results_analysis.py
    python scripts/results_analysis.py --model qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from results_smollm2 import (  # noqa: E402
    ROWS,
    add_checkpoint_args,
    file_slug,
    model_title,
    portable,
    quantize_args,
    quantize_row,
    resolve_paths,
    run_cli,
    slug,
)

from quadllm.evaluation.speed import machine_description  # noqa: E402

BASE = "QUAD W4A4 r=64"
FIGURES = ("spectrum", "errors")
log = logging.getLogger("results")


def python_source(out: Path, max_chars: int = 400_000) -> Path:
    """A .txt of Python source from the standard library (code: a clearly different domain)."""
    import importlib
    import inspect

    mods = ("argparse", "json.decoder", "json.encoder", "logging", "pathlib", "subprocess")
    out.write_text("\n\n".join(inspect.getsource(importlib.import_module(m)) for m in mods)[:max_chars])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--out", default=None, help="results file stem (default: results/<model>_analysis)")
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON and stop")
    p.add_argument("--drift-only", action="store_true",
                   help="rerun only the drift checks; the report and advisor results are kept from the JSON")
    args = p.parse_args()
    resolve_paths(args, "analysis")
    stem = file_slug(args.model)
    if args.render_only:
        out = Path(args.out)
        out.with_suffix(".md").write_text(markdown(json.loads(out.with_suffix(".json").read_text())))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quantize_row(BASE, dict(ROWS)[BASE], quantize_args(args))
    ckpt = str(Path(args.work) / slug(BASE))
    work = ROOT / "runs" / f"{stem}_report"
    work.mkdir(parents=True, exist_ok=True)
    data = Path(args.data_dir) if args.data_dir else ROOT.parent / "shared" / "data"
    dd = ["--data-dir", str(data)] if args.data_dir else []
    results: dict = {}
    out = Path(args.out)
    if args.drift_only:
        old = json.loads(out.with_suffix(".json").read_text())
        results = {"report": old["report"], "advise_rank": old["advise_rank"],
                   "earlier": old.get("earlier") or {"command": old["meta"]["command"], "date": old["meta"]["date"]}}
    meta = {"command": " ".join(["python scripts/results_analysis.py", *sys.argv[1:]]),
            "date": dt.date.today().isoformat(), "machine": machine_description(), "checkpoint": ckpt,
            "model": args.model, "model_title": model_title(args.model)}

    def write(drift_rows: list[dict], pending: bool) -> None:
        """Save what is done so far (an interrupted run keeps its report and advisor sections)."""
        saved = portable({"meta": {**meta, **({"drift_pending": True} if pending else {})}, **results,
                          "drift": drift_rows})
        out.with_suffix(".json").write_text(json.dumps(saved, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(saved))

    if not args.drift_only:
        results.update(report_and_advice(ckpt, work, dd, args.model, stem))
        write([], pending=True)
    results["drift"] = drift(ckpt, work, data, dd, on_row=lambda rows: write(rows, pending=True))
    write(results.pop("drift"), pending=False)
    print(out.with_suffix(".md").read_text())


def error_by_type(linear_errors: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """``{linear: {method: mean relative output error over layers}}`` from the report's
    ``linear_errors`` (``{method: {linear: [per layer]}}``)."""
    out: dict[str, dict[str, float]] = {}
    for method, per in linear_errors.items():
        for name, values in per.items():
            out.setdefault(name, {})[method] = sum(values) / len(values)
    return out


def report_and_advice(ckpt: str, work: Path, dd: list[str], model: str, stem: str) -> dict:
    results: dict = {}
    r = run_cli("report", ["report", ckpt, "--out", str(work / "report.html"), *dd, "-q"])
    report = json.loads((work / "report.json").read_text())
    results["report"] = {**{k: r[k] for k in ("command", "wall_seconds")},
                         "energy_by_rank": report["spectrum"]["energy_by_rank"], "memory": report["memory"],
                         "calibration": report["calibration"],
                         "error_by_type": error_by_type(report["linear_errors"])}
    figdir = ROOT / "results" / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:
        shutil.copyfile(work / f"report_{name}.png", figdir / f"{stem}_quad_r64_{name}.png")

    r = run_cli("advise-rank", ["advise-rank", "--model", model, "--calib", "wikitext2", "--json",
                            str(work / "advise.json"), *dd, "-q"])
    results["advise_rank"] = {**{k: r[k] for k in ("command", "wall_seconds", "stdout")},
                              **json.loads((work / "advise.json").read_text())}
    return results


def drift(ckpt: str, work: Path, data: Path, dd: list[str], on_row=None) -> list[dict]:
    code = python_source(work / "python_source.txt")
    domains = [("WikiText-2 test (calibration domain, held out)", "wikitext2"),
               ("GSM8K test questions", str(data / "gsm8k" / "test.jsonl")),
               ("Python source (standard library)", str(code))]
    results = []
    for label, spec in domains:
        js = work / f"drift_{len(results)}.json"
        r = run_cli(f"drift on {label}", ["drift", ckpt, "--data", spec, "--json", str(js), *dd, "-q"], ok=(0, 3))
        results.append({"data": label, **{k: r[k] for k in ("command", "wall_seconds", "exit_code")},
                        **json.loads(js.read_text())})
        if on_row is not None:
            on_row(results)
    return results


def error_lines(errors: dict[str, dict[str, float]] | None) -> list[str]:
    """The report's per-layer errors averaged by linear type, with QUAD against QuaRot."""
    if not errors:
        return []
    methods = list(next(iter(errors.values())))
    quad = next((x for x in methods if x.startswith("QUAD")), None)
    lines = ["Relative output error of each linear quantized alone (INT4 RTN weights, the checkpoint's activation "
             "mode, the rest of the model exact), averaged over the layers; the figure "
             "`report_errors.png` shows it layer by layer:", "",
             "| linear | " + " | ".join(methods) + (f" | {quad} / QuaRot |" if quad else " |"),
             "| --- |" + " ---: |" * (len(methods) + bool(quad))]
    for name, per in errors.items():
        ratio = [f"{per[quad] / per['QuaRot']:.2f}"] if quad and per.get("QuaRot") else []
        lines.append(f"| {name} | " + " | ".join([f"{per[x]:.4f}" for x in methods] + ratio) + " |")
    return lines + [""]


def markdown(s: dict) -> str:
    m = s["meta"]
    rep, adv = s["report"], s["advise_rank"]
    lines = [f"# {m.get('model_title', 'SmolLM2-135M-Instruct')}: outlier report, rank advisor, drift check", "",
             f"Generated by `{m['command']}` on {m['date']} ({m['machine']}); checkpoint: {m['checkpoint']} "
             "(QUAD W4A4 r=64, GPTQ). Wall times include model loading."
             + (f" The report and advisor sections are from `{s['earlier']['command']}` on {s['earlier']['date']}."
                if s.get("earlier") else ""), "",
             f"## Report: {rep['wall_seconds']:.0f} s", "", f"`{rep['command']}`", "",
             "Residual-stream energy captured by the top-r eigenvectors:", "",
             "| r | " + " | ".join(str(k) for k in rep["energy_by_rank"]) + " |",
             "|---|" + "---:|" * len(rep["energy_by_rank"]),
             "| energy | " + " | ".join(f"{100 * v:.1f}%" for v in rep["energy_by_rank"].values()) + " |", "",
             *error_lines(rep.get("error_by_type")),
             f"## Rank advisor: {adv['wall_seconds']:.0f} s", "", f"`{adv['command']}`", "",
             f"Recommended r = {adv['recommended']} (best: r = {adv['best']}, tolerance {adv['tolerance']:.0%}). "
             "What it printed:", "", adv["stdout"].strip(), "",
             "## Drift check", "",
             "Energy left: the energy outside the saved subspace (what reaches the 4-bit quantizer) divided by "
             "what the subspace re-estimated on that data would leave (1 = as good as recalibrating); the "
             "reference is the calibration domain. Probe: activation-only KL on the data's windows with the "
             "saved subspace and with the re-estimated one, weights in full precision.", "",
             "| data | verdict (exit code) | fit (captured / best) | energy left (ref) | median angle (deg) | "
             "probe KL saved → recalibrated | KL new | KL reference | s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    fmt = (lambda v, f: "-" if v is None else f.format(v))
    for d in s["drift"]:
        new, ref = d["new"], d["reference"]
        probe = new.get("probe")
        probe_txt = (f"{probe['kl_saved']:.4f} → {probe['kl_recalibrated']:.4f} ({probe['gain']:+.0%})"
                     if probe else "-")
        lines.append(f"| {d['data']} | {d['verdict']} ({d['exit_code']}) | {fmt(new.get('fit'), '{:.3f}')} | "
                     f"{fmt(new.get('leftover'), '{:.2f}x')} ({fmt(ref.get('leftover'), '{:.2f}x')}) | "
                     f"{fmt(new.get('median_angle_deg'), '{:.1f}')} | {probe_txt} | {fmt(new.get('kl'), '{:.4f}')} | "
                     f"{fmt(ref.get('kl'), '{:.4f}')} | {d['wall_seconds']:.0f} |")
    lines += [""] + [f"- {d['data']}: {'; '.join(d['reasons'])}" for d in s["drift"] if d["reasons"]] + [""]
    if m.get("drift_pending"):
        lines += [f"**In progress**: {len(s['drift'])} of 3 drift checks done; "
                  f"`{m['command'].replace(' --drift-only', '')} --drift-only` runs them.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
