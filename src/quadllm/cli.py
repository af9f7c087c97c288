"""Command-line interface: ``quadllm quantize | eval | compare | generate``."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .memory import peak_rss_mb

log = logging.getLogger("quadllm")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="offline data directory (default: $QUADLLM_DATA_DIR or ../shared/data)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")


def _add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("fake", "cpu-int8", "gpu", "auto"), default="fake",
                   help="how quantized linears run: float simulation (default), INT8 GEMM on the CPU, Triton "
                        "kernels on a CUDA device, or the fastest available")


def _add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None, help="comma-separated: zero-shot tasks of lm-evaluation-harness "
                   "(piqa, arc_easy, arc_challenge, hellaswag, winogrande, lambada_openai, openbookqa, boolq), "
                   "gsm8k, humaneval")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each task (harness convention)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the harness and of GSM8K's few-shot draws")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens for gsm8k / humaneval (default: the harness's 256 / 1024)")


def build_parser() -> argparse.ArgumentParser:
    from .config import KV_BITS, METHODS, MODES, WEIGHT_ALGOS, QuantConfig

    d = QuantConfig()
    parser = argparse.ArgumentParser(prog="quadllm", description="W4A4 quantization of LLMs with QUAD")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save a quadllm checkpoint")
    q.add_argument("--model", default=None, help="HF directory, hub id or .gguf file (default: SmolLM2-135M-Instruct)")
    q.add_argument("--method", choices=METHODS, default="quad")
    q.add_argument("--rank", type=int, default=None, help="outlier rank r (quad; default 64)")
    q.add_argument("--mode", choices=MODES, default=d.mode)
    q.add_argument("--weights", choices=WEIGHT_ALGOS, default=d.weights)
    q.add_argument("--group-size", type=int, default=d.group_size, help="0 = per channel")
    q.add_argument("--kv-bits", type=int, choices=KV_BITS, default=d.kv_bits)
    q.add_argument("--calib", default=None, help="wikitext2, ptb, a .txt or .jsonl file (default: embedded text)")
    q.add_argument("--calib-samples", type=int, default=d.calib_samples)
    q.add_argument("--calib-seqlen", type=int, default=d.calib_seqlen)
    q.add_argument("--seed", type=int, default=d.seed)
    q.add_argument("--a-clip", type=float, default=d.a_clip, help="activation clip ratio")
    q.add_argument("--act-order", action="store_true", help="GPTQ act-order")
    q.add_argument("--damp", type=float, default=d.damp, help="GPTQ damping (fraction of mean diagonal)")
    q.add_argument("--no-w-clip", action="store_true", help="disable the MSE clipping search for weights")
    q.add_argument("--moment", choices=("raw", "normalized"), default=d.moment,
                   help="residual second moment: raw tokens, or each token scaled to unit norm")
    q.add_argument("--streaming", choices=("auto", "on", "off"), default="auto",
                   help="quantize one decoder layer at a time from memory-mapped safetensors (local Hugging Face "
                   "directories; auto: when the model would not fit in memory)")
    q.add_argument("--activation-budget-mb", type=int, default=2048,
                   help="streaming: calibration activations beyond this go to a temporary directory on disk")
    q.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    _add_common(q)

    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement against the original; tasks with --tasks")
    e.add_argument("model", nargs="?", default=None, help="quadllm checkpoint or original model (default: SmolLM2)")
    e.add_argument("--data", default=None, help="wikitext2, ptb, a .txt or .jsonl file (default: embedded text; "
                   "with --tasks, perplexity is computed only when --data is given)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--reference", nargs="?", const=True, default=None,
                   help="compare with the original model (a checkpoint knows its own) or with MODEL")
    e.add_argument("--json", default=None, help="write the results as JSON to this file")
    e.add_argument("--adapter", default=None, help="apply this fine-tuning adapter file to the checkpoint")
    _add_backend(e)
    _add_tasks(e)
    e.add_argument("--samples", default=None, help="with --tasks: write per-item records to this .jsonl file")
    _add_common(e)

    c = sub.add_parser("compare", help="one table: the FP model, then quantized models and their %% of FP")
    c.add_argument("models", nargs="+", help="the full-precision reference first ('default' for SmolLM2, a "
                   "path, a hub id), then quadllm checkpoints or other models")
    c.add_argument("--data", default=None, help="also perplexity on DATA, and KL / top-1 agreement against "
                   "the first model (wikitext2, ptb, a .txt or .jsonl file)")
    c.add_argument("--seqlen", type=int, default=2048)
    c.add_argument("--max-windows", type=int, default=None)
    c.add_argument("--out", required=True, help="Markdown file to write (and the same stem .json)")
    _add_backend(c)
    _add_tasks(c)
    _add_common(c)

    g = sub.add_parser("generate", help="generate text (chat template when the model has one)")
    g.add_argument("model", help="quadllm checkpoint, adapter file or original model ('default' for SmolLM2)")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--adapter", default=None, help="apply this fine-tuning adapter file to the checkpoint")
    _add_backend(g)
    _add_common(g)

    _add_finetune(sub)
    from . import cli_analysis, cli_bench

    cli_bench.add_parser(sub, _add_common)
    cli_analysis.add_parsers(sub, _add_common)
    return parser


def _add_finetune(sub) -> None:
    from .finetune_config import FT_METHODS, LOSSES, TRAIN_SETS, FinetuneConfig

    d = FinetuneConfig()
    f = sub.add_parser("finetune", help="train the full-precision outlier weights (or LoRA) of a checkpoint")
    f.add_argument("model", help="quadllm checkpoint directory to fine-tune")
    f.add_argument("--data", required=True, help="Alpaca / chat / GSM8K / text .jsonl, a .txt file, wikitext2 "
                   "(wiki.valid.tokens), ptb, pydoc, or a hub data set name")
    f.add_argument("--out", required=True, help="output checkpoint directory, or with --adapter-only a "
                   ".safetensors file")
    f.add_argument("--adapter-only", action="store_true", help="write only the trained tensors (tied to the base)")
    f.add_argument("--method", choices=FT_METHODS, default=d.method,
                   help="quad: outlier columns (+ scales); lora: peft LoRA with the same budget")
    f.add_argument("--train", choices=TRAIN_SETS, default=d.train)
    f.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="kd: distil the original model (KL to its next-token distribution; default); ce: "
                   "cross-entropy on the data's labels; kd+ce: both")
    f.add_argument("--teacher", default=None, help="teacher model for kd (default: the checkpoint's original)")
    f.add_argument("--lr", type=float, default=d.lr)
    f.add_argument("--scales-lr-ratio", type=float, default=d.scales_lr_ratio)
    f.add_argument("--epochs", type=float, default=d.epochs)
    f.add_argument("--max-steps", type=int, default=None, help="overrides --epochs")
    f.add_argument("--batch-size", type=int, default=d.batch_size)
    f.add_argument("--grad-accum", type=int, default=d.grad_accum)
    f.add_argument("--max-seqlen", type=int, default=d.max_seqlen)
    f.add_argument("--val-fraction", type=float, default=d.val_fraction)
    f.add_argument("--eval-every", type=int, default=d.eval_every, help="held-out loss every N steps")
    f.add_argument("--warmup", type=float, default=d.warmup, help="share of the steps with linear warmup")
    f.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max gradient norm (0: off)")
    f.add_argument("--weight-decay", type=float, default=d.weight_decay)
    f.add_argument("--seed", type=int, default=d.seed)
    f.add_argument("--dtype", choices=("float32", "bfloat16"), default=d.dtype, help="bfloat16: autocast")
    f.add_argument("--train-on-prompt", action="store_true", help="loss on prompts too, not only responses")
    f.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default: matched to the budget)")
    f.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    f.add_argument("--save-every", type=int, default=d.save_every, help="save resumable state every N steps")
    f.add_argument("--limit", type=int, default=None, help="use at most N records")
    f.add_argument("--resume", action="store_true", help="continue an interrupted run from its saved state")
    f.add_argument("--no-grad-checkpointing", action="store_true",
                   help="keep all activations for backward (faster, far more memory)")
    _add_common(f)



def _setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def open_model(spec: str | None, adapter: str | None = None, backend: str = "fake"):
    """A quadllm checkpoint (optionally with an adapter), an adapter file (loaded on the base it
    records) or an original model: ``(model, tokenizer, meta_or_None, source_or_None)``."""
    from .adapter import is_adapter_file, read_adapter_meta
    from .checkpoint import CheckpointError, is_checkpoint, load
    from .models import load_model

    if spec is not None and str(spec).endswith(".safetensors") and adapter is None and is_adapter_file(spec):
        adapter, spec = spec, read_adapter_meta(spec)["base_path"]
    if spec is not None and spec != "default" and is_checkpoint(spec):
        model, tok, meta = load(spec, adapter=adapter, backend=backend)
        return model, tok, meta, None
    if adapter is not None:
        raise CheckpointError(f"--adapter needs a quadllm checkpoint as the model, not {spec or 'default'}")
    model, tok, source = load_model(spec)
    return model, tok, None, source


def _estimate(model, samples: torch.Tensor, n_passes: int) -> float:
    """Seconds for ``n_passes`` forward passes over ``samples``, from one timed small batch."""
    probe = samples[:1, : min(samples.shape[1], 256)]
    with torch.no_grad():
        model(input_ids=probe, use_cache=False)  # warm-up
        t0 = time.perf_counter()
        model(input_ids=probe, use_cache=False)
        dt = time.perf_counter() - t0
    return dt / probe.numel() * samples.numel() * n_passes


def _use_streaming(args) -> bool:
    """``--streaming on``, or ``auto`` and a local safetensors model whose float32 copy (plus the
    transforms' working memory) would not fit in 80% of this machine's memory."""
    from .checkpoint import CheckpointError
    from .models import ModelError, resolve
    from .streaming import LazyWeights

    if args.streaming == "off":
        return False
    source = resolve(args.model)
    if source.kind != "hf-dir":
        if args.streaming == "on":
            raise ModelError(f"--streaming reads a local Hugging Face directory of safetensors files, not "
                             f"{source.kind} {source.path}")
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


def _quantize_streaming(args, config, t0: float) -> int:
    from transformers import AutoTokenizer

    from .api import calibration_samples
    from .models import resolve
    from .streaming import LazyWeights, quantize_streaming

    source = resolve(args.model)
    tok = AutoTokenizer.from_pretrained(source.path)
    fp16_bytes = 2 * LazyWeights(source.path).numel()
    log.info("plan: %s (streaming)", config.describe())
    samples = calibration_samples(tok, config, args.data_dir) if (config.rank > 0 or config.weights == "gptq") else None
    result = quantize_streaming(source.path, config, samples, args.out, tok, source, progress=not args.quiet,
                                activation_budget_bytes=args.activation_budget_mb * 2**20)
    return _print_quantize_summary(Path(args.out).resolve(), config, result["timings"]["quantize_s"], t0, fp16_bytes,
                                   source, streaming=True)


def _print_quantize_summary(out: Path, config, quantize_s: float, t0: float, fp16_bytes: int, source,
                            streaming: bool = False) -> int:
    """What ``quadllm quantize`` prints (and the results scripts read): time, memory, sizes."""
    from .checkpoint import dir_size
    from .models import model_size_bytes

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


def cmd_quantize(args) -> int:
    from .api import calibration_samples
    from .checkpoint import save
    from .config import QuantConfig
    from .models import fp16_size_bytes, load_model
    from .pipeline import quantize

    config = QuantConfig(method=args.method, rank=args.rank, mode=args.mode, weights=args.weights,
                         group_size=args.group_size, kv_bits=args.kv_bits, calib=args.calib,
                         calib_samples=args.calib_samples, calib_seqlen=args.calib_seqlen, seed=args.seed,
                         a_clip=args.a_clip, act_order=args.act_order, damp=args.damp, w_clip=not args.no_w_clip,
                         moment=args.moment)
    t0 = time.perf_counter()
    torch.manual_seed(config.seed)
    if _use_streaming(args):
        return _quantize_streaming(args, config, t0)
    model, tok, source = load_model(args.model)
    fp16_bytes = fp16_size_bytes(model)
    log.info("plan: %s", config.describe())
    samples = calibration_samples(tok, config, args.data_dir) if (config.rank > 0 or config.weights == "gptq") else None
    if samples is not None:
        passes = (1 if config.rank > 0 else 0) + (3 if config.weights == "gptq" else 0)
        log.info("estimated calibration time: about %.0f s (%d passes over %d x %d tokens)",
                 _estimate(model, samples, passes), passes, *samples.shape)
    quantize(model, config, samples, progress=not args.quiet)
    out = save(model, tok, args.out, original=source)
    return _print_quantize_summary(out, config, model.quadllm_info["timings"]["quantize_s"], t0, fp16_bytes, source)


def _reference_model(args, model, meta):
    """The model ``--reference`` names (None without the option)."""
    from .models import load_model

    if args.reference is True:
        if meta is not None:
            orig = meta.get("original_model") or {}
            return load_model(orig.get("spec"))[0]
        return model  # the original against itself: KL 0, agreement 1
    if args.reference:
        return load_model(args.reference)[0]
    return None


def _tasks_of(args) -> list[str] | None:
    from .data import DataError
    from .tasks.suite import check_tasks, parse_tasks

    if args.tasks is None:
        return None
    try:
        tasks = parse_tasks(args.tasks)
    except ValueError as exc:
        raise DataError(f"--tasks: {exc}") from exc
    check_tasks(tasks, args.data_dir)  # before loading any model
    return tasks


def _suite(args, model, tok, tasks: list[str]) -> dict[str, Any]:
    from .tasks.suite import run_suite

    return run_suite(model, tok, tasks, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                     data_dir=args.data_dir, max_new_tokens=args.max_new_tokens, progress=not args.quiet)


def _write(path: str, text: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


def cmd_eval(args) -> int:
    from .api import evaluate

    t0 = time.perf_counter()
    tasks = _tasks_of(args)
    if tasks is not None:
        return _eval_tasks(args, tasks, t0)
    model, tok, meta, source = open_model(args.model, args.adapter, args.backend)
    reference = _reference_model(args, model, meta)
    result: dict[str, Any] = evaluate(model, tok, args.data, args.seqlen, args.max_windows, reference,
                                      args.data_dir, progress=not args.quiet)
    result["model"] = args.model or "default"
    if meta is not None:
        result["quant_config"] = meta.get("quant_config")
    result["peak_memory_mb"] = round(peak_rss_mb())
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")
    return 0


def _eval_tasks(args, tasks: list[str], t0: float) -> int:
    """``quadllm eval --tasks``: a Markdown table on stdout, ``--json`` and ``--samples`` files."""
    from .api import evaluate
    from .compare import eval_markdown

    if args.data is None and args.reference:
        log.warning("--reference is used with --data (perplexity, KL); ignored for tasks")
    model, tok, meta, _ = open_model(args.model, args.adapter, args.backend)
    suite = _suite(args, model, tok, tasks)
    result: dict[str, Any] = {"model": args.model or "default", "tasks": suite["tasks"], "seconds": suite["seconds"],
                              "average": suite["average"], "average_metrics": suite["average_metrics"],
                              "details": suite["details"], "limit": args.limit, "seed": args.seed,
                              "batch_size": args.batch_size}
    if args.data is not None:
        reference = _reference_model(args, model, meta)
        result["perplexity"] = evaluate(model, tok, args.data, args.seqlen, args.max_windows, reference,
                                        args.data_dir, progress=not args.quiet)
    if meta is not None:
        result["quant_config"] = meta.get("quant_config")
    if args.samples:
        lines = [json.dumps({"task": task, **record}, default=str)
                 for task, records in suite["samples"].items() for record in records]
        _write(args.samples, "\n".join(lines) + "\n")
        result["samples_file"] = str(args.samples)
    result["peak_memory_mb"] = round(peak_rss_mb())
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        _write(args.json, json.dumps(result, indent=2, default=str) + "\n")
    print(eval_markdown(result), end="")
    return 0


def _display_names(specs: list[str]) -> list[str]:
    """Short, unique column names: a path's last part unless two models would share it."""
    short = [Path(s).name or s for s in specs]
    names = [sh if short.count(sh) == 1 else s for sh, s in zip(short, specs)]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def cmd_compare(args) -> int:
    """``quadllm compare FP Q1 Q2 ...``: tasks per model, perplexity/KL against FP, one table."""
    from .checkpoint import is_checkpoint
    from .compare import build_rows, compare_markdown
    from .data import DataError, load_text, tokenize_windows
    from .evaluate import evaluate_many

    t0 = time.perf_counter()
    tasks = _tasks_of(args)
    if tasks is None and args.data is None:
        raise DataError("compare needs --tasks, --data or both")
    names = _display_names(args.models)
    reference = names[0]
    if args.models[0] != "default" and is_checkpoint(args.models[0]):
        log.warning("the first model (%s) is a quadllm checkpoint; percentages are relative to it", args.models[0])
    results: dict[str, dict[str, Any]] = {}
    kept: dict[str, Any] = {}
    ref_tok = None
    for name, spec in zip(names, args.models):
        log.info("model %s (%s)", name, spec)
        model, tok, meta, _ = open_model(spec, backend=args.backend)
        if ref_tok is None:
            ref_tok = tok
        results[name] = {"model": spec, "quant_config": meta.get("quant_config") if meta else None}
        if tasks is not None:
            suite = _suite(args, model, tok, tasks)
            results[name].update({k: suite[k] for k in ("tasks", "seconds", "average", "average_metrics")})
        if args.data is not None:
            kept[name] = model
        del model
    if args.data is not None:
        source = load_text(args.data, "eval", data_dir=args.data_dir)
        windows = tokenize_windows(ref_tok, source.text, args.seqlen, args.max_windows)
        for name, ppl in evaluate_many(kept, windows, reference=kept[reference], progress=not args.quiet).items():
            results[name]["perplexity"] = {**ppl, "data": source.origin}
    rows = build_rows(results, reference)
    table = compare_markdown(rows, names, reference)
    out = Path(args.out)
    _write(str(out), f"# quadllm compare\n\nFP reference: {args.models[0]}\n\n{table}")
    summary = {"reference": reference, "models": dict(zip(names, args.models)), "rows": rows, "results": results,
               "limit": args.limit, "seed": args.seed, "total_seconds": round(time.perf_counter() - t0, 1)}
    _write(str(out.with_suffix(".json")), json.dumps(summary, indent=2, default=str) + "\n")
    print(table, end="")
    log.info("wrote %s and %s", out, out.with_suffix(".json"))
    return 0


def cmd_generate(args) -> int:
    model, tok, _, _ = open_model(args.model, args.adapter, args.backend)
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    from .kv_cache import make_cache

    cache = make_cache(model)  # integer K/V when the checkpoint quantizes its KV cache
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                             **({"past_key_values": cache} if cache is not None else {}))
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return 0


def cmd_finetune(args) -> int:
    from .finetune_config import FinetuneConfig
    from .finetune_job import run

    config = FinetuneConfig(
        data=args.data, method=args.method, train=args.train, loss=args.loss, teacher=args.teacher, lr=args.lr, scales_lr_ratio=args.scales_lr_ratio,
        epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        max_seqlen=args.max_seqlen, val_fraction=args.val_fraction, eval_every=args.eval_every, warmup=args.warmup,
        clip_grad=args.clip_grad, weight_decay=args.weight_decay, seed=args.seed, dtype=args.dtype,
        train_on_prompt=args.train_on_prompt, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        save_every=args.save_every, limit=args.limit, grad_checkpointing=not args.no_grad_checkpointing)
    summary = run(args.model, config, args.out, adapter_only=args.adapter_only, resume=args.resume,
                  data_dir=args.data_dir, progress=not args.quiet)
    summary["peak_memory_mb"] = round(peak_rss_mb())
    print(json.dumps(summary, indent=2, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    from .arch import UnsupportedArchitecture
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .models import ModelError

    from .adapter import AdapterError
    from .backends import BackendError
    from .finetune import FinetuneError

    handlers = {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, "generate": cmd_generate,
                "finetune": cmd_finetune}
    from .cli_analysis import HANDLERS
    from .cli_bench import cmd_bench

    handlers.update(HANDLERS, bench=cmd_bench)
    try:
        return handlers[args.command](args)
    except (ConfigError, DataError, ModelError, CheckpointError, UnsupportedArchitecture, FloatingPointError,
            AdapterError, FinetuneError, BackendError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted; nothing was written")
        return 130


if __name__ == "__main__":
    sys.exit(main())
