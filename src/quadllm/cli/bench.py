"""``quadllm bench``: the command-line side of :mod:`quadllm.evaluation.speed`."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..backends import HEAD_PRECISIONS, place
from ..config import DEFAULT_RANK, ConfigError
from ..evaluation.llamacpp import LLAMACPP_TYPES, bench_gguf, gguf_weight_bytes, llamacpp_files, llamacpp_unavailable_reason
from ..evaluation.speed import (
    LINEAR_BACKENDS,
    add_bound,
    add_ratio,
    bench_linear,
    bench_model,
    decode_weight_bytes,
    memory_bandwidth_gbs,
    parse_shapes,
    records_markdown,
)
from ..io.checkpoint import is_checkpoint, read_meta
from ..io.memory import peak_rss_mb
from ..io.sources import load_model, resolve
from ..nn.modules import QuadHead, QuadLinear
from ..pipelines.loading import load
from .common import add_common, open_model, write_text


def add_parsers(sub) -> None:
    b = sub.add_parser("bench", help="speed and memory of quantized linears or models against float")
    bs = b.add_subparsers(dest="bench_command", required=True)
    lin = bs.add_parser("linear", help="one linear layer: float baselines against the quantized backends")
    lin.add_argument("--shapes", required=True, help="MxKxN[,MxKxN...]")
    lin.add_argument("--rank", type=int, default=DEFAULT_RANK, help="outlier columns of the QUAD layer (K < 8192)")
    lin.add_argument("--backends", default=None,
                     help=f"comma-separated among {', '.join(LINEAR_BACKENDS)} (default: fp32,bf16,fake,"
                          "cpu-int8 on the CPU; fp32,fp16,bf16,fake,gpu with --device cuda)")
    lin.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    lin.add_argument("--repeat", type=int, default=7)
    lin.add_argument("--json", default=None, help="write the records as JSON to this file")
    add_common(lin)
    mod = bs.add_parser("model", help="prefill and decode of a model or checkpoint on each backend")
    mod.add_argument("model", nargs="?", default=None, help="quadllm checkpoint or original model (default SmolLM2)")
    mod.add_argument("--prefill", default="512,2048", help="prompt lengths")
    mod.add_argument("--decode", type=int, default=128, help="generated tokens (0: no decode)")
    mod.add_argument("--batch", default="1,8", help="batch sizes")
    mod.add_argument("--backends", default="fake,cpu-int8",
                     help="backends for a quantized checkpoint: fake, fake-bf16 (the simulation in bfloat16, as "
                          "eval --dtype bfloat16 runs it), cpu-int8, cpu-int4 (decode reads packed INT4)")
    mod.add_argument("--heads", default="float",
                     help=f"comma-separated output head precisions for each quantized backend ({', '.join(HEAD_PRECISIONS)})")
    mod.add_argument("--compile", action="store_true",
                     help="also decode every variant through a compiled step (torch.compile, a static KV cache; "
                          "tens of seconds to compile each)")
    mod.add_argument("--llamacpp", default="",
                     help="also time llama.cpp (pip install 'quadllm[llamacpp]') on the model's GGUF file: comma-separated "
                          f"among source (the file as it is), {', '.join(LLAMACPP_TYPES)} (requantized by llama.cpp)")
    mod.add_argument("--repeat", type=int, default=3)
    mod.add_argument("--json", default=None, help="write the records as JSON to this file")
    add_common(mod)


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from exc
    if not values or min(values) < 1:
        raise ConfigError(f"{what} must be positive integers, got {text!r}")
    return values


def cmd_bench(args) -> int:
    t0 = time.perf_counter()
    if args.bench_command == "linear":
        try:
            shapes = parse_shapes(args.shapes)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        backends = args.backends or ("fp32,fp16,bf16,fake,gpu" if args.device == "cuda" else "fp32,bf16,fake,cpu-int8")
        try:
            records = bench_linear(shapes, rank=args.rank, backends=tuple(backends.split(",")), repeat=args.repeat,
                                   device=args.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        cols = ["backend", "m", "k", "n", "median_ms", "gflops", "speedup_vs_fp32"]
        extra: dict[str, Any] = {}
    else:
        prefill, batches = _ints(args.prefill, "--prefill"), _ints(args.batch, "--batch")
        backends = args.backends.split(",")
        if "gpu" in backends:
            raise ConfigError("bench model times CPU backends (fake, fake-bf16, cpu-int8, cpu-int4); time the gpu backend's "
                              "kernels with `quadllm bench linear --device cuda` (scripts/gpu_check.py)")
        unknown = [b for b in backends if b not in MODEL_BACKENDS]
        if unknown:
            raise ConfigError(f"bench model --backends: unknown {', '.join(unknown)} (choose from "
                              f"{', '.join(MODEL_BACKENDS)})")
        heads = args.heads.split(",")
        if any(h not in HEAD_PRECISIONS for h in heads):
            raise ConfigError(f"bench model --heads {args.heads!r}: choose among {', '.join(HEAD_PRECISIONS)}")
        ggufs = _llamacpp_files(args.llamacpp, args.model)  # refused before any model loads
        model, tok, meta, _ = open_model(args.model)
        if meta is not None:
            original = load_model((meta.get("original_model") or {}).get("spec"))[0]
        else:
            original = model
        variants = {"fp32": original, "bf16": _bf16_copy(original)}
        if meta is not None:
            for backend in backends:
                if backend == "fake-bf16":
                    variants[backend] = load(args.model, dtype=torch.bfloat16)[0]
                    continue
                for head in heads:
                    m = model if backend == "fake" and head == "float" else load(args.model)[0]
                    place(m, backend, head=head)
                    variants[backend if head == "float" else f"{backend} head-{head}"] = m
        records = bench_model(variants, len(tok), prefill, args.decode, batches, repeat=args.repeat,
                              compile_decode=args.compile)
        step_bytes = {k: decode_weight_bytes(v) for k, v in variants.items()}
        for name, path in ggufs.items():
            records += bench_gguf(path, name, len(tok), prefill, args.decode, batches, repeat=args.repeat)
            step_bytes[name] = gguf_weight_bytes(path)[0]
        bandwidth = memory_bandwidth_gbs()
        add_bound(records, step_bytes, bandwidth)
        add_ratio(records, "bf16", "vs_bf16")
        cols = ["variant", "phase", "compiled", "batch", "tokens", "median_ms", "tokens_per_s", "speedup_vs_fp32",
                "vs_bf16", "of_bound", "kv_cache_mb", "kv_cache_vs_fp32"]
        extra = {"weights_mb": {k: round(_tensor_mb(v), 1) for k, v in variants.items()},
                 "bandwidth_gbs": round(bandwidth, 2), "llamacpp_files": {k: str(v) for k, v in ggufs.items()}}
    print(records_markdown(records, cols), end="")
    out = {"records": records, **extra, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "peak_memory_mb": round(peak_rss_mb()), "seconds": round(time.perf_counter() - t0, 1)}
    if args.json:
        write_text(args.json, json.dumps(out, indent=2) + "\n")
    return 0


#: What ``bench model --backends`` times for a checkpoint.
MODEL_BACKENDS = ("fake", "fake-bf16", "cpu-int8", "cpu-int4")


def _llamacpp_files(types: str, model: str | None) -> dict[str, Path]:
    """``bench model --llamacpp``: the GGUF file of each asked type, by row name."""
    asked = [t for t in types.split(",") if t.strip()]
    if not asked:
        return {}
    unknown = [t for t in asked if t != "source" and t not in LLAMACPP_TYPES]
    if unknown:
        raise ConfigError(f"--llamacpp: unknown {', '.join(unknown)} (choose among source, {', '.join(LLAMACPP_TYPES)})")
    reason = llamacpp_unavailable_reason()
    if reason is not None:
        raise ConfigError(f"--llamacpp: {reason}")
    spec = model
    if model is not None and is_checkpoint(model):
        spec = (read_meta(model).get("original_model") or {}).get("spec")
    source = resolve(spec)
    if source.kind != "gguf":
        raise ConfigError(f"--llamacpp needs a model that starts from a GGUF file; {source.spec} is a {source.kind}")
    return llamacpp_files(source.path, asked)


def _bf16_copy(model):
    return copy.deepcopy(model).to(torch.bfloat16)


def _tensor_mb(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    total += sum(m.kernel.extra_bytes() for m in model.modules()
                 if isinstance(m, (QuadLinear, QuadHead)) and m.kernel is not None)
    return total / 1e6


HANDLERS = {"bench": cmd_bench}
