"""``quadllm run recipe.yaml``: quantization, optional fine-tuning, evaluation and the report as one job
with pass/fail gates (the recipe's format and the state kept between runs: :mod:`quadllm.pipelines.rollout`).

Stages run in order; each writes atomically under the recipe's ``output`` and is recorded in
``run_state.json`` with the hash of its inputs (its settings and the output it started from). A
second run skips every stage whose inputs and output are unchanged, so an interrupted job resumes
after its last completed stage and an edited recipe re-runs the edited stage and those after it.
The summary (``summary.md`` and ``summary.json``) lists every gate; the exit code is 0 when all
pass, :data:`EXIT_GATE_FAILED` when one fails, 2 for a recipe that cannot run.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..analysis.planner import read_plan, with_plan
from ..analysis.report import build_report
from ..data.text import load_text
from ..evaluation.perplexity import evaluate
from ..evaluation.tasks.suite import check_tasks, run_suite
from ..finetune.job import run as run_finetune
from ..io.checkpoint import check_output_dir, read_meta
from ..io.files import atomic_write, output_lock
from ..io.sources import load_model, resolve
from ..pipelines.loading import load
from ..pipelines.rollout import Recipe, RunState, check_gates, read_recipe, stage_hash
from .common import add_common
from .quantize import quantize_to

log = logging.getLogger("quadllm")

#: the exit status of ``quadllm run`` when a gate fails
EXIT_GATE_FAILED = 5


def add_parsers(sub) -> None:
    r = sub.add_parser("run", help="run a rollout recipe (quantize, fine-tune, evaluate, report) with gates")
    r.add_argument("recipe", help="the recipe, YAML or TOML (see examples/recipes/)")
    r.add_argument("--dry-run", action="store_true", help="validate the recipe and list the stages that would run")
    add_common(r)


def _check_inputs(recipe: Recipe, data_dir: str | None) -> None:
    """What can fail without a model, checked before the first stage."""
    check_output_dir(recipe.output / "quantized")
    resolve(recipe.model)
    if recipe.quant.needs_calibration:
        load_text(recipe.quant.calib, "calib", data_dir=data_dir)
    if recipe.plan:
        read_plan(recipe.path.parent / recipe.plan)
    if recipe.perplexity:
        load_text(recipe.perplexity["data"], "eval", data_dir=data_dir)
    if recipe.tasks:
        check_tasks(recipe.tasks["names"], data_dir)


def _settings(recipe: Recipe) -> dict[str, dict[str, Any]]:
    plan_hash = read_plan(recipe.path.parent / recipe.plan)[1]["sha256"] if recipe.plan else None
    return {
        "quantize": {"model": recipe.model, "config": recipe.quant.to_dict(), "plan": plan_hash,
                     "layout": recipe.layout},
        "finetune": recipe.finetune.to_dict() if recipe.finetune else {},
        "evaluate": {"perplexity": recipe.perplexity, "tasks": recipe.tasks},
        "report": recipe.report or {},
    }


def _quantize(recipe: Recipe, out: Path, args) -> None:
    config = with_plan(recipe.quant, recipe.path.parent / recipe.plan) if recipe.plan else recipe.quant
    quantize_to(config, recipe.model, out, recipe.layout, args.data_dir, args.quiet)


def _evaluate(recipe: Recipe, checkpoint: Path, out: Path, args) -> None:
    model, tok, meta = load(checkpoint)
    original = load_model((meta.get("original_model") or {}).get("spec"))[0]
    result: dict[str, Any] = {"checkpoint": str(checkpoint)}
    if recipe.perplexity:
        p = recipe.perplexity
        result["perplexity"] = evaluate(model, tok, p["data"], p["seqlen"], p["max_windows"], reference=original,
                                        data_dir=args.data_dir, progress=not args.quiet)
    if recipe.tasks:
        t = recipe.tasks
        kw = dict(limit=t["limit"], seed=recipe.quant.seed, batch_size=t["batch_size"], data_dir=args.data_dir,
                  progress=not args.quiet)
        result["tasks"] = {name: {k: v for k, v in run_suite(m, tok, t["names"], **kw).items() if k != "samples"}
                           for name, m in (("model", model), ("fp", original))}
    atomic_write(out, (json.dumps(result, indent=2, default=str) + "\n").encode())


def _measured(evaluation: dict[str, Any]) -> dict[str, float | None]:
    p = evaluation.get("perplexity") or {}
    measured: dict[str, float | None] = {"kl": p.get("kl"), "ppl": p.get("ppl"), "top1_agreement": p.get("top1_agreement")}
    if p.get("ppl") is not None and p.get("reference_ppl"):
        measured["ppl_ratio"] = p["ppl"] / p["reference_ppl"]
    t = evaluation.get("tasks")
    if t and t["fp"].get("average"):
        measured["tasks_share"] = t["model"]["average"] / t["fp"]["average"]
    return measured


def _measured_lines(evaluation: dict[str, Any], data: str) -> list[str]:
    """What the evaluation measured, beside the gates: perplexity and KL, each task against FP."""
    lines = []
    p = evaluation.get("perplexity")
    if p:
        lines += ["", f"Perplexity on {p['windows']} x {p['seqlen']} tokens of {data} (its evaluation split): "
                  f"{p['ppl']:.3f} (FP {p['reference_ppl']:.3f}); KL(FP ‖ model) {p['kl']:.4f} per token, top-1 "
                  f"agreement {p['top1_agreement']:.3f}."]
    t = evaluation.get("tasks")
    if t:
        lines += ["", f"| task (limit {t['model'].get('limit')}) | metric | model | FP |", "| --- | --- | ---: | ---: |"]
        for name, metric in t["model"]["average_metrics"].items():
            lines.append(f"| {name} | {metric} | {t['model']['tasks'][name][metric]:.3f} | "
                         f"{t['fp']['tasks'][name][metric]:.3f} |")
        lines.append(f"| average | | {t['model']['average']:.4f} | {t['fp']['average']:.4f} |")
    return lines


def _summary(recipe: Recipe, evaluation: dict[str, Any], state: RunState, ran: list[str]) -> tuple[bool, str]:
    rows = check_gates(recipe.gates, _measured(evaluation))
    passed = all(r["passed"] for r in rows)
    lines = [f"# Rollout summary: {recipe.path.name}", "",
             f"Stages: {', '.join(f'{s} (ran)' if s in ran else f'{s} (unchanged, skipped)' for s in recipe.stages)}.",
             "", "| gate | measured | threshold | result |", "| --- | ---: | ---: | --- |"]
    for r in rows:
        value = "missing" if r["value"] is None else f"{r['value']:.4f}"
        lines.append(f"| {r['gate']} ({r['meaning']}) | {value} | {r['op']} {r['threshold']:g} | "
                     f"{'pass' if r['passed'] else 'FAIL'} |")
    lines += ["", f"Verdict: {'PASS' if passed else 'FAIL'}" + ("" if rows else " (no gates)")]
    lines += _measured_lines(evaluation, (recipe.perplexity or {}).get("data", ""))
    lines += ["", "| stage | output | seconds (when it last ran) |", "| --- | --- | ---: |"]
    for stage in recipe.stages:
        rec = state.stages.get(stage) or {}
        lines.append(f"| {stage}{'' if stage in ran else ' (skipped: unchanged)'} | `{Path(str(rec.get('output', ''))).name}` "
                     f"| {rec.get('seconds', float('nan')):.0f} |")
    text = "\n".join(lines) + "\n"
    record = {"recipe": str(recipe.path), "passed": passed, "gates": rows, "measured": _measured(evaluation),
              "stages": {s: state.stages.get(s) for s in recipe.stages}, "ran": ran}
    atomic_write(recipe.output / "summary.md", text.encode())
    atomic_write(recipe.output / "summary.json", (json.dumps(record, indent=2, default=str) + "\n").encode())
    return passed, text


def cmd_run(args) -> int:
    recipe = read_recipe(args.recipe)
    _check_inputs(recipe, args.data_dir)
    if args.dry_run:  # writes nothing
        return _run(recipe, args)
    recipe.output.mkdir(parents=True, exist_ok=True)
    with output_lock(recipe.output):
        return _run(recipe, args)


def _run(recipe: Recipe, args) -> int:
    state = RunState(recipe.output)
    settings = _settings(recipe)
    outputs = {"quantize": recipe.output / "quantized", "finetune": recipe.output / "finetuned",
               "evaluate": recipe.output / "evaluation.json", "report": recipe.output / "report.html"}
    upstream: str | None = None
    checkpoint = outputs["quantize"]
    ran = []
    for stage in recipe.stages:
        inputs = stage_hash(stage, settings[stage], upstream)
        if args.dry_run:
            print(f"{stage}: {'done, would skip' if state.done(stage, inputs) else 'would run'} -> {outputs[stage]}")
        elif state.done(stage, inputs):
            log.info("%s: unchanged since its last run, skipped (%s)", stage, outputs[stage])
        else:
            log.info("stage %s -> %s", stage, outputs[stage])
            t0 = time.perf_counter()
            if stage == "quantize":
                _quantize(recipe, outputs[stage], args)
            elif stage == "finetune":
                run_finetune(str(checkpoint), recipe.finetune, str(outputs[stage]), data_dir=args.data_dir,
                             progress=not args.quiet)
            elif stage == "evaluate":
                _evaluate(recipe, checkpoint, outputs[stage], args)
            else:
                r = recipe.report
                build_report(str(checkpoint), outputs[stage], r["calib"], r["samples"], r["seqlen"],
                             seed=recipe.quant.seed, data_dir=args.data_dir, progress=not args.quiet)
            state.record(stage, inputs, outputs[stage], time.perf_counter() - t0)
            ran.append(stage)
        upstream = state.output_hash(stage) or inputs
        if stage in ("quantize", "finetune"):
            checkpoint = outputs[stage]
    if args.dry_run:
        return 0
    evaluation = json.loads(outputs["evaluate"].read_text())
    read_meta(checkpoint)  # the evaluated checkpoint is still there and whole
    passed, text = _summary(recipe, evaluation, state, ran)
    print(text)
    return 0 if passed else EXIT_GATE_FAILED


HANDLERS = {"run": cmd_run}
