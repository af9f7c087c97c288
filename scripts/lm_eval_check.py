"""The same zero-shot items scored three ways on one checkpoint in the stock layout:
``quadllm eval --tasks``, the harness's own ``lm_eval --model hf ... trust_remote_code=True`` and
``quadllm lm-eval --model quadllm``; per-item log-likelihoods and task scores side by side.

Writes ``results/<name>_lm_eval.{md,json}``. Each route runs as its own process, offline (the task
copies in ../shared/data through ``--include_path``), one after the other. At the default batch size
of 1 no request is padded, so the routes compute the same forward passes; at a larger batch size the
harness's command line batches every task's requests together while ``quadllm eval`` runs one task
at a time, so padding differs, and W4A4's activation rounding turns the float noise of other
padded lengths into visibly different log-likelihoods (``--batch-size 8 --name ..._batch8`` shows
how much):

    python scripts/lm_eval_check.py --checkpoint runs/smollm2/quad-w4a4-r64-+-clip-+-o-rank-8-+-smoothing-stock \
        --tasks piqa,arc_easy --limit 200
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quadllm.evaluation.tasks.harness import OFFLINE_DIR, papers_metric  # noqa: E402

log = logging.getLogger("lm_eval_check")


def routes(ckpt: str, tasks: list[str], limit: int, batch: int, work: Path) -> dict[str, list[str]]:
    harness_args = ["--tasks", *tasks, "--limit", str(limit), "--batch_size", str(batch), "--log_samples"]
    return {
        "quadllm eval --tasks": ["quadllm", "eval", ckpt, "--tasks", ",".join(tasks), "--limit", str(limit),
                                 "--batch-size", str(batch), "--samples", str(work / "eval.jsonl"), "-q"],
        "lm_eval --model hf (trust_remote_code)": [
            "lm_eval", "--model", "hf", "--model_args", f"pretrained={ckpt},trust_remote_code=True,dtype=float32",
            *harness_args, "--include_path", str(OFFLINE_DIR), "--output_path", str(work / "hf")],
        "quadllm lm-eval --model quadllm": [
            "quadllm", "lm-eval", "--model", "quadllm", "--model_args", f"pretrained={ckpt}",
            *harness_args, "--output_path", str(work / "quadllm")],
    }


def shown(cmd: list[str], work: Path) -> str:
    """``cmd`` as the results file records it: the scratch directory as ``$WORK`` and paths inside
    the repository relative to it, so the line reruns from any checkout."""
    line = shlex.join(cmd).replace(str(work), "$WORK")
    return line.replace(str(ROOT) + "/", "")


def read_samples(name: str, work: Path, tasks: list[str]) -> dict[str, list[dict]]:
    """``{task: records sorted by doc_id}`` that route ``name`` wrote."""
    out: dict[str, list[dict]] = {}
    if name.startswith("quadllm eval"):
        for line in (work / "eval.jsonl").read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out.setdefault(rec["task"], []).append(rec)
    else:
        folder = work / ("hf" if "hf" in name else "quadllm")
        for task in tasks:
            (path,) = folder.rglob(f"samples_{task}_*.jsonl")
            out[task] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {t: sorted(recs, key=lambda r: r["doc_id"]) for t, recs in out.items()}


def loglikelihoods(records: list[dict]) -> list[float]:
    return [float(r[0]) for rec in records for r in rec["filtered_resps"]]


def scores(records: list[dict]) -> dict[str, float]:
    keys = [k for k in ("acc", "acc_norm") if k in records[0]]
    return {k: sum(float(r[k]) for r in records) / len(records) for k in keys}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="a quadllm checkpoint in the stock layout")
    p.add_argument("--tasks", default="piqa,arc_easy")
    p.add_argument("--limit", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--name", default=None, help="results file stem (default: the checkpoint's parent folder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tasks = args.tasks.split(",")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, cmd in routes(args.checkpoint, tasks, args.limit, args.batch_size, work).items():
            log.info("%s: %s", name, shown(cmd, work))
            t0 = time.perf_counter()
            run = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if run.returncode != 0:
                sys.stderr.write(run.stderr[-4000:])
                raise SystemExit(f"{name} failed with exit code {run.returncode}")
            samples = read_samples(name, work, tasks)
            results[name] = {"command": shown(cmd, work), "seconds": round(time.perf_counter() - t0, 1),
                             "scores": {t: scores(samples[t]) for t in tasks},
                             "loglikelihoods": {t: loglikelihoods(samples[t]) for t in tasks}}
    first = next(iter(results))
    for res in results.values():
        res["max_abs_diff"] = {t: max(abs(a - b) for a, b in zip(res["loglikelihoods"][t],
                                                                   results[first]["loglikelihoods"][t]))
                               for t in tasks}
    stem = args.name or Path(args.checkpoint).resolve().parent.name
    meta = {"command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
            "date": datetime.date.today().isoformat(), "checkpoint": args.checkpoint, "tasks": tasks,
            "limit": args.limit, "batch_size": args.batch_size, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
    out = ROOT / "results" / f"{stem}_lm_eval"
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    lines = [f"# lm-evaluation-harness from its own command line on `{Path(args.checkpoint).name}`", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}). The first {args.limit} "
             f"items of each task at batch size {args.batch_size}, offline (quadllm's task copies through "
             "`--include_path`); each route in its own process, one after the other. Max |diff|: the largest difference of any choice's "
             f"log-likelihood from `{first}`'s.", "",
             "| route | " + " | ".join(f"{t} {m}" for t in tasks for m in results[first]["scores"][t])
             + " | " + " | ".join(f"{t} max abs diff" for t in tasks) + " | seconds |",
             "| --- |" + " ---: |" * (sum(len(results[first]["scores"][t]) for t in tasks) + len(tasks) + 1)]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.4f}" for t in tasks for v in res["scores"][t].values())
                     + " | " + " | ".join(f"{res['max_abs_diff'][t]:.2e}" for t in tasks)
                     + f" | {res['seconds']} |")
    lines += ["", "Commands:", ""] + [f"- {name}: `{res['command']}`" for name, res in results.items()]
    metrics = ", ".join(f"{t} {papers_metric(results[first]['scores'][t])}" for t in tasks)
    lines += ["", f"The papers' metric per task: {metrics}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
