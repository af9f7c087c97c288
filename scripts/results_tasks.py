#!/usr/bin/env python
"""Regenerate the task table: SmolLM2 FP, QuaRot W4A4, QUAD W4A4 r=64 and QUAD W4A4A8 r=64 (and
the outlier-fine-tuned QUAD model when scripts/results_finetune.py has made it) on the eight
zero-shot tasks of lm-evaluation-harness and on GSM8K and HumanEval, as "% of FP".

The checkpoints are those of scripts/results_smollm2.py (reused from runs/smollm2, made there
when missing). Each of the two comparisons runs `quadllm compare` in its own process; their
Markdown and JSON go to results/smollm2_tasks_{zeroshot,generative}.{md,json} and the summary
with wall times to results/smollm2_tasks.md.

    python scripts/results_tasks.py                       # 500 items per zero-shot task, 100 generative
    python scripts/results_tasks.py --limit 50 --gen-limit 10   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from results_finetune import OUTLIER_FT_DIR  # noqa: E402
from results_smollm2 import ROWS, add_checkpoint_args, portable, quantize_args, quantize_row, slug  # noqa: E402

ZERO_SHOT = "piqa,arc_easy,arc_challenge,hellaswag,winogrande,lambada_openai,openbookqa,boolq"
GENERATIVE = "gsm8k,humaneval"
MODELS = ("QuaRot W4A4", "QUAD W4A4 r=64", "QUAD W4A4A8 r=64")
WEAK = 0.10  # an FP score below this is too low to tell quantization methods apart

log = logging.getLogger("results")


def run_compare(label: str, tasks: str, limit: int, models: list[str], out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "quadllm.cli", "compare", "default", *models, "--tasks", tasks, "--limit",
           str(limit), "--seed", str(args.seed), "--out", str(out.with_suffix(".md")), "-q"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    js = out.with_suffix(".json")
    if js.is_file() and not args.force:
        log.info("%s: reusing %s", label, js)
        return json.loads(js.read_text())
    log.info("%s: %s", label, " ".join(cmd[1:]))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{label} failed:\n{r.stderr[-4000:]}")
    result = json.loads(js.read_text())
    result["command"] = "quadllm " + " ".join(cmd[3:])
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    result = portable(result)
    js.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def weak_notes(result: dict) -> list[str]:
    notes = []
    ref = result["reference"]
    for row in result["rows"]:
        v = row["values"].get(ref)
        if row["task"] in ("gsm8k", "humaneval") and isinstance(v, (int, float)) and v < WEAK:
            notes.append(f"- {row['task']} `{row['metric']}`: the FP model scores {100 * v:.1f}%, too close to zero "
                         "for this 135M model to tell the quantization methods apart; do not read the percentages "
                         "of FP on this row as a ranking.")
    return notes


def seconds_table(result: dict) -> list[str]:
    lines = ["| model | " + " | ".join(t for t in next(iter(result["results"].values()))["seconds"]) + " |"]
    lines.append("| --- |" + " ---: |" * (lines[0].count("|") - 2))
    for name, r in result["results"].items():
        lines.append(f"| {name} | " + " | ".join(f"{s:.0f}" for s in r["seconds"].values()) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--limit", type=int, default=500, help="items per zero-shot task (first N, the harness's way)")
    p.add_argument("--gen-limit", type=int, default=100, help="items for GSM8K and HumanEval")
    add_checkpoint_args(p)
    p.add_argument("--out", default=str(ROOT / "results" / "smollm2_tasks"))
    p.add_argument("--force", action="store_true", help="re-run comparisons whose output exists")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    qargs = quantize_args(args)
    flags = dict(ROWS)
    models = []
    for name in MODELS:
        quantize_row(name, flags[name], qargs)
        models.append(str(Path(args.work) / slug(name)))
    ft = Path(args.work) / OUTLIER_FT_DIR
    if (ft / "quadllm_config.json").is_file():
        models.append(str(ft))
    else:
        log.info("no fine-tuned checkpoint at %s (run scripts/results_finetune.py first to include it)", ft)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = [("zero-shot", ZERO_SHOT, args.limit), ("generative", GENERATIVE, args.gen_limit)]
    results = {label: run_compare(label, tasks, limit, models,
                                  out.parent / f"{out.name}_{label.replace('-', '')}", args)
               for label, tasks, limit in parts}
    lines = ["# SmolLM2-135M-Instruct: tasks as % of full precision", "",
             f"Generated by `python scripts/results_tasks.py {' '.join(sys.argv[1:])}` on {dt.date.today()} "
             f"({platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}). Checkpoints: "
             "GPTQ weights, calibration 32 x 512 tokens of `wiki.valid.tokens`, seed 0 (scripts/results_smollm2.py).",
             ""]
    for label, tasks, limit in parts:
        r = results[label]
        lines += [f"## {label} (first {limit} items per task)", "", f"`{r.get('command', '')}`: "
                  f"{r.get('wall_seconds', r.get('total_seconds'))} s wall in all.", ""]
        md = out.parent / f"{out.name}_{label.replace('-', '')}.md"
        lines += [l for l in md.read_text().splitlines() if l.startswith("|")]
        lines += ["", "Wall seconds per model and task:", ""] + seconds_table(r) + [""]
        lines += weak_notes(r) + [""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
