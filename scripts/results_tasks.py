#!/usr/bin/env python
"""Regenerate a model's task table: FP, QuaRot W4A4, QUAD W4A4 r=64 and QUAD W4A4A8 r=64 (and
the outlier-fine-tuned QUAD model when scripts/results_finetune.py has made it) on the eight
zero-shot tasks of lm-evaluation-harness and on GSM8K and HumanEval, as "% of FP".

The model is SmolLM2-135M-Instruct unless ``--model`` names another known offline model. The
checkpoints are those of scripts/results_smollm2.py (reused from runs/<model>, made there when
missing). Every (task, model) cell is one `quadllm eval MODEL --tasks TASK --limit N --json ...`
in its own process; its JSON is kept in results/<model>_tasks/<model>/<task>.json (committed),
so the table can be filled over several sittings: cells already there are reused, and
`--budget-minutes` stops starting new cells after that long. Cells run task by task (every model
on one task, then the next task), so a partial table holds complete rows. A zero-shot task on
which FP scores at chance is not run on the quantized models (nothing can be read from it), unless
``--all-tasks``. Per-item records go to runs/<model>_tasks_samples/. The table (with the wall time
of every cell) is results/<model>_tasks.{md,json}, built from the cells with quadllm.evaluation.compare.

    python scripts/results_tasks.py                           # 500 items per zero-shot task, 100 generative
    python scripts/results_tasks.py --budget-minutes 60       # as many cells as fit in an hour
    python scripts/results_tasks.py --limit 50 --gen-limit 10 --out runs/quick   # a quick look, kept out of results/
    python scripts/results_tasks.py --rows "QUAD W4A4 r=64 + clip + o-rank 8 + smoothing" \
        --finetuned-base "QUAD W4A4 r=64 + clip + o-rank 8 + smoothing" --finetuned-lr 3e-5   # later rows too
    python scripts/results_tasks.py --model qwen2.5-coder-0.5b --gen-limit 164 \
        --tasks piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai,openbookqa,boolq,humaneval_chat,gsm8k
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from results_finetune import BASE_ROWS, OUTLIER_FT_DIR, finetune_rows  # noqa: E402
from results_smollm2 import (  # noqa: E402
    add_checkpoint_args,
    calibration_source,
    model_title,
    portable,
    quantize_args,
    quantize_row,
    resolve_paths,
    run_child,
    slug,
)

from quadllm.backends import BACKENDS, DTYPES  # noqa: E402
from quadllm.cli.invocation import child_argv, shown  # noqa: E402
from quadllm.evaluation.compare import build_rows, compare_markdown, mean_paired_difference, papers_average  # noqa: E402
from quadllm.evaluation.speed import machine_description  # noqa: E402
from quadllm.evaluation.tasks.scores import GENERATION_TASKS  # noqa: E402
from quadllm.io.checkpoint import CheckpointError, weights_hash  # noqa: E402

ZERO_SHOT = ("piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "lambada_openai", "openbookqa", "boolq")
GENERATIVE = GENERATION_TASKS
QUANTIZED = ("QuaRot W4A4", "QUAD W4A4 r=64", "QUAD W4A4A8 r=64")
FINETUNED = "QUAD W4A4 r=64 + outlier FT"
WEAK = 0.10  # an FP score below this is too low to tell quantization methods apart
#: Accuracy of guessing at random (1 / number of choices) on each multiple-choice task; an FP
#: score within two standard errors of it means the model cannot do the task.
CHANCE = {"piqa": 0.5, "arc_easy": 0.25, "arc_challenge": 0.25, "hellaswag": 0.25, "winogrande": 0.5,
          "openbookqa": 0.25, "boolq": 0.5}
#: Model pairs compared item by item (first minus second); "FP" stands for the full-precision model.
PAIRS = (("QUAD W4A4 r=64", "QuaRot W4A4"), ("QUAD W4A4A8 r=64", "QUAD W4A4 r=64"),
         (FINETUNED, "QUAD W4A4 r=64"), ("QUAD W4A4 r=64", "FP"))


def finetuned_title(base: str) -> str:
    return f"{base} + outlier FT"


def extra_pairs(rows: list[str], finetuned_base: str | None = None) -> tuple[tuple[str, str], ...]:
    """:data:`PAIRS` and, for each further row, the row against QUAD W4A4 r=64 and against FP
    (a fine-tune against its base)."""
    pairs = list(PAIRS)
    for row in rows:
        pairs += [(row, "QUAD W4A4 r=64"), (row, "FP")]
    if finetuned_base is not None:
        pairs += [(finetuned_title(finetuned_base), finetuned_base), (finetuned_title(finetuned_base), "FP")]
    return tuple(dict.fromkeys(pairs))


#: The metric compared for a generative task (zero-shot tasks use the papers' choice).
GEN_METRIC = {"gsm8k": "exact_match,flexible-extract", "humaneval": "pass@1", "humaneval_chat": "pass@1"}

# In the functions below, ``models[0]`` is the full-precision model (its title, as in the table).

log = logging.getLogger("results")


def cell_file(parts: Path, model: str, task: str) -> Path:
    return parts / slug(model).replace("+", "plus") / f"{task}.json"


def checkpoint_sha256(spec: str) -> str | None:
    """The first 16 hex digits of :func:`quadllm.io.checkpoint.weights_hash` of a checkpoint
    directory (None for a model that is not a directory, such as the embedded default), so a
    cell says which checkpoint it scored. Cells made before 2026-12-01 15:00 recorded the hash of
    the file bytes, which can differ between identical builds (safetensors' metadata order)."""
    if not Path(spec).is_dir():
        return None
    try:
        return weights_hash(spec)[:16]
    except CheckpointError:
        return None


def samples_file(out: Path) -> Path:
    """Per-item records of the cell ``out`` (``<parts>/<model>/<task>.json``): runs/<parts>_samples/<model>/<task>.jsonl."""
    return ROOT / "runs" / f"{out.parent.parent.name}_samples" / out.parent.name / f"{out.stem}.jsonl"


def item_scores(samples: Path, task: str, metrics: dict) -> dict[str, str]:
    """Per-item 0/1 scores of ``task``'s binary metrics from a samples file, one character per
    item in item order; each string's mean is checked against the cell's metric."""
    recs = [json.loads(line) for line in samples.read_text().splitlines() if line.strip()]
    recs = sorted((r for r in recs if r.get("task", task) == task), key=lambda r: r.get("doc_id", 0))
    out = {}
    for metric, value in metrics.items():
        vals = [r.get("passed" if metric == "pass@1" else metric) for r in recs]
        if not vals or not all(v in (0, 1) for v in vals):
            continue
        scores = "".join(str(int(v)) for v in vals)
        if abs(scores.count("1") / len(scores) - float(value)) > 1e-9:
            raise SystemExit(f"{samples}: the per-item {metric} scores average {scores.count('1') / len(scores)}, "
                             f"the cell says {value}")
        out[metric] = scores
    return out


def run_cell(model: str, spec: str, task: str, limit: int, parts: Path, args) -> dict:
    """One ``quadllm eval --tasks`` run in its own process; its JSON (with the command and wall
    time added) is written to the cell's file only when the run succeeded."""
    out = cell_file(parts, model, task)
    samples = samples_file(out)
    tmp = out.with_suffix(".json.tmp")
    cmd = [*child_argv("eval", spec), "--tasks", task, "--limit", str(limit),
           "--seed", str(args.seed), "--json", str(tmp), "--samples", str(samples), "-q"]
    if args.batch_size != 8:
        cmd += ["--batch-size", str(args.batch_size)]
    if args.dtype != "float32":
        cmd += ["--dtype", args.dtype]
    if args.backend != "fake" and Path(spec).is_dir():  # a checkpoint; FP has no quantized linears
        cmd += ["--backend", args.backend]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    log.info("%s on %s: %s", model, task, " ".join(cmd[3:]))
    t0 = time.perf_counter()
    r = run_child(cmd)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise SystemExit(f"{model} on {task} failed:\n{r.stderr[-4000:]}")
    result = json.loads(tmp.read_text())
    result.pop("samples_file", None)
    result["command"] = shown(cmd).replace(str(tmp), str(out))
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result["date"] = dt.date.today().isoformat()
    result["machine"] = machine_description()
    result["items"] = item_scores(samples, task, result["tasks"][task])
    result["checkpoint_sha256"] = checkpoint_sha256(spec)
    out.write_text(json.dumps(portable(result), indent=2, default=str) + "\n")
    tmp.unlink()
    log.info("%s on %s: %s in %.0f s", model, task, result["tasks"], result["wall_seconds"])
    return result


def load_cell(path: Path, limit: int, seed: int, dtype: str = "float32") -> dict | None:
    """A finished cell, or None; a cell made with another limit, seed or dtype is an error (cells
    from before ``--dtype`` existed ran in float32)."""
    if not path.is_file():
        return None
    cell = json.loads(path.read_text())
    made = (cell.get("limit"), cell.get("seed"), cell.get("dtype", "float32"))
    if made != (limit, seed, dtype):
        raise SystemExit(f"{path} was made with limit {made[0]}, seed {made[1]}, dtype {made[2]}, not "
                         f"{limit}, {seed}, {dtype}: use another --out directory or delete it")
    if "items" not in cell and samples_file(path).is_file():  # cells made before per-item scores were kept
        task = path.stem
        cell["items"] = item_scores(samples_file(path), task, cell["tasks"][task])
        path.write_text(json.dumps(cell, indent=2, default=str) + "\n")
    return cell


def merge(cells: dict[tuple[str, str], dict], models: list[str]) -> dict[str, dict]:
    """Per model: ``{"tasks": {...}, "seconds": {...}}`` from its finished cells."""
    merged = {m: {"tasks": {}, "seconds": {}} for m in models}
    for (task, model), cell in cells.items():
        merged[model]["tasks"].update(cell["tasks"])
        merged[model]["seconds"][task] = cell["wall_seconds"]
    return merged


def weak_notes(rows: list[dict], fp: str) -> list[str]:
    notes = []
    for row in rows:
        v = row["values"].get(fp)
        if row["task"] in GENERATIVE and isinstance(v, (int, float)) and v < WEAK:
            notes.append(f"- {row['task']} `{row['metric']}`: the FP model scores {100 * v:.1f}%, too close to zero "
                         f"for {fp} to tell the quantization methods apart; do not read the percentages "
                         "of FP on this row as a ranking.")
    return notes


def chance_tasks(fp_tasks: dict[str, dict]) -> dict[str, str]:
    """The zero-shot tasks (task -> the papers' metric) on which the FP model's score is at most
    two standard errors above :data:`CHANCE`."""
    _, used = papers_average(fp_tasks)
    out = {}
    for task, metric in used.items():
        se = fp_tasks[task].get(f"{metric}_stderr")
        if task in CHANCE and se is not None and float(fp_tasks[task][metric]) <= CHANCE[task] + 2 * float(se):
            out[task] = metric
    return out


def chance_lines(merged: dict[str, dict], models: list[str], group: list[str]) -> list[str]:
    """Notes on the tasks where FP is at chance, and the papers' average without them."""
    fp = models[0]
    fp_tasks = {t: v for t, v in merged[fp]["tasks"].items() if t in group}
    weak = chance_tasks(fp_tasks)
    if not weak:
        return []
    lines = [f"- {t} `{m}`: the FP model scores {100 * float(fp_tasks[t][m]):.1f}%, at most two standard errors "
             f"above guessing ({100 * CHANCE[t]:.0f}%): {fp} cannot do the task, so its % of FP "
             "(quantized models included) says nothing about the methods." for t, m in weak.items()]
    _, used = papers_average(fp_tasks)
    keep = {t: m for t, m in used.items() if t not in weak}
    if keep:
        fp_avg = papers_average(fp_tasks, keep)[0]
        parts = []
        for model in models:
            avg = papers_average({t: v for t, v in merged[model]["tasks"].items() if t in group}, keep)[0]
            if avg is not None:
                parts.append(f"{model} {100 * avg:.2f}" + ("" if model == fp else f" ({100 * avg / fp_avg:.1f}% of FP)"))
        lines += ["", f"Average over the {len(keep)} tasks where FP is above chance ({', '.join(keep)}): "
                  + "; ".join(parts) + "."]
    return lines + [""]


def paired_table(cells: dict, models: list[str], group: list[str],
                 pairs: tuple[tuple[str, str], ...] = PAIRS) -> tuple[list[str], list[dict]]:
    """Item-by-item differences (points, ± standard error) of ``pairs`` on the tasks of ``group``
    done for both models, per task and for the papers' average (zero-shot)."""
    fp = models[0]
    fp_tasks = {t: cells[(t, fp)]["tasks"][t] for t in group if (t, fp) in cells}
    metric = {t: GEN_METRIC.get(t) or papers_average({t: m})[1].get(t) for t, m in fp_tasks.items()}
    zero_shot = [t for t in group if t in ZERO_SHOT]
    records = []
    for a, b in ((fp if a == "FP" else a, fp if b == "FP" else b) for a, b in pairs):
        if a not in models or b not in models:
            continue
        per_task = {}
        for t in group:
            m = metric.get(t)
            ia, ib = ((cells.get((t, x)) or {}).get("items", {}).get(m) for x in (a, b))
            if m and ia and ib:
                per_task[t] = ([int(c) for c in ia], [int(c) for c in ib])
        if not per_task:
            continue
        cols = {t: mean_paired_difference({t: per_task[t]}) for t in per_task}
        rec = {"a": a, "b": b, "metrics": {t: metric[t] for t in per_task},
               "per_task": {t: {"diff": d, "se": se} for t, (d, se) in cols.items()}}
        if zero_shot and all(t in per_task for t in zero_shot) and len(zero_shot) > 1:
            d, se = mean_paired_difference({t: per_task[t] for t in zero_shot})
            rec["average"] = {"diff": d, "se": se}
        records.append(rec)
    if not records:
        return [], []
    shown = [t for t in group if any(t in r["per_task"] for r in records)]
    avg = any("average" in r for r in records)
    lines = ["Item-by-item differences on the same items, in points (± standard error of the paired difference; "
             "a difference within about two standard errors is not resolved at this size):", "",
             "| comparison | " + " | ".join(shown) + (" | average |" if avg else " |"),
             "| --- |" + " ---: |" * (len(shown) + avg)]
    fmt = (lambda v: f"{100 * v['diff']:+.1f} ± {100 * v['se']:.1f}" if v else "–")
    for r in records:
        cells_txt = [fmt(r["per_task"].get(t)) for t in shown] + ([fmt(r.get("average"))] if avg else [])
        lines.append(f"| {r['a']} − {r['b']} | " + " | ".join(cells_txt) + " |")
    return lines + [""], records


def seconds_table(merged: dict[str, dict], tasks: list[str]) -> list[str]:
    lines = ["| model | " + " | ".join(tasks) + " |", "| --- |" + " ---: |" * len(tasks)]
    for name, r in merged.items():
        cells = [f"{r['seconds'][t]:.0f}" if t in r["seconds"] else "–" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def checkpoint_lines(cells: dict, models: list[str]) -> list[str]:
    """Which checkpoint each quantized model's cells scored (``checkpoint_sha256``), when its
    cells do not all name the same one (cells made before the hash was kept count as unrecorded)."""
    lines = []
    for model in models:
        seen: dict[str, list[str]] = {}
        for (task, m), c in cells.items():
            if m == model and model != models[0]:
                seen.setdefault(c.get("checkpoint_sha256") or "unrecorded", []).append(task)
        if len(seen) > 1:
            parts = [f"{h}: {', '.join(ts)}" for h, ts in seen.items()]
            lines.append(f"- {model}: cells from {len(seen)} builds of the checkpoint ({'; '.join(parts)}).")
    if lines:
        lines = ["Checkpoints rebuilt between sittings (same command and seed; on another machine the float "
                 "rounding of calibration and GPTQ can differ, so the weights can too):", ""] + lines + [""]
    return lines


def unrun_models(cells: dict, models: list[str], group: list[str]) -> list[str]:
    """The quantized models with no cell on any task of ``group`` while another quantized model has
    some: rows added later and scored on other tasks only."""
    unrun = [m for m in models[1:] if not any((t, m) in cells for t in group)]
    return unrun if len(unrun) < len(models) - 1 else []


def task_groups(cells: dict, models: list[str], tasks: list[str]) -> list[tuple[str, list[str]]]:
    """The table's sections: the zero-shot tasks (averaged together), then the generative ones, as
    one section, or one section each where different rows were run on them (a row scored on
    HumanEval alone must not hold GSM8K back as unfinished)."""
    gen = [t for t in tasks if t in GENERATIVE]
    groups = [("zero-shot", [t for t in tasks if t in ZERO_SHOT])]
    if len({tuple(unrun_models(cells, models, [t])) for t in gen}) > 1:
        return groups + [(f"generative: {t}", [t]) for t in gen]
    return groups + [("generative", gen)]


def expected_cells(cells: dict, models: list[str], tasks: list[str], skipped: dict[str, str]) -> set[tuple[str, str]]:
    """The (task, model) cells the table needs: every pair, less a quantized model's task where FP is
    at chance (not run) and a model's section of tasks it was never run on (:func:`task_groups`,
    :func:`unrun_models`)."""
    out = set()
    for _, group in task_groups(cells, models, tasks):
        unrun = unrun_models(cells, models, group)
        out |= {(t, m) for t in group for m in models if m not in unrun
                and not (m != models[0] and t in skipped and (t, m) not in cells)}
    return out


def render(cells: dict, models: list[str], tasks: list[str], args,
           skipped: dict[str, str] | None = None, pairs: tuple[tuple[str, str], ...] = PAIRS) -> str:
    """The Markdown table; ``skipped``: zero-shot tasks (-> the papers' metric) on which FP is at
    chance and the quantized models were not run."""
    fp, skipped = models[0], skipped or {}
    gsm8k_limit = getattr(args, "gsm8k_limit", None)
    dtype = getattr(args, "dtype", "float32")
    merged = merge(cells, models)
    parts = Path(args.out)
    lines = [f"# {fp}: tasks as % of full precision", ""]
    expected = expected_cells(cells, models, tasks, skipped)
    done = len(expected & set(cells))
    status = "complete" if done == len(expected) else f"**in progress: {done} of {len(expected)} cells done**"
    machines = sorted({c.get("machine", "?") for c in cells.values()})
    where = parts.relative_to(ROOT) if parts.is_relative_to(ROOT) else parts
    lines += [f"Generated by `{args.command}` ({status}); each cell's command, date and machine "
              f"are in {where}/<model>/<task>.json. Checkpoints: GPTQ weights, calibration "
              f"{args.calib_samples} x {args.calib_seqlen} tokens of {calibration_source(models)}, "
              f"seed {args.seed} "
              "(scripts/results_smollm2.py). Zero-shot tasks: the first "
              f"{args.limit} items (the whole split when smaller); "
              + (f"every model runs in {dtype} (quantized linears simulated in it, log-probabilities in "
                 "float32); " if dtype != "float32" else "")
              + (f"GSM8K and HumanEval: the first {args.gen_limit} " if gsm8k_limit in (None, args.gen_limit) else
                 f"GSM8K: the first {gsm8k_limit}; HumanEval: the first {args.gen_limit} ") +
              "(`humaneval`: the raw prompt completed, as the harness; `humaneval_chat`: EvalPlus's instruct prompt "
              "through the chat template, as the Qwen2.5-Coder authors evaluate). "
              f"Machines: {'; '.join(machines) if machines else 'none yet'}.", ""]
    lines += checkpoint_lines(cells, models)
    all_models = models
    for label, group in task_groups(cells, models, tasks):
        if not group:
            continue
        lines += [f"## {label}", ""]
        models = all_models
        # a model with no cell of this group was not run on these tasks (a row added later, scored
        # on the zero-shot tasks only); it is named, not left blank in every row
        unrun = unrun_models(cells, models, group)
        if unrun:
            lines += [f"Not run on these tasks: {', '.join(unrun)}.", ""]
            models = [m for m in models if m not in unrun]
        complete = [t for t in group if all((t, m) in cells for m in models)]
        at_chance = [t for t in group if t in skipped and t not in complete and (t, fp) in cells]
        if at_chance:
            lines += ["FP scores at chance (at most two standard errors above guessing) on "
                      + ", ".join(f"{t} ({100 * float(cells[(t, fp)]['tasks'][t][skipped[t]]):.1f}% `{skipped[t]}`, "
                                  f"chance {100 * CHANCE[t]:.0f}%)" for t in at_chance)
                      + ": the quantized models were not run on them and they are left out of the table.", ""]
            group = [t for t in group if t not in at_chance]
        if not complete:
            lines += ["No task done for every model yet.", ""]
            continue
        done = {k: v for k, v in cells.items() if k[0] in complete}
        rows = build_rows(merge(done, models), fp)
        lines += compare_markdown(rows, models, fp).splitlines() + [""]
        missing = [t for t in group if t not in complete]
        if missing:
            lines += [f"Not yet done for every model (left out of the table and the average): {', '.join(missing)}.",
                      ""]
        lines += weak_notes(rows, fp)
        if label == "zero-shot":
            lines += chance_lines(merge(done, models), models, complete)
        paired_lines, _ = paired_table({k: v for k, v in cells.items() if k[0] in complete}, models, complete, pairs)
        lines += [""] + paired_lines
        lines += ["Wall seconds per cell (model load included):", ""]
        lines += seconds_table({m: merged[m] for m in models}, group) + [""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500, help="items per zero-shot task (first N, the harness's way)")
    p.add_argument("--gen-limit", type=int, default=100, help="items for GSM8K and HumanEval")
    p.add_argument("--gsm8k-limit", type=int, default=None, help="items for GSM8K (default: --gen-limit)")
    p.add_argument("--tasks", default=",".join(ZERO_SHOT + ("gsm8k", "humaneval")),
                   help=f"comma-separated, from {', '.join(ZERO_SHOT + GENERATIVE)}")
    p.add_argument("--budget-minutes", type=float, default=None,
                   help="start no new cell after this many minutes (finished cells are kept)")
    add_checkpoint_args(p)
    p.add_argument("--out", default=None,
                   help="OUT.md and OUT.json; the cells go to the directory OUT/ (default: results/<model>_tasks)")
    p.add_argument("--force", action="store_true", help="re-run cells whose output exists")
    p.add_argument("--render-only", action="store_true", help="rebuild the table from the cells there and stop")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch in every cell (quadllm eval)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="what every model runs in (quadllm eval --dtype); one dtype per table")
    p.add_argument("--backend", default="fake", choices=BACKENDS,
                   help="how the checkpoints' quantized linears run (recorded in each cell's command)")
    p.add_argument("--rows", default="",
                   help="more rows of scripts/results_smollm2.py to score after the standard ones (comma-separated)")
    p.add_argument("--finetuned-base", default=None, choices=sorted(BASE_ROWS),
                   help="also score scripts/results_finetune.py's outlier fine-tune of this row")
    p.add_argument("--finetuned-lr", type=float, default=None,
                   help="the learning rate that fine-tune ran with (its directory names it)")
    p.add_argument("--all-tasks", action="store_true",
                   help="run the quantized models also on zero-shot tasks where FP is at chance")
    args = p.parse_args()
    args.command = shlex.join(["python", "scripts/results_tasks.py", *(a for a in sys.argv[1:] if a != "--render-only")])
    resolve_paths(args, "tasks")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(ZERO_SHOT + GENERATIVE))
    if unknown:
        raise SystemExit(f"unknown tasks {unknown}; choose from {ZERO_SHOT + GENERATIVE}")
    qargs = quantize_args(args)
    flags = BASE_ROWS
    extra = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(extra) - set(flags))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {sorted(flags)}")
    if args.finetuned_base is not None and args.finetuned_lr is None:
        raise SystemExit("--finetuned-base needs --finetuned-lr (the fine-tune's directory names its learning rate)")
    fp = model_title(args.model)
    specs = {fp: args.model}
    out = Path(args.out)
    parts = out.parent / out.name
    for name in (*QUANTIZED, *extra):  # quantized when one of their cells is run
        specs[name] = str(Path(args.work) / slug(name))
    # a fine-tune is made by scripts/results_finetune.py; its row stays while its cells are here
    finetuned = {FINETUNED: Path(args.work) / OUTLIER_FT_DIR}
    if args.finetuned_base is not None:
        finetuned[finetuned_title(args.finetuned_base)] = Path(args.work) / finetune_rows(
            {"quad": args.finetuned_lr}, "kd", args.finetuned_base, lora=False)[0][1]
    for name, ft in finetuned.items():
        if (ft / "quadllm_config.json").is_file() or cell_file(parts, name, "piqa").parent.is_dir():
            specs[name] = str(ft)
        else:
            log.info("no fine-tuned checkpoint at %s (run scripts/results_finetune.py first to include it)", ft)
    models = list(specs)
    pairs = extra_pairs(extra, args.finetuned_base)
    t0 = time.perf_counter()
    cells: dict[tuple[str, str], dict] = {}
    skipped: dict[str, str] = {}
    made: set[str] = set()
    stopped = False

    def write_md() -> None:
        out.with_suffix(".md").write_text(render(cells, models, tasks, args, skipped, pairs))

    for task in tasks:
        limit = (args.gsm8k_limit or args.gen_limit) if task == "gsm8k" else \
            args.gen_limit if task in GENERATIVE else args.limit
        for model in models:
            path = cell_file(parts, model, task)
            cell = None if args.force else load_cell(path, limit, args.seed, args.dtype)
            ran = False
            if cell is None and model != fp and (task, fp) in cells and not args.all_tasks:
                weak = chance_tasks(cells[(task, fp)]["tasks"])
                if task in weak:
                    log.info("%s: FP is at chance; the quantized models are not run on it", task)
                    skipped[task] = weak[task]
                    continue
            if cell is None and not stopped and not args.render_only:
                if args.budget_minutes is not None and time.perf_counter() - t0 > 60 * args.budget_minutes:
                    log.info("budget of %.0f min spent: no new cells (rerun to continue)", args.budget_minutes)
                    stopped = True
                else:
                    if model in flags and model not in made:
                        quantize_row(model, flags[model], qargs)
                        made.add(model)
                    elif model != fp and not (Path(specs[model]) / "quadllm_config.json").is_file():
                        raise SystemExit(f"{model}: no checkpoint at {specs[model]} for its missing {task} cell "
                                         "(run scripts/results_finetune.py to make it)")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    cell = run_cell(model, specs[model], task, limit, parts, args)
                    ran = True
            if cell is not None:
                cells[(task, model)] = cell
            if ran:
                write_md()  # progress after every new cell
    write_md()  # after the loop: it also sees the tasks skipped at chance
    expected = expected_cells(cells, models, tasks, skipped)
    summary = {"models": {m: portable(s) for m, s in specs.items()}, "tasks": tasks, "limit": args.limit,
               "gen_limit": args.gen_limit, "gsm8k_limit": args.gsm8k_limit or args.gen_limit, "seed": args.seed, "dtype": args.dtype,
               "cells_done": len(expected & set(cells)), "cells_total": len(expected), "skipped_at_chance": skipped,
               "results": merge(cells, models),
               "paired": paired_table(cells, models, tasks, pairs)[1]}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
