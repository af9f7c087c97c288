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

With ``--models CKPT[,CKPT]`` (issue 22) it instead times each QUAD checkpoint beside its original
model and llama.cpp, in one process: torch float32 and bfloat16, QUAD W4A4 on ``cpu-int8`` and on
``cpu-int4`` with each head of ``--heads`` (weight-only INT8, W8A8, INT4; their accuracy cost:
scripts/head_cost.py), the W8A8 one also with each linear alone (no sibling fusion), each decoding eagerly and through the compiled step
(:class:`quadllm.backends.compiled.CompiledDecoder`), and llama.cpp (``pip install
'quadllm[llamacpp]'``) on the GGUF file the model comes from and on that file requantized to Q4_0
and Q8_0, all with torch's thread count; prefill of 512 and 2048 tokens, decode of 128 tokens,
batch 1 and 8, and each decode row against the memory-bandwidth bound (weight bytes read per step
over the bandwidth of a large ``copy_``). The issue's targets are checked per model and a decode
step of the W8A8-head QUAD variant is profiled. Writes results/bench_cpu_models.{json,md}; ``--lengths``,
``--batches``, ``--heads``, ``--llamacpp ''``, ``--no-unfused`` and ``--no-profile`` narrow it (a
shorter run, e.g. to compare heads; the targets are judged on what was timed).

    python scripts/bench_cpu.py
    python scripts/bench_cpu.py --quick      # small shapes, a smoke run
    python scripts/bench_cpu.py --models runs/smollm2/default,runs/qwen2.5-coder-0.5b/speed-rtn
    python scripts/bench_cpu.py --models runs/smollm2/default,runs/qwen2.5-coder-0.5b/speed-rtn --lengths '' \
        --batches 1 --heads int8,w8a8 --llamacpp source --no-unfused --no-profile --models-out results/bench_cpu_heads
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
from quadllm.backends.compiled import CompileError  # noqa: E402
from quadllm.backends.int4 import int4_kernel_name  # noqa: E402
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


#: the head of the variant whose prefill the issue-22 targets judge, and whose decode step is profiled
FAST_HEAD = "w8a8"
#: cpu-int4's heads timed by default (each judged by the decode targets; accuracy: scripts/head_cost.py)
HEADS = ("int8", "w8a8", "int4")


def quad_variant(head: str) -> str:
    return f"QUAD cpu-int4 head-{head}"


QUAD_FAST = quad_variant(FAST_HEAD)
#: the same with each linear computed alone (place(fuse=False)), to show what fusing siblings gives
QUAD_UNFUSED = f"{QUAD_FAST} unfused"


def model_targets(records: list[dict], llamacpp_source: str | None, heads=HEADS) -> list[dict]:
    """Issue 22's targets for one model, from its records (None where a row is missing)."""
    def rec(variant, phase, batch, tokens, compiled=False) -> dict:
        return next((r for r in records if r["variant"] == variant and r["phase"] == phase and r["batch"] == batch
                     and r["tokens"] == tokens and bool(r.get("compiled")) == compiled), {})

    def tps(*key, **kw):
        return rec(*key, **kw).get("tokens_per_s")

    ratio = (lambda a, b: a / b if a and b else None)
    rows = []
    for variant in map(quad_variant, heads):
        decode = max((r for r in records if r["variant"] == variant and r["phase"] == "decode" and r["batch"] == 1),
                     key=lambda r: r["tokens_per_s"], default=None)
        if decode is None and variant != QUAD_FAST:
            continue
        dec, compiled = (decode["tokens_per_s"], bool(decode.get("compiled"))) if decode else (None, False)
        tokens = decode["tokens"] if decode else None
        name = f"{variant}{' (compiled)' if compiled else ''}"
        rows += [(f"decode, batch 1: {name} vs llama.cpp on the source GGUF",
                  ratio(dec, tps(llamacpp_source, "decode", 1, tokens)), 1.0),
                 (f"decode, batch 1: {name} vs torch bfloat16 (eager)", ratio(dec, tps("bf16", "decode", 1, tokens)),
                  1.5),
                 (f"decode, batch 1: {name} vs torch bfloat16 compiled",
                  ratio(dec, tps("bf16", "decode", 1, tokens, True)), None),
                 (f"decode, batch 1: {name}, share of the memory-bandwidth bound",
                  rec(variant, "decode", 1, tokens, compiled).get("of_bound"), 0.5)]
    rows.append((f"prefill 2048, batch 1: {QUAD_FAST} (cpu-int8's GEMMs) vs torch bfloat16",
                 ratio(tps(QUAD_FAST, "prefill", 1, 2048), tps("bf16", "prefill", 1, 2048)), 1.2))
    return [{"target": t, "measured": None if v is None else round(v, 3), "goal": g,
             "met": None if v is None or g is None else v >= g} for t, v, g in rows]


def profile_decode_step(model, vocab: int, steps: int = 10) -> dict:
    """Operators of one compiled decode step (batch 1, 16-token prompt), by self time."""
    from quadllm.backends.compiled import CompiledDecoder

    dec = CompiledDecoder(model, 16 + 3 * steps + 8)
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    token = dec.prefill(ids).argmax(-1, keepdim=True)
    dec.step(token)
    ops = top_ops(lambda: dec.step(token), repeat=steps, top=None, warmup=2)
    return {"self_ms_per_step": round(sum(o["self_ms_per_call"] for o in ops), 2),
            "operator_calls_per_step": round(sum(o["calls_per_call"] for o in ops)), "top": ops[:12]}


def bench_models(ckpts: list[str], prefill: list[int], prefill_batches: dict[int, list[int]], decode: int,
                 batches: list[int], repeat: int, llamacpp: list[str], on_model=None, heads=HEADS,
                 unfused: bool = True, profile: bool = True) -> list[dict]:
    """Every row of issue 22 for each checkpoint (see the module's docstring); ``on_model`` is
    called with the results so far after each checkpoint."""
    from quadllm.evaluation.llamacpp import bench_gguf, gguf_weight_bytes, llamacpp_files, llamacpp_unavailable_reason
    from quadllm.evaluation.speed import add_bound, add_ratio, decode_weight_bytes, memory_bandwidth_gbs
    from quadllm.io.checkpoint import read_meta
    from quadllm.io.sources import resolve

    out = []
    for ckpt in ckpts:
        spec = (read_meta(ckpt).get("original_model") or {}).get("spec")
        t0 = time.perf_counter()
        fp, tok, _ = load_model(spec)
        variants = {"fp32": fp, "bf16": load_model(spec)[0].to(torch.bfloat16)}
        variants["QUAD cpu-int8"] = load(ckpt)[0]
        place(variants["QUAD cpu-int8"], "cpu-int8")
        for head in heads:
            variants[quad_variant(head)] = load(ckpt)[0]
            place(variants[quad_variant(head)], "cpu-int4", head=head)
        if unfused:  # the same without running q/k/v and gate/up as one GEMM each (quadllm.backends.siblings)
            variants[QUAD_UNFUSED] = load(ckpt)[0]
            place(variants[QUAD_UNFUSED], "cpu-int4", head=FAST_HEAD, fuse=False)
        vocab = len(tok)
        records = []
        for b in batches:  # prefill lengths per batch size; decode at every batch size
            lengths = [t for t in prefill if b in prefill_batches.get(t, batches)]
            records += bench_model(variants, vocab, lengths, decode, [b], repeat=repeat, compile_decode=True)
        step_bytes = {k: decode_weight_bytes(v) for k, v in variants.items()}
        source = resolve(spec)
        reason = llamacpp_unavailable_reason()
        names: dict[str, Path] = {}
        if reason is not None:
            log.warning("llama.cpp rows skipped: %s", reason)
        elif source.kind != "gguf":
            log.warning("llama.cpp rows skipped: %s is not a GGUF file", source.spec)
        else:
            names = llamacpp_files(source.path, llamacpp)
            for name, path in names.items():
                for b in batches:
                    lengths = [n for n in prefill if b in prefill_batches.get(n, batches)]
                    records += bench_gguf(path, name, vocab, lengths, decode, [b], repeat=repeat)
                step_bytes[name] = gguf_weight_bytes(path)[0]
        bandwidth = memory_bandwidth_gbs()
        add_bound(records, step_bytes, bandwidth)
        add_ratio(records, "bf16", "vs_bf16")
        res = {"checkpoint": ckpt, "model": source.name, "bandwidth_gbs": round(bandwidth, 2),
               "weight_mb_per_step": {k: round(v / 1e6, 1) for k, v in step_bytes.items()},
               "records": records, "targets": model_targets(records, next((n for n in names if "source" in n), None),
                                                            heads),
               "decode_profile": None}
        out.append(res)
        if on_model is not None:
            on_model(out)
        if not profile or QUAD_FAST not in variants:
            res["seconds"] = round(time.perf_counter() - t0)
            del variants
            continue
        try:
            res["decode_profile"] = profile_decode_step(variants[QUAD_FAST], vocab)
        except CompileError as exc:
            log.warning("no profile of the compiled step: %s", exc)
        if prefill:
            tokens = max(prefill)
            res["prefill_profile"] = {"tokens": tokens, "variants": profile_prefill(
                {k: variants[k] for k in ("bf16", QUAD_FAST)}, vocab, tokens)}
        res["seconds"] = round(time.perf_counter() - t0)
        if on_model is not None:
            on_model(out)
        log.info("%s done in %.0f s", ckpt, time.perf_counter() - t0)
        del variants
    return out


def models_markdown(results: list[dict], meta: dict) -> str:
    md = ["# CPU speed against bfloat16 and llama.cpp (issue 22)", "",
          f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}), {meta['seconds']:.0f} s, alone on "
          "the machine; medians after warm-up, every ratio within this run. `compiled`: decoded through the compiled "
          "step (static KV cache, `torch.compile` with inductor's C++ wrapper); `vs bf16`: against torch bfloat16's eager row of the same phase, "
          "batch and length; `of bound`: the share of the memory-bandwidth bound (weight bytes a step reads over the "
          "bandwidth of a large `copy_`, read + written). cpu-int4's INT4 kernel: "
          f"`{meta.get('int4_kernel', 'torch-int4pack')}` (quadllm.backends.int4).", ""]
    for res in results:
        md += [f"## {res['model']} (`{res['checkpoint']}`)", "",
               f"Bandwidth {res['bandwidth_gbs']} GB/s; weight MB read per decode step: "
               + ", ".join(f"{k} {v}" for k, v in res["weight_mb_per_step"].items()) + ".", "",
               "| variant | phase | compiled | batch | tokens | tok/s | vs bf16 | of bound | compile s |",
               "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["records"]:
            md.append(f"| {r['variant']} | {r['phase']} | {'yes' if r.get('compiled') else '-'} | {r['batch']} | "
                      f"{r['tokens']} | {r['tokens_per_s']} | {r.get('vs_bf16', '-')} | {r.get('of_bound', '-')} | "
                      f"{r.get('compile_s', '-')}{' (Python wrapper)' if r.get('wrapper') == 'python' else ''} |")
        md += ["", "Targets:", "", "| target | measured | goal | met |", "| --- | ---: | ---: | --- |"]
        for t in res["targets"]:
            measured = "-" if t["measured"] is None else f"{t['measured']:.2f}x"
            goal = "-" if t["goal"] is None else f"{t['goal']}x"
            verdict = "not measured" if t["measured"] is None else "-" if t["met"] is None else (
                "yes" if t["met"] else "no")
            md.append(f"| {t['target']} | {measured} | {goal} | {verdict} |")
        p = res["decode_profile"]
        if p is not None:
            md += ["", f"One compiled decode step of {QUAD_FAST} (batch 1, torch.profiler): {p['self_ms_per_step']} ms "
                   f"of operator self time in {p['operator_calls_per_step']} calls.", "",
                   records_markdown(p["top"], ["op", "self_ms_per_call", "share", "calls_per_call"])]
        md += prefill_profile_markdown(res.get("prefill_profile"))
    return "\n".join(md) + "\n"


def prefill_profile_markdown(profile: dict | None) -> list[str]:
    """One prefill per variant by operator group, and the most that speeding up everything but
    attention could give against bfloat16 (attention runs the same SDPA kernel in every variant)."""
    if not profile:
        return []
    md = ["", f"One prefill of {profile['tokens']} tokens (batch 1, torch.profiler), operator self time by group:", "",
          "| variant | group | ms | share |", "| --- | --- | ---: | ---: |"]
    for name, p in profile["variants"].items():
        md += [f"| {name} | {g['group']} | {g['self_ms_per_call']} | {g['share']:.0%} |" for g in p["groups"]]
    bf16 = profile["variants"].get("bf16")
    attn = next((g for g in bf16["groups"] if g["group"] == "attention"), None) if bf16 else None
    if attn and attn["share"]:
        md += ["", f"Attention is {attn['share']:.0%} of bfloat16's prefill: a variant whose other work took no time at "
               f"all would prefill at most {1 / attn['share']:.2f}x bfloat16's speed with the same attention."]
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", default=None, help="comma-separated QUAD checkpoints: the issue-22 model rows instead")
    p.add_argument("--batch8-prefill", default="512",
                   help="prefill lengths also timed at batch 8 (the others at batch 1 only; '' for none)")
    p.add_argument("--llamacpp", default="source,Q4_0,Q8_0", help="llama.cpp's files ('' for none)")
    p.add_argument("--lengths", default="512,2048", help="--models: prefill lengths ('' for none)")
    p.add_argument("--batches", default="1,8", help="--models: batch sizes")
    p.add_argument("--heads", default=",".join(HEADS), help="--models: cpu-int4's heads")
    p.add_argument("--no-unfused", action="store_true", help="--models: no row without sibling fusion")
    p.add_argument("--no-profile", action="store_true", help="--models: no profiles of the decode step and prefill")
    p.add_argument("--models-out", default=str(ROOT / "results" / "bench_cpu_models"))
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
    if args.models:
        lengths = [256] if args.quick else [int(v) for v in args.lengths.split(",") if v.strip()]
        heads = tuple(h for h in args.heads.split(",") if h)
        b8 = [int(v) for v in args.batch8_prefill.split(",") if v.strip()]
        out = Path(args.models_out)
        out.parent.mkdir(parents=True, exist_ok=True)

        def write(results: list[dict]) -> None:  # after each model, so a later failure keeps the earlier ones
            meta = {"command": "python scripts/bench_cpu.py " + " ".join(sys.argv[1:]),
                    "date": dt.date.today().isoformat(), "machine": machine_description(),
                    "int4_kernel": int4_kernel_name(),
                    "seconds": round(time.perf_counter() - t0, 1)}
            out.with_suffix(".json").write_text(json.dumps({"meta": meta, "models": results}, indent=1) + "\n")
            out.with_suffix(".md").write_text(models_markdown(results, meta))

        bench_models(args.models.split(","), lengths, {t: [1, 8] if t in b8 else [1] for t in lengths},
                     16 if args.quick else args.decode, [int(b) for b in args.batches.split(",")],
                     1 if args.quick else 2, [t for t in args.llamacpp.split(",") if t], on_model=write, heads=heads,
                     unfused=not args.no_unfused, profile=not args.no_profile)
        print(out.with_suffix(".md").read_text())
        return
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
            "machine": machine_description(), "int4_kernel": int4_kernel_name(), "seconds": round(time.perf_counter() - t0, 1)}
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
