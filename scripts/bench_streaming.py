#!/usr/bin/env python
"""Streaming quantization of a model larger than memory: peak resident memory and time.

Writes the random Llama-3-8B-shaped checkpoint (scripts/make_random_llama8b.py, about 16 GB of
bfloat16) if it is not there yet, quantizes it with `quadllm quantize --streaming on` in its own
process (16 calibration samples of 512 tokens of wiki.valid.tokens by default), and writes
results/streaming_llama8b.{json,md} with the peak resident memory the quantize process reports
(getrusage), its time, the checkpoint sizes and the machine's memory.

    python scripts/bench_streaming.py                          # QUAD r=64, GPTQ weights
    python scripts/bench_streaming.py --weights rtn            # the faster RTN variant
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from make_random_llama8b import llama3_8b_config, write  # noqa: E402
from results_smollm2 import portable, run_child  # noqa: E402

from quadllm.cli.invocation import child_argv, shown  # noqa: E402
from quadllm.evaluation.speed import machine_description  # noqa: E402

log = logging.getLogger("bench_streaming")
LIMIT_MB = 6 * 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=str(ROOT / "runs" / "streaming"))
    p.add_argument("--weights", choices=("gptq", "rtn"), default="gptq")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--layers", type=int, default=32, help="fewer layers for a quick check (same layer shapes)")
    p.add_argument("--out", default=str(ROOT / "results" / "streaming_llama8b"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    work = Path(args.work)
    model_dir = work / f"llama8b-random-{args.layers}l"
    if not model_dir.is_dir():
        t0 = time.perf_counter()
        write(model_dir, llama3_8b_config(args.layers, 4096, 14336, 32, 8, 128256), seed=0)
        log.info("wrote %s in %.0f s", model_dir, time.perf_counter() - t0)
    out = work / f"{model_dir.name}-quad-r{args.rank}-{args.weights}"
    cmd = child_argv("quantize", "--model", str(model_dir), "--streaming", "on",
                     "--rank", str(args.rank), "--weights", args.weights, "--calib", "wikitext2", "--calib-samples",
           str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen), "--out", str(out), "-q")
    log.info("running: %s", " ".join(cmd[1:]))
    t0 = time.perf_counter()
    proc = run_child(cmd, cwd=Path.cwd())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"quantize failed with exit code {proc.returncode}")
    summary = json.loads(proc.stdout)
    total_mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    record = {
        "command": "python scripts/bench_streaming.py " + " ".join(sys.argv[1:]),
        "quantize_command": shown(cmd),
        "date": dt.date.today().isoformat(), "machine": machine_description(),
        "machine_memory_gb": round(total_mem / 2**30, 1), "layers": args.layers,
        "model_safetensors_gb": round(summary["original_file_mb"] / 1e3, 2),
        "peak_memory_mb": summary["peak_memory_mb"], "limit_mb": LIMIT_MB,
        "under_limit": summary["peak_memory_mb"] < LIMIT_MB, "wall_seconds": round(wall, 1), "weights": args.weights,
        "summary": summary, "timings": json.loads((out / "quadllm_config.json").read_text()).get("timings"),
    }
    outp = Path(args.out)
    outp.parent.mkdir(parents=True, exist_ok=True)
    record = portable(record)
    runs = merge_runs(outp.with_suffix(".json"), record)
    tmp = outp.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    tmp.replace(outp.with_suffix(".json"))
    outp.with_suffix(".md").write_text(render(runs))
    print(outp.with_suffix(".md").read_text())


def run_key(record: dict) -> tuple:
    """A run is replaced by a later one of the same model depth, weights and rank."""
    return record["layers"], record["summary"]["method"], record["summary"]["rank"], record["weights"]


def merge_runs(path: Path, record: dict) -> list[dict]:
    """The runs already in ``path`` with ``record`` added or replacing the run with the same key,
    deepest model first."""
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    runs = [r for r in runs if run_key(r) != run_key(record)] + [record]
    return sorted(runs, key=lambda r: (-r["layers"], r["weights"]))


def render(runs: list[dict]) -> str:
    md = [
        "# Streaming quantization of a Llama-3-8B-shaped model (random weights)",
        "",
        "Each row is one `python scripts/bench_streaming.py` run (its arguments in the JSON file), "
        "quantizing with `quadllm quantize --streaming on` in its own process; peak resident memory "
        "is that process's (getrusage). Fewer layers keep every shape of the 8B model (the embedding "
        "and head included), so the peak of one layer's work is the same; only the time shrinks.",
        "",
        "| model on disk | layers | method | peak resident memory | limit | under limit | wall time | "
        "checkpoint | vs FP16 | date |",
        "| ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in runs:
        s = r["summary"]
        md.append(f"| {r['model_safetensors_gb']} GB | {r['layers']} | QUAD r={s['rank']}, "
                  f"{r['weights'].upper()} | {s['peak_memory_mb']} MB | {r['limit_mb']} MB | "
                  f"{'yes' if r['under_limit'] else '**no**'} | {r['wall_seconds'] / 60:.1f} min | "
                  f"{s['checkpoint_mb'] / 1e3:.2f} GB | {s['size_vs_fp16']:.3f} | {r['date']} |")
    md += ["", "Machines and commands:", ""]
    md += [f"- {r['layers']} layers, {r['weights'].upper()}: `{r['command']}` on {r['machine']} "
           f"({r['machine_memory_gb']} GiB); quantize command `{r['quantize_command']}`." for r in runs]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    main()
