"""``quadllm quantize``: in memory, or streaming one decoder layer at a time."""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from ..config import ConfigError, KV_BITS, LEARN_LOSSES, METHODS, MODES, MOMENTS, QUAD_RECIPE, RECIPE_MODES, RECIPE_OFF, WEIGHT_ALGOS, QuantConfig
from ..data.samples import calibration_samples
from ..data.text import TextSource, load_text
from ..io.checkpoint import CheckpointError, check_output_dir, dir_size, save
from ..io.files import output_lock
from ..io.lazy_weights import LazyWeights
from ..io.memory import peak_rss_mb
from ..io.stock_layout import to_stock_modules
from ..io.sources import (
    ModelError,
    fp16_size_bytes,
    load_model,
    model_config,
    model_size_bytes,
    model_sizes,
    parameter_count,
    resolve,
    streaming_dir,
)
from ..analysis.planner import with_plan
from ..arch import get_adapter
from ..pipelines.in_memory import quantize
from ..pipelines.recipe import check_overrides
from ..pipelines.streaming import quantize_streaming
from .common import CHECKPOINT_SIZE_VS_FP16, TEXT_SPECS, add_common, check_free_space, config_from_args

log = logging.getLogger("quadllm")


def recipe_default(key: str) -> str:
    """The help text's default of a :data:`QUAD_RECIPE` option."""
    on, off = QUAD_RECIPE[key], RECIPE_OFF[key]
    return f"default {on} for --method quad --mode {'/'.join(RECIPE_MODES)}, {off} otherwise"


def add_parsers(sub) -> None:
    d = QuantConfig()
    q = sub.add_parser("quantize", help="quantize a model and save a quadllm checkpoint")
    q.add_argument("--model", default=None, help="HF directory, hub id or .gguf file (default: SmolLM2-135M-Instruct)")
    q.add_argument("--method", choices=METHODS, default=d.method)
    q.add_argument("--rank", type=int, default=None, help=f"outlier rank r (quad; default {d.rank})")
    q.add_argument("--mode", choices=MODES, default=d.mode)
    q.add_argument("--weights", choices=WEIGHT_ALGOS, default=d.weights)
    q.add_argument("--gptaq-alpha", type=float, default=d.gptaq_alpha, metavar="ALPHA",
                   help="--weights gptaq: the share of the correction toward the full-precision outputs that "
                   "is applied (1: the whole least-squares map; default %(default)s, the GPTAQ authors')")
    q.add_argument("--group-size", type=int, default=d.group_size, help="0 = per channel")
    q.add_argument("--kv-bits", type=int, choices=KV_BITS, default=d.kv_bits)
    q.add_argument("--calib", default=d.calib, help=f"{TEXT_SPECS} (default: embedded text)")
    q.add_argument("--calib-samples", type=int, default=d.calib_samples)
    q.add_argument("--calib-seqlen", type=int, default=d.calib_seqlen)
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--a-clip", type=float, default=d.a_clip, help="activation clip ratio")
    q.add_argument("--a-clip-search", action=argparse.BooleanOptionalAction, default=None,
                   help=f"search each linear input's clip ratio on the calibration data (instead of --a-clip; "
                   f"{recipe_default('a_clip_search')})")
    q.add_argument("--a-clip-learn", type=int, default=d.a_clip_learn, metavar="STEPS",
                   help="then train every layer's clip ratios jointly for STEPS calibration batches against the "
                   "float layer's output (kept only where they lower its error; no run-time cost; default 0: off)")
    q.add_argument("--a-clip-learn-loss", choices=LEARN_LOSSES, default=d.a_clip_learn_loss,
                   help="what --a-clip-learn minimizes: each token's error relative to its norm (as the next "
                   "RMSNorm sees it; default) or the plain squared error")
    q.add_argument("--learn-transform", type=int, default=d.learn_transform, metavar="STEPS",
                   help="before the weights are quantized, train an affine transform kron(L, R) diag(s) of every "
                   "quantized linear input per layer for STEPS calibration batches against the float layer's "
                   "output (FlatQuant-style; applied online, about n*(a+b+1) multiply-adds per token for n = a*b "
                   "inputs; default 0: off)")
    q.add_argument("--w-clip-learn", type=int, default=d.w_clip_learn, metavar="STEPS",
                   help="before GPTQ/RTN, train each weight row's (group's) clip ratio for STEPS calibration batches "
                   "against the float layer's output, starting from the MSE search's (OmniQuant-style learnable "
                   "weight clipping; kept only where it lowers the layer's error, with GPTQ only where the layer "
                   "quantized with it beats a second GPTQ with the search's; no run-time cost; default 0: off)")
    q.add_argument("--act-asym", dest="act_sym", action="store_false", default=d.act_sym,
                   help="asymmetric per-token activations (a zero point per token, applied in the GEMM epilogue)")
    q.add_argument("--act-sym", dest="act_sym", action="store_true", help="symmetric per-token activations (default)")
    q.add_argument("--o-rank", type=int, default=None,
                   help="keep the top-k principal coordinates of each KV head's values in full precision in "
                   "o_proj (fitted per layer, fused into v_proj and o_proj: no online cost but a reordering; "
                   f"{recipe_default('o_rank')}, and 0 with a quantized KV cache or --group-size)")
    q.add_argument("--o-rank-bits", type=int, choices=(16, 8), default=d.o_rank_bits,
                   help="precision of those coordinates: 16 keeps them in full precision (QUAD-style, default), "
                   "8 quantizes their inputs per token and their weights per channel to INT8 (ResQ's choice)")
    q.add_argument("--down-smooth", type=float, default=None, metavar="ALPHA",
                   help="scale down_proj's input channels before its online Hadamard (SmoothQuant alpha; "
                   f"fused into up_proj, no run-time cost; 0: off; {recipe_default('down_smooth')})")
    q.add_argument("--down-rank", type=int, default=d.down_rank,
                   help="keep the top-k principal coordinates of each down_proj input in full precision "
                   "(fitted per layer; an online projection of 2·k·intermediate multiply-adds per token)")
    q.add_argument("--act-order", action="store_true", default=d.act_order, help="GPTQ act-order")
    q.add_argument("--damp", type=float, default=d.damp, help="GPTQ damping (fraction of mean diagonal)")
    q.add_argument("--no-w-clip", dest="w_clip", action="store_false", default=d.w_clip,
                   help="disable the MSE clipping search for weights")
    q.add_argument("--moment", choices=MOMENTS, default=d.moment,
                   help="residual second moment: raw tokens, or each token scaled to unit norm")
    q.add_argument("--streaming", choices=("auto", "on", "off"), default="auto",
                   help="quantize one decoder layer at a time from memory-mapped safetensors (local Hugging Face "
                   "directories; auto: when the model would not fit in memory)")
    q.add_argument("--activation-budget-mb", type=int, default=2048,
                   help="streaming: calibration activations beyond this go to a temporary directory on disk")
    q.add_argument("--layout", choices=LAYOUTS, default="auto",
                   help="stock: the checkpoint as the stock architecture of hidden size d+r that transformers "
                   "(from_pretrained), lm-eval and vLLM load (format 2; in memory only); quadllm: quadllm's own "
                   "modules (format 1; quadllm convert rewrites it later), smaller for models with tied "
                   "embeddings; auto (default): stock, or quadllm when streaming")
    q.add_argument("--override", dest="overrides", action="append", default=[], metavar="PATTERN=SETTING",
                   help="the treatment of the decoder linears PATTERN names (a glob such as '*.o_proj' or "
                   "'layers.[0-3].*', or 're:' and a regular expression, on names like layers.3.mlp.down_proj): "
                   "skip (full precision), w4a16 (weight-only), a8 (INT8 activations) or a4; repeatable, the last "
                   "match wins; the checkpoint records each module's precision")
    q.add_argument("--plan", default=None, metavar="PLAN.json",
                   help="apply a plan from quadllm plan: its per-module overrides first, then any --override")
    q.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    add_common(q)


def _estimate(model, samples: torch.Tensor, n_passes: int) -> float:
    """Seconds for ``n_passes`` forward passes over ``samples``, from one timed small batch."""
    probe = samples[:1, : min(samples.shape[1], 256)]
    with torch.no_grad():
        model(input_ids=probe, use_cache=False)  # warm-up
        t0 = time.perf_counter()
        model(input_ids=probe, use_cache=False)
        dt = time.perf_counter() - t0
    return dt / probe.numel() * samples.numel() * n_passes


#: the checkpoint layouts ``--layout`` writes (auto: stock in memory, quadllm's when streaming)
LAYOUTS = ("auto", "stock", "quadllm")


def _use_streaming(args) -> bool:
    """``--streaming on``, or ``auto`` and a local safetensors model whose float32 copy (plus the
    transforms' working memory) would not fit in 80% of this machine's memory."""
    if args.streaming == "off":
        return False
    source = resolve(args.model)
    if source.kind != "hf-dir":
        if args.streaming == "on":
            if source.kind == "gguf":  # streamed from its dequantized cache (streaming_dir)
                return True
            raise ModelError(f"--streaming reads a local Hugging Face directory of safetensors files or a GGUF "
                             f"file, not {source.kind} {source.path}")
        return False
    if args.streaming == "on":
        return True
    try:
        need = 8 * LazyWeights(source.path).numel()
    except CheckpointError:  # not safetensors: the in-memory path loads it (or says what is wrong)
        return False
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * total:
        log.info("the model needs about %.1f GB in memory and this machine has %.1f GB: streaming quantization",
                 need / 1e9, total / 1e9)
        return True
    return False


def _quantize_streaming(args, config: QuantConfig, calib: TextSource | None, t0: float) -> int:
    source = resolve(args.model)
    model_dir = streaming_dir(source)
    tok = AutoTokenizer.from_pretrained(model_dir)
    fp16_bytes = 2 * LazyWeights(model_dir).numel()
    log.info("plan: %s (streaming)", config.describe())
    samples = calibration_samples(tok, config, args.data_dir, calib) if config.needs_calibration else None
    result = quantize_streaming(model_dir, config, samples, args.out, tok, source, progress=not args.quiet,
                                activation_budget_bytes=args.activation_budget_mb * 2**20)
    return _print_summary(Path(args.out).resolve(), config, result["timings"]["quantize_s"], t0, fp16_bytes,
                          source, streaming=True)


def _print_summary(out: Path, config: QuantConfig, quantize_s: float, t0: float, fp16_bytes: int, source,
                   streaming: bool = False) -> int:
    """What ``quadllm quantize`` prints (and the results scripts read): time, memory, sizes."""
    size = dir_size(out)
    summary = {
        "checkpoint": str(out),
        "method": config.method, "rank": config.rank, "mode": config.mode,
        **({"streaming": True} if streaming else {}),
        "quantize_seconds": round(quantize_s, 1),
        "total_seconds": round(time.perf_counter() - t0, 1),
        "peak_memory_mb": round(peak_rss_mb()),
        "checkpoint_mb": round(size / 1e6, 2),
        "original_fp16_mb": round(fp16_bytes / 1e6, 2),
        "original_file_mb": round(model_size_bytes(source) / 1e6, 2),
        "size_vs_fp16": round(size / fp16_bytes, 3),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _check_inputs(args, config: QuantConfig) -> TextSource | None:
    """Everything that can be checked before a model is loaded: the output directory, the model's
    files, the calibration text, the free space for the checkpoint. Returns the calibration text."""
    out = check_output_dir(args.out)
    source = resolve(args.model)
    calib = load_text(config.calib, "calib", data_dir=args.data_dir) if config.needs_calibration else None
    hf_config = model_config(source)  # read once, for the sizes and the overrides
    sizes = model_sizes(hf_config)
    if sizes is not None:
        config.check_model_sizes(*sizes)
    if hf_config is not None and config.overrides:
        check_overrides(config, get_adapter(hf_config))
    params = parameter_count(source)
    if params:
        check_free_space(out, int(CHECKPOINT_SIZE_VS_FP16 * 2 * params), "the checkpoint")
    return calib


def quantize_to(config: QuantConfig, model: str | None, out: str | Path, layout: str = "auto",
                data_dir: str | None = None, quiet: bool = False) -> int:
    """``quadllm quantize`` with ``config`` (for commands that quantize again, e.g. ``drift --recalibrate``):
    the same checks first, the same atomic output."""
    args = argparse.Namespace(model=model, out=str(out), layout=layout, data_dir=data_dir, quiet=quiet,
                              streaming="auto", activation_budget_mb=2048)
    with output_lock(check_output_dir(args.out)):
        return _quantize(args, config)


def cmd_quantize(args) -> int:
    config = config_from_args(QuantConfig, args)
    if args.plan is not None:
        config = with_plan(config, args.plan)
    with output_lock(check_output_dir(args.out)):  # a second run on the same --out fails now, not at the end
        return _quantize(args, config)


def _quantize(args, config: QuantConfig) -> int:
    t0 = time.perf_counter()
    calib = _check_inputs(args, config)
    torch.manual_seed(config.seed)
    if _use_streaming(args):
        if args.layout == "stock":
            raise ConfigError("--layout stock is written from a model in memory; quantize with --streaming off, or "
                              "stream in the quadllm layout and run quadllm convert on a machine with the memory")
        if args.layout == "auto":
            log.info("streaming writes quadllm's own layout (format 1); quadllm convert rewrites it in the stock "
                     "layout on a machine with the memory")
        return _quantize_streaming(args, config, calib, t0)
    model, tok, source = load_model(args.model)
    fp16_bytes = fp16_size_bytes(model)
    log.info("plan: %s", config.describe())
    samples = calibration_samples(tok, config, args.data_dir, calib) if config.needs_calibration else None
    if samples is not None:
        passes = (1 if config.rank > 0 else 0) + (3 if config.needs_layer_inputs else 0)
        log.info("estimated calibration time: about %.0f s (%d passes over %d x %d tokens)",
                 _estimate(model, samples, passes), passes, *samples.shape)
    quantize(model, config, samples, progress=not args.quiet)
    if args.layout in ("stock", "auto"):
        to_stock_modules(model, {k: model.quadllm_info[k] for k in ("quant_config", "structure")})
    out = save(model, tok, args.out, original=source)
    return _print_summary(out, config, model.quadllm_info["timings"]["quantize_s"], t0, fp16_bytes, source)


HANDLERS = {"quantize": cmd_quantize}
