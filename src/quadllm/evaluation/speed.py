"""Speed and memory measurements: quantized linears and whole models against their float originals.

Every figure is a median over repeated runs after warm-up, measured in one process and one run
so that ratios between backends are meaningful; results are records (dicts) for JSON and
Markdown. Nothing here asserts a speed: the scripts and the CLI write what they measure.

- :func:`bench_linear`: one ``[M, K] @ [K, N]`` layer as ``nn.Linear`` in float32 and bfloat16, and
  as a QUAD W4A4 :class:`~quadllm.nn.modules.QuadLinear` (``r`` outlier columns in full precision,
  per-token INT4 activations, packed INT4 weights; with ``hadamard`` the online Hadamard a
  down_proj carries) on the ``fake`` and ``cpu-int8`` backends.
- :func:`bench_model`: prefill and greedy decode with a KV cache for an original model (float32,
  bfloat16) and a quadllm checkpoint on each backend.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
from torch import nn
from transformers import DynamicCache

from ..backends import KERNELS, TritonKernel
from ..backends.compiled import CompiledDecoder, CompileError
from ..config import DEFAULT_RANK, ActSpec
from ..core.gptq import rtn_quantize
from ..core.hadamard import OnlineTransform
from ..nn.kv_cache import cache_kwarg, cache_nbytes, make_cache
from ..nn.modules import QuadEmbedding, QuadHead, QuadLinear

log = logging.getLogger(__name__)

__all__ = ["median_ms", "quad_linear", "bench_linear", "bench_model", "records_markdown", "parse_shapes", "top_ops",
           "group_ops", "prefill_fn", "memory_bandwidth_gbs", "decode_weight_bytes", "add_bound", "add_ratio"]


def cpu_name() -> str:
    """The processor's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> str:
    """What results files record about the machine: processor, threads, torch."""
    return (f"{cpu_name()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


def median_ms(fn: Callable[[], Any], warmup: int = 2, repeat: int = 7, min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls; at least ``repeat``
    runs and, when ``min_seconds`` is set, runs until that much time has passed."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        t_end = time.perf_counter() + min_seconds
        while len(times) < repeat or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def parse_shapes(text: str) -> list[tuple[int, int, int]]:
    """``"2048x4096x4096,1x4096x14336"`` -> ``[(2048, 4096, 4096), (1, 4096, 14336)]`` (M x K x N)."""
    shapes = []
    for part in text.split(","):
        try:
            m, k, n = (int(v) for v in part.lower().strip().split("x"))
        except ValueError as exc:
            raise ValueError(f"shape {part!r} is not MxKxN (three positive integers)") from exc
        if min(m, k, n) < 1:
            raise ValueError(f"shape {part!r} has a non-positive size")
        shapes.append((m, k, n))
    return shapes


def quad_linear(k: int, n: int, rank: int, hadamard: bool, act_bits: int = 4, seed: int = 0) -> QuadLinear:
    """A quantized QUAD linear with random weights: input ``k + rank`` (the outlier columns come
    first), INT4 per-channel weights (RTN), per-token activations of ``act_bits`` with clip 0.9."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k + rank, generator=g) / (k + rank) ** 0.5
    res = rtn_quantize(w, rank, bits=4, mse=False)
    transform = OnlineTransform.hadamard(k) if hadamard and rank == 0 else None
    lin = QuadLinear(k + rank, n, rank=rank, act=ActSpec(act_bits, 0.9), transform=transform, allocate=False)
    lin.set_quantized(res.codes, res.scales, res.fp_columns, 4, 0)
    return lin


#: Float ``nn.Linear`` baselines of :func:`bench_linear` by name.
FLOAT_BASELINES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: what :func:`bench_linear` can time: the float baselines and the quantized linear's backends
LINEAR_BACKENDS = (*FLOAT_BASELINES, "fake", *KERNELS, "gpu-unfused")


def bench_linear(shapes: list[tuple[int, int, int]], rank: int = DEFAULT_RANK, backends: tuple[str, ...] = (
        "fp32", "bf16", "fake", "cpu-int8"), repeat: int = 7, min_seconds: float = 0.5,
        hadamard_from: int = 8192, device: str = "cpu") -> list[dict[str, Any]]:
    """Records ``{backend, m, k, n, median_ms, gflops, speedup_vs_fp32, ...}`` per shape and backend.

    The QUAD layer reads ``k + rank`` inputs (its outlier columns) when ``k < hadamard_from`` (a
    residual reader such as q/k/v/gate/up) and carries an online Hadamard over its ``k`` inputs
    otherwise (a down_proj), as in a QUAD model; both are part of the measured time.
    ``device``: ``cpu`` or ``cuda`` (``fp16`` is then a useful baseline; every call is
    synchronized, so the times are the kernels' own). The ``gpu`` backend needs ``cuda``;
    ``gpu-unfused`` is the same kernels with the online Hadamard run as torch matmuls before the
    quantize kernel instead of inside it (what the fusion saves)."""
    unknown = [b for b in backends if b not in LINEAR_BACKENDS]
    if unknown:
        raise ValueError(f"unknown backend(s) {', '.join(unknown)}; choose among {', '.join(LINEAR_BACKENDS)}")
    if any(b.startswith("gpu") for b in backends) and device != "cuda":
        raise ValueError("the gpu backend is benchmarked on device='cuda'")
    cuda = device == "cuda"

    records = []
    for m, k, n in shapes:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(m, k, generator=g).to(device)
        down = k >= hadamard_from
        r = 0 if down else rank
        xr = torch.cat([torch.randn(m, r, generator=g).to(device) * 10, x], dim=1) if r else x
        base = None
        for backend in backends:
            if backend in FLOAT_BASELINES:
                dt = FLOAT_BASELINES[backend]
                layer = nn.Linear(k, n, bias=False).to(device, dt)
                xin = x.to(dt)
                call = (lambda layer=layer, xin=xin: layer(xin))
            else:
                layer = quad_linear(k, n, r, hadamard=down).to(device)
                if backend in ("gpu", "gpu-unfused"):
                    layer.kernel = TritonKernel(fuse_transform=backend == "gpu")
                elif backend in KERNELS:
                    layer.kernel = KERNELS[backend].create(cache_weights=True)
                call = (lambda layer=layer: layer(xr))
            fn = (lambda call=call: (call(), torch.cuda.synchronize())) if cuda else call
            ms = median_ms(fn, repeat=repeat, min_seconds=min_seconds)
            rec = {"backend": backend, "m": m, "k": k, "n": n, "median_ms": round(ms, 4),
                   "gflops": round(2 * m * k * n / ms / 1e6, 2),
                   "outlier_columns": r if backend not in FLOAT_BASELINES else 0,
                   "online_hadamard": down and backend not in FLOAT_BASELINES, "device": device}
            if backend == "fp32":
                base = ms
            if base is not None:
                # significant digits, not decimals: a layer slowed a thousandfold (a busy machine) is not 0.0x
                rec["speedup_vs_fp32"] = float(f"{base / ms:.4g}")
            records.append(rec)
            log.info("%s %dx%dx%d: %.3f ms", backend, m, k, n, ms)
            del layer
            gc.collect()
    return records


def prefill_fn(model, ids):
    """A no-argument call of one forward of ``model`` over ``ids`` without a KV cache, computing the
    logits of the last position only, as a server's prefill does (llama.cpp's too): the head over
    every position would be perplexity evaluation, not prefill."""
    return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1)


def top_ops(fn: Callable[[], Any], repeat: int = 3, top: int | None = 8, warmup: int = 1) -> list[dict[str, Any]]:
    """Where ``fn``'s time goes: its ``top`` operators (all with None) by self CPU time under
    ``torch.profiler`` (after ``warmup`` calls), as records ``{op, self_ms_per_call, share,
    calls_per_call}`` (``share``: of the total self time of all operators)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        with torch.profiler.profile() as prof:
            for _ in range(repeat):
                fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    return [{"op": e.key, "self_ms_per_call": round(e.self_cpu_time_total / repeat / 1000, 2),
             "share": round(e.self_cpu_time_total / total, 3), "calls_per_call": round(e.count / repeat, 1)}
            for e in (events if top is None else events[:top])]


#: Coarse groups of profiler operators (first match wins), for a breakdown of a model's time.
OP_GROUPS = (("integer GEMM", ("aten::_int_mm",)),
             ("attention", ("scaled_dot_product", "flash_attention", "softmax")),
             ("float GEMM", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear")),
             ("activation quantization", ("aten::aminmax", "aten::div", "aten::round", "aten::clamp", "aten::copy_",
                                          "aten::_to_copy", "aten::abs", "aten::amax", "aten::amin", "aten::linalg_vector_norm")))


def group_ops(ops: list[dict[str, Any]], groups=OP_GROUPS) -> list[dict[str, Any]]:
    """Sum :func:`top_ops` records (taken with ``top=None``) into :data:`OP_GROUPS` plus "other":
    ``{group, self_ms_per_call, share}``, largest first. Conversions (``copy_``) are counted as
    quantization overhead, so for a float model that group holds its dtype copies."""
    sums: dict[str, list[float]] = {}
    for o in ops:
        name = next((g for g, keys in groups if any(k in o["op"] for k in keys)), "other")
        acc = sums.setdefault(name, [0.0, 0.0])
        acc[0] += o["self_ms_per_call"]
        acc[1] += o["share"]
    return sorted(({"group": g, "self_ms_per_call": round(v[0], 1), "share": round(v[1], 3)} for g, v in sums.items()),
                  key=lambda r: -r["self_ms_per_call"])


def _decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int, repeat: int) -> tuple[float, int]:
    """Median milliseconds per generated token of greedy decoding with a KV cache (the prompt's
    prefill excluded: timed from the first decode step), and the bytes the cache holds at the
    end. Models that quantize their KV cache decode with the integer cache
    (:class:`quadllm.nn.kv_cache.IntKVCache`), others with transformers' ``DynamicCache``."""


    held = [0]
    name = cache_kwarg(model)

    def run() -> float:
        cache = make_cache(model) or DynamicCache()
        out = model(input_ids=prompt, use_cache=True, **{name: cache})
        nxt = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, use_cache=True, **{name: cache})
            nxt = out.logits[:, -1:].argmax(-1)
        dt = (time.perf_counter() - t0) / new_tokens
        held[0] = cache_nbytes(cache)
        return dt

    with torch.no_grad():
        run()
        ms = 1000 * statistics.median(run() for _ in range(repeat))
    return ms, held[0]


def _compiled_decode_ms_per_token(model, prompt: torch.Tensor, new_tokens: int, repeat: int
                                  ) -> tuple[float, int, float, str]:
    """:func:`_decode_ms_per_token` through a :class:`CompiledDecoder` (static cache of the prompt
    plus ``new_tokens``); also the seconds its first step took to compile and the wrapper it runs
    through ("cpp", or "python" where the C++ one did not build)."""
    dec = CompiledDecoder(model, prompt.shape[1] + new_tokens + 1, batch=prompt.shape[0])

    def run() -> float:
        nxt = dec.prefill(prompt).argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(new_tokens):
            nxt = dec.step(nxt).argmax(-1, keepdim=True)
        return (time.perf_counter() - t0) / new_tokens

    run()
    ms = 1000 * statistics.median(run() for _ in range(repeat))
    return ms, cache_nbytes(dec.cache), dec.compile_seconds or 0.0, "cpp" if dec.cpp_wrapper else "python"


def bench_model(variants: dict[str, nn.Module], vocab: int, prefill: list[int], decode: int, batches: list[int],
                repeat: int = 3, seed: int = 0, compile_decode: bool = False) -> list[dict[str, Any]]:
    """Records ``{variant, phase, batch, tokens, median_ms, tokens_per_s, speedup_vs_fp32}`` (and,
    for decoding, ``kv_cache_mb`` and ``kv_cache_vs_fp32``: the cache after the prompt of 16 and
    ``decode`` new tokens);
    ``variants`` maps a name (the first is the float32 baseline) to a ready model. With
    ``compile_decode`` every variant also decodes through a :class:`CompiledDecoder` (``compiled``
    true, with ``compile_s`` and ``wrapper``: inductor's "cpp" or "python"; its cache is static: allocated for the whole length; its
    ``speedup_vs_fp32`` is against float32's compiled decode)."""
    g = torch.Generator().manual_seed(seed)
    records = []
    base: dict[tuple, float] = {}
    kv_base: dict[tuple, int] = {}
    for name, model in variants.items():
        model.eval()
        for b in batches:
            for t in prefill:
                ids = torch.randint(0, vocab, (b, t), generator=g)
                ms = median_ms(prefill_fn(model, ids), warmup=1, repeat=repeat)
                key = ("prefill", b, t)
                base.setdefault(key, ms)
                records.append({"variant": name, "phase": "prefill", "batch": b, "tokens": t,
                                "median_ms": round(ms, 2), "tokens_per_s": round(b * t / ms * 1000, 1),
                                "speedup_vs_fp32": round(base[key] / ms, 3)})
                log.info("%s prefill b=%d t=%d: %.1f ms", name, b, t, ms)
            if decode:
                prompt = torch.randint(0, vocab, (b, 16), generator=g)
                ms, kv_bytes = _decode_ms_per_token(model, prompt, decode, repeat)
                key = ("decode", b, decode)
                base.setdefault(key, ms)
                kv_base.setdefault(key, kv_bytes)
                records.append({"variant": name, "phase": "decode", "compiled": False, "batch": b, "tokens": decode,
                                "median_ms": round(ms, 3), "tokens_per_s": round(b / ms * 1000, 1),
                                "speedup_vs_fp32": round(base[key] / ms, 3),
                                "kv_cache_mb": round(kv_bytes / 1e6, 3),
                                "kv_cache_vs_fp32": round(kv_bytes / kv_base[key], 3) if kv_base[key] else None})
                log.info("%s decode b=%d: %.2f ms/token", name, b, ms)
                if compile_decode:
                    try:
                        with torch.no_grad():
                            ms, kv_bytes, compile_s, wrapper = _compiled_decode_ms_per_token(model, prompt, decode, repeat)
                    except CompileError as exc:
                        log.warning("%s: no compiled decode (%s)", name, exc)
                        continue
                    key = ("decode", b, decode, "compiled")
                    base.setdefault(key, ms)
                    records.append({"variant": name, "phase": "decode", "compiled": True, "batch": b, "tokens": decode,
                                    "median_ms": round(ms, 3), "tokens_per_s": round(b / ms * 1000, 1),
                                    "speedup_vs_fp32": round(base[key] / ms, 3), "kv_cache_mb": round(kv_bytes / 1e6, 3),
                                    "compile_s": round(compile_s, 1), "wrapper": wrapper})
                    log.info("%s decode compiled b=%d: %.2f ms/token (compiled in %.0f s)", name, b, ms, compile_s)
    return records


def memory_bandwidth_gbs(megabytes: int = 1024, repeat: int = 5) -> float:
    """The machine's memory bandwidth as torch's threads see it: bytes read and written per second
    by ``copy_`` between two buffers much larger than any cache (median of ``repeat``)."""
    src = torch.ones(megabytes << 20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    seconds = []
    for _ in range(repeat + 1):
        t0 = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - t0)
    return 2 * src.numel() / statistics.median(seconds[1:]) / 1e9


def decode_weight_bytes(model: nn.Module) -> int:
    """The weight bytes one decode step reads: every quantized linear's as its kernel reads them
    (:meth:`Kernel.decode_weight_bytes`; the float simulation: its float weight), the head as its
    kernel or table holds it, every other parameter and buffer, but only a row of an embedding
    table (the head reads a tied table whole). Each tensor counts once."""
    seen: set[int] = set()

    def size(t: torch.Tensor | None) -> int:
        if t is None or t.data_ptr() in seen:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    head = None
    for m in model.modules():
        if isinstance(m, QuadHead):
            head = m
    total = 0
    if head is not None:
        total += sum(size(t) for t in (head.proj, head.bias))
        total += head.kernel.decode_bytes() if head.kernel is not None else size(head.table())
    for m in model.modules():
        if isinstance(m, QuadLinear):
            if m.kernel is not None:
                total += m.kernel.decode_weight_bytes(m)
            elif m.quantized:
                total += size(m.dequantized_weight()) + size(m.w_outlier) + size(m.bias)
            else:
                total += size(m.weight) + size(m.bias)
            continue
        if isinstance(m, QuadHead):
            continue
        for pname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if isinstance(m, (nn.Embedding, QuadEmbedding)) and pname == "weight":
                continue  # a row per token, unless the head reads it too (counted there)
            total += size(t)
    return total


def add_bound(records: list[dict[str, Any]], bytes_per_token: dict[str, int], bandwidth_gbs: float) -> None:
    """Give each decode record of a variant in ``bytes_per_token`` the memory-bandwidth bound
    (``bound_tokens_per_s``: every weight read once per step for the whole batch) and the share
    of it reached (``of_bound``)."""
    for r in records:
        if r["phase"] == "decode" and r["variant"] in bytes_per_token:
            weight_mb = bytes_per_token[r["variant"]] / 1e6
            bound = r["batch"] * bandwidth_gbs * 1e3 / weight_mb
            r.update(weight_mb_per_step=round(weight_mb, 1), bound_tokens_per_s=round(bound, 1),
                     of_bound=round(r["tokens_per_s"] / bound, 3))


def add_ratio(records: list[dict[str, Any]], baseline: str, field: str) -> None:
    """``field`` = a record's tokens/s over ``baseline``'s eager record of the same phase, batch and
    tokens (absent where the baseline has none)."""
    ref = {(r["phase"], r["batch"], r["tokens"]): r["tokens_per_s"] for r in records
           if r["variant"] == baseline and not r.get("compiled")}
    for r in records:
        key = (r["phase"], r["batch"], r["tokens"])
        if key in ref:
            r[field] = round(r["tokens_per_s"] / ref[key], 3)


def records_markdown(records: list[dict[str, Any]], columns: list[str]) -> str:
    """A Markdown table of ``records`` with ``columns`` (missing values as '-')."""
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for r in records:
        lines.append("| " + " | ".join(str(r.get(c, "-")) for c in columns) + " |")
    return "\n".join(lines) + "\n"
