#!/usr/bin/env python
"""Speed on this CPU, measured in one run: quantized linears at Llama-3-8B shapes and SmolLM2 end to end.

Linear layers (M x K x N, M = 1, 16, 2048): float32 and bfloat16 `nn.Linear` against the QUAD
W4A4 linear (r = 64 full-precision outlier columns for K = 4096 inputs, an online Hadamard for
the K = 14336 down_proj input, per-token INT4 activations, packed INT4 weights) on the `fake`
(float simulation) and `cpu-int8` (INT8 GEMM) backends. SmolLM2: prefill of 2048 tokens and 128
decoded tokens (batch 1) for float32, bfloat16 and the QUAD checkpoint on each backend, and the
QUAD checkpoint with a 4-bit integer KV cache when scripts/results_smollm2.py has made it (its
cache memory against float32's). The issue's CPU targets are checked against the measured ratios,
and the cpu-int8 linear at M=2048, 4096x4096 is profiled (top operators), so a missed target
says by how much and where the time goes.
Writes results/bench_cpu.{json,md}; every ratio is between figures of this one run.

    python scripts/bench_cpu.py
    python scripts/bench_cpu.py --quick      # small shapes, a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from quadllm import load, place  # noqa: E402
from quadllm.backends import Int8Kernel  # noqa: E402
from quadllm.evaluation.speed import (  # noqa: E402
    bench_linear,
    bench_model,
    group_ops,
    machine_description,
    prefill_fn,
    quad_linear,
    records_markdown,
    top_ops,
)
from quadllm.io.sources import load_model  # noqa: E402

SHAPES = [(m, k, n) for (k, n) in ((4096, 4096), (4096, 14336), (14336, 4096)) for m in (1, 16, 2048)]
QUICK = [(m, 512, 512) for m in (1, 64)]

log = logging.getLogger("bench")

#: The issue's CPU targets: (what, how to measure it from the records, the least ratio that meets it).
TARGET_SHAPE = (2048, 4096, 4096)



def placed(ckpt, backend: str):
    """A checkpoint loaded and placed on ``backend``."""
    model = load(ckpt)[0]
    place(model, backend)
    return model

def _linear_ms(linear: list[dict], backend: str, shape: tuple[int, int, int]) -> float | None:
    return next((r["median_ms"] for r in linear if r["backend"] == backend and (r["m"], r["k"], r["n"]) == shape),
                None)


def _model_speedup(records: list[dict], variant: str, phase: str) -> float | None:
    return next((r["speedup_vs_fp32"] for r in records if r["variant"] == variant and r["phase"] == phase), None)


def check_targets(linear: list[dict], model: list[dict], prefill: int) -> list[dict]:
    """Each target with its measured ratio, the goal, and whether it is met (None: not measured)."""
    m, k, n = TARGET_SHAPE
    q, fp32, bf16 = (_linear_ms(linear, b, TARGET_SHAPE) for b in ("cpu-int8", "fp32", "bf16"))
    rows = [(f"W4A4 linear (cpu-int8) M={m}, {k}x{n}: throughput vs float32 nn.Linear",
             fp32 / q if q and fp32 else None, 2.5),
            (f"W4A4 linear (cpu-int8) M={m}, {k}x{n}: throughput vs bfloat16 nn.Linear",
             bf16 / q if q and bf16 else None, 1.3),
            (f"SmolLM2 prefill of {prefill} tokens (QUAD cpu-int8) vs float32",
             _model_speedup(model, "QUAD cpu-int8", "prefill"), 1.5),
            ("SmolLM2 decode (QUAD cpu-int8) vs float32, per token", _model_speedup(model, "QUAD cpu-int8", "decode"),
             1.0)]
    return [{"target": t, "measured": None if v is None else round(v, 3), "goal": g,
             "met": None if v is None else v >= g, "short_by": None if v is None or v >= g else round(g / v, 3)}
            for t, v, g in rows]


def profile_linear(shape: tuple[int, int, int], rank: int = 64, top: int = 8) -> list[dict]:
    """The operators of one cpu-int8 QUAD linear call (after warm-up), by self CPU time."""
    m, k, n = shape
    layer = quad_linear(k, n, rank, hadamard=False)
    layer.kernel = Int8Kernel(cache_weights=True)
    x = torch.randn(m, k + rank, generator=torch.Generator().manual_seed(0))
    return top_ops(lambda: layer(x), repeat=3, top=top)


def profile_prefill(variants: dict, vocab: int, tokens: int) -> dict[str, dict]:
    """For each model: its prefill of ``tokens`` random tokens (one call after a warm-up) by
    operator group (:func:`group_ops`) and its top operators."""
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    out = {}
    for name, model in variants.items():
        ops = top_ops(prefill_fn(model, ids), repeat=1, top=None)
        out[name] = {"groups": group_ops(ops), "top": ops[:8]}
        log.info("%s prefill profile: %s", name, out[name]["groups"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--checkpoint", default=str(ROOT / "runs" / "smollm2" / "quad-w4a4-r64"),
                   help="the SmolLM2 QUAD checkpoint (made by scripts/results_smollm2.py)")
    p.add_argument("--kv4-checkpoint", default=str(ROOT / "runs" / "smollm2" / "quad-w4a4-r64-kv4"),
                   help="the same with a 4-bit KV cache (scripts/results_smollm2.py)")
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--decode", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "results" / "bench_cpu"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    linear = bench_linear(QUICK if args.quick else SHAPES, repeat=3 if args.quick else 7,
                          min_seconds=0.2 if args.quick else 1.0)
    model_records, prefill_profile = [], {}
    prefill = 256 if args.quick else args.prefill
    ckpt = Path(args.checkpoint)
    if (ckpt / "quadllm_config.json").is_file():
        fp = load_model(None)[0]
        variants = {"fp32": fp, "bf16": load_model(None)[0].to(torch.bfloat16),
                    "QUAD fake": load(ckpt)[0], "QUAD cpu-int8": placed(ckpt, "cpu-int8")}
        kv4 = Path(args.kv4_checkpoint)
        if (kv4 / "quadllm_config.json").is_file():
            variants["QUAD KV4 cpu-int8"] = placed(kv4, "cpu-int8")
        else:
            log.warning("no KV4 checkpoint at %s: the integer KV cache row is skipped", kv4)
        model_records = bench_model(variants, fp.config.vocab_size, [prefill], 16 if args.quick else args.decode,
                                    [1], repeat=2 if args.quick else 3)
        prefill_profile = profile_prefill({k: variants[k] for k in ("fp32", "bf16", "QUAD cpu-int8")},
                                          fp.config.vocab_size, prefill)
    else:
        log.warning("no checkpoint at %s: SmolLM2 end to end skipped (run scripts/results_smollm2.py first)", ckpt)
    targets = check_targets(linear, model_records, prefill)
    profile = [] if args.quick else profile_linear(TARGET_SHAPE)
    meta = {"command": "python scripts/bench_cpu.py " + " ".join(sys.argv[1:]), "date": dt.date.today().isoformat(),
            "machine": machine_description(), "seconds": round(time.perf_counter() - t0, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "linear": linear, "model": model_records,
                                                    "targets": targets, "profile": profile,
                                                    "prefill_profile": prefill_profile}, indent=2) + "\n")
    md = ["# CPU speed: quantized linears and SmolLM2", "", f"Generated by `{meta['command']}` on {meta['date']} "
          f"({meta['machine']}); medians after warm-up, ratios within this run.", "", "## Linear layers", "",
          records_markdown(linear, ["backend", "m", "k", "n", "median_ms", "gflops", "speedup_vs_fp32"])]
    if model_records:
        md += ["## SmolLM2-135M-Instruct end to end", "",
               records_markdown(model_records, ["variant", "phase", "batch", "tokens", "median_ms", "tokens_per_s",
                                                "speedup_vs_fp32", "kv_cache_mb", "kv_cache_vs_fp32"])]
    md += ["## Targets", "", "| target | measured | goal | met |", "| --- | ---: | ---: | --- |"]
    for t in targets:
        verdict = ("not measured" if t["met"] is None else "yes" if t["met"]
                   else f"no: {t['short_by']}x short")
        measured = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
        md.append(f"| {t['target']} | {measured} | {t['goal']:.1f}x | {verdict} |")
    if profile:
        md += ["", f"## Where the cpu-int8 linear's time goes (M={TARGET_SHAPE[0]}, {TARGET_SHAPE[1]}x{TARGET_SHAPE[2]}, "
               "r=64, torch.profiler, self time per call)", "",
               records_markdown(profile, ["op", "self_ms_per_call", "share", "calls_per_call"])]
    if prefill_profile:
        md += ["", f"## Where SmolLM2's prefill time goes ({prefill} tokens, torch.profiler, self time by operator group)",
               "", "| group | " + " | ".join(f"{v} ms (share)" for v in prefill_profile) + " |",
               "| --- |" + " ---: |" * len(prefill_profile)]
        names = list(dict.fromkeys(g["group"] for p in prefill_profile.values() for g in p["groups"]))
        for g in names:
            cells = []
            for p in prefill_profile.values():
                r = next((x for x in p["groups"] if x["group"] == g), None)
                cells.append("-" if r is None else f"{r['self_ms_per_call']:.0f} ({100 * r['share']:.0f}%)")
            md.append(f"| {g} | " + " | ".join(cells) + " |")
        for v, p in prefill_profile.items():
            md += ["", f"Top operators, {v}:", "", records_markdown(p["top"], ["op", "self_ms_per_call", "share",
                                                                              "calls_per_call"])]
    out.with_suffix(".md").write_text("\n".join(md))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
