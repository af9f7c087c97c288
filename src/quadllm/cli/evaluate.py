"""``quadllm eval``, ``quadllm compare`` and ``quadllm generate``: measuring and running a model."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..backends import DTYPES
from ..backends.compiled import CompiledDecoder, CompileError
from ..config import ConfigError
from ..data.text import DataError, TextSource, load_text, tokenize_windows
from ..evaluation.compare import build_rows, compare_markdown, eval_markdown
from ..evaluation.perplexity import evaluate, evaluate_many
from ..evaluation.tasks.suite import check_tasks, parse_tasks, run_suite
from ..finetune.adapter_file import is_adapter_file
from ..io.checkpoint import is_checkpoint
from ..io.memory import peak_rss_mb
from ..io.sources import load_model, resolve
from ..nn.kv_cache import make_cache
from .common import (
    TEXT_SPECS,
    add_backend,
    add_common,
    add_dtype,
    open_model,
    write_text,
)

log = logging.getLogger("quadllm")


def add_tasks(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", default=None, help="comma-separated: zero-shot tasks of lm-evaluation-harness "
                   "(piqa, arc_easy, arc_challenge, hellaswag, winogrande, lambada_openai, openbookqa, boolq), "
                   "gsm8k, humaneval (raw prompt), humaneval_chat (EvalPlus instruct prompt)")
    p.add_argument("--limit", type=int, default=None, help="the first N items of each task (harness convention)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the harness and of GSM8K's few-shot draws")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens for gsm8k / humaneval (default: the harness's 256 / 1024)")


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement against the original; tasks with --tasks")
    e.add_argument("model", nargs="?", default=None, help="quadllm checkpoint or original model (default: SmolLM2)")
    e.add_argument("--data", default=None, help=f"{TEXT_SPECS} (default: embedded text; "
                   "with --tasks, perplexity is computed only when --data is given)")
    e.add_argument("--seqlen", type=int, default=2048)
    e.add_argument("--max-windows", type=int, default=None)
    e.add_argument("--reference", nargs="?", const=True, default=None,
                   help="compare with the original model (a checkpoint knows its own) or with MODEL")
    e.add_argument("--json", default=None, help="write the results as JSON to this file")
    e.add_argument("--adapter", default=None, help="apply this fine-tuning adapter file to the checkpoint")
    add_backend(e)
    add_dtype(e)
    add_tasks(e)
    e.add_argument("--samples", default=None, help="with --tasks: write per-item records to this .jsonl file")
    add_common(e)

    c = sub.add_parser("compare", help="one table: the FP model, then quantized models and their %% of FP")
    c.add_argument("models", nargs="+", help="the full-precision reference first ('default' for SmolLM2, a "
                   "path, a hub id), then quadllm checkpoints or other models")
    c.add_argument("--data", default=None, help="also perplexity on DATA, and KL / top-1 agreement against "
                   f"the first model ({TEXT_SPECS})")
    c.add_argument("--seqlen", type=int, default=2048)
    c.add_argument("--max-windows", type=int, default=None)
    c.add_argument("--out", required=True, help="Markdown file to write (and the same stem .json)")
    add_backend(c)
    add_dtype(c)
    add_tasks(c)
    add_common(c)

    g = sub.add_parser("generate", help="generate text (chat template when the model has one)")
    g.add_argument("model", help="quadllm checkpoint, adapter file or original model ('default' for SmolLM2)")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--adapter", default=None, help="apply this fine-tuning adapter file to the checkpoint")
    g.add_argument("--json", action="store_true", help="print {text, token_ids, prompt_token_ids} as JSON (greedy "
                                                        "tokens, to compare with a server's)")
    g.add_argument("--compile", action="store_true",
                   help="decode through a compiled step (torch.compile and a static KV cache: faster per token on "
                        "the CPU, tens of seconds to compile first)")
    add_backend(g)
    add_dtype(g)
    add_common(g)


def _reference_model(args, model, meta):
    """The model ``--reference`` names (None without the option), in the same dtype as the model."""
    dtype = DTYPES[args.dtype]
    if args.reference is True:
        if meta is not None:
            orig = meta.get("original_model") or {}
            return load_model(orig.get("spec"), dtype=dtype)[0]
        return model  # the original against itself: KL 0, agreement 1
    if args.reference:
        return load_model(args.reference, dtype=dtype)[0]
    return None


def _tasks_of(args) -> list[str] | None:
    if args.tasks is None:
        return None
    try:
        tasks = parse_tasks(args.tasks)
    except ValueError as exc:
        raise DataError(f"--tasks: {exc}") from exc
    check_tasks(tasks, args.data_dir)  # before loading any model
    return tasks


def _suite(args, model, tok, tasks: list[str]) -> dict[str, Any]:
    return run_suite(model, tok, tasks, limit=args.limit, seed=args.seed, batch_size=args.batch_size,
                     data_dir=args.data_dir, max_new_tokens=args.max_new_tokens, progress=not args.quiet)


def _check_eval_inputs(args, with_data: bool) -> TextSource | None:
    """What ``eval`` can check before loading a model: the model and reference paths, the
    evaluation text (returned, loaded once)."""
    if args.model not in (None, "default") and not is_checkpoint(args.model) and not is_adapter_file(args.model):
        resolve(args.model)
    if isinstance(args.reference, str):
        resolve(args.reference)
    return load_text(args.data, "eval", data_dir=args.data_dir) if with_data else None


def cmd_eval(args) -> int:
    t0 = time.perf_counter()
    tasks = _tasks_of(args)
    if tasks is not None:
        return _eval_tasks(args, tasks, t0)
    text = _check_eval_inputs(args, True)
    model, tok, meta, source = open_model(args.model, args.adapter, args.backend, args.dtype, args.head)
    reference = _reference_model(args, model, meta)
    result: dict[str, Any] = evaluate(model, tok, text, args.seqlen, args.max_windows, reference,
                                      args.data_dir, progress=not args.quiet)
    result["model"] = args.model or "default"
    result["dtype"] = args.dtype
    result["backend"], result["head"] = args.backend, args.head
    if meta is not None:
        result["quant_config"] = meta.get("quant_config")
    result["peak_memory_mb"] = round(peak_rss_mb())
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        write_text(args.json, text + "\n")
    return 0


def _eval_tasks(args, tasks: list[str], t0: float) -> int:
    """``quadllm eval --tasks``: a Markdown table on stdout, ``--json`` and ``--samples`` files."""
    if args.data is None and args.reference:
        log.warning("--reference is used with --data (perplexity, KL); ignored for tasks")
    text = _check_eval_inputs(args, args.data is not None)
    model, tok, meta, _ = open_model(args.model, args.adapter, args.backend, args.dtype, args.head)
    suite = _suite(args, model, tok, tasks)
    result: dict[str, Any] = {"model": args.model or "default", "tasks": suite["tasks"], "seconds": suite["seconds"],
                              "average": suite["average"], "average_metrics": suite["average_metrics"],
                              "details": suite["details"], "limit": args.limit, "seed": args.seed,
                              "batch_size": args.batch_size, "dtype": args.dtype, "backend": args.backend,
                              "head": args.head}
    if args.data is not None:
        reference = _reference_model(args, model, meta)
        result["perplexity"] = evaluate(model, tok, text, args.seqlen, args.max_windows, reference,
                                        args.data_dir, progress=not args.quiet)
    if meta is not None:
        result["quant_config"] = meta.get("quant_config")
    if args.samples:
        lines = [json.dumps({"task": task, **record}, default=str)
                 for task, records in suite["samples"].items() for record in records]
        write_text(args.samples, "\n".join(lines) + "\n")
        result["samples_file"] = str(args.samples)
    result["peak_memory_mb"] = round(peak_rss_mb())
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        write_text(args.json, json.dumps(result, indent=2, default=str) + "\n")
    print(eval_markdown(result), end="")
    return 0


def _display_names(specs: list[str]) -> list[str]:
    """Short, unique column names: a path's last part unless two models would share it."""
    short = [Path(s).name or s for s in specs]
    names = [sh if short.count(sh) == 1 else s for sh, s in zip(short, specs)]
    return [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]


def cmd_compare(args) -> int:
    """``quadllm compare FP Q1 Q2 ...``: tasks per model, perplexity/KL against FP, one table."""
    t0 = time.perf_counter()
    tasks = _tasks_of(args)
    if tasks is None and args.data is None:
        raise DataError("compare needs --tasks, --data or both")
    for spec in args.models:  # every path before the first model is loaded
        if spec != "default" and not is_checkpoint(spec) and not is_adapter_file(spec):
            resolve(spec)
    source = load_text(args.data, "eval", data_dir=args.data_dir) if args.data is not None else None
    names = _display_names(args.models)
    reference = names[0]
    if args.models[0] != "default" and is_checkpoint(args.models[0]):
        log.warning("the first model (%s) is a quadllm checkpoint; percentages are relative to it", args.models[0])
    results: dict[str, dict[str, Any]] = {}
    kept: dict[str, Any] = {}
    ref_tok = None
    for name, spec in zip(names, args.models):
        log.info("model %s (%s)", name, spec)
        model, tok, meta, _ = open_model(spec, backend=args.backend if is_checkpoint(spec) else "fake", dtype=args.dtype,
                                         head=args.head if is_checkpoint(spec) else "float")
        if ref_tok is None:
            ref_tok = tok
        results[name] = {"model": spec, "quant_config": meta.get("quant_config") if meta else None}
        if tasks is not None:
            suite = _suite(args, model, tok, tasks)
            results[name].update({k: suite[k] for k in ("tasks", "seconds", "average", "average_metrics")})
        if args.data is not None:
            kept[name] = model
        del model
    if source is not None:
        windows = tokenize_windows(ref_tok, source.text, args.seqlen, args.max_windows)
        for name, ppl in evaluate_many(kept, windows, reference=kept[reference], progress=not args.quiet).items():
            results[name]["perplexity"] = {**ppl, "data": source.origin}
    rows = build_rows(results, reference)
    table = compare_markdown(rows, names, reference)
    out = Path(args.out)
    write_text(str(out), f"# quadllm compare\n\nFP reference: {args.models[0]}\n\n{table}")
    summary = {"reference": reference, "models": dict(zip(names, args.models)), "rows": rows, "results": results,
               "limit": args.limit, "seed": args.seed, "dtype": args.dtype, "total_seconds": round(time.perf_counter() - t0, 1)}
    write_text(str(out.with_suffix(".json")), json.dumps(summary, indent=2, default=str) + "\n")
    print(table, end="")
    log.info("wrote %s and %s", out, out.with_suffix(".json"))
    return 0


def cmd_generate(args) -> int:
    model, tok, _, _ = open_model(args.model, args.adapter, args.backend, args.dtype, args.head)
    if getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids

    if args.compile:
        try:
            decoder = CompiledDecoder(model, ids.shape[1] + args.max_new_tokens + 1)
        except CompileError as exc:
            raise ConfigError(f"--compile: {exc}") from None
        new = decoder.generate(ids, args.max_new_tokens, tok.eos_token_id)[0]
    else:
        cache = make_cache(model)  # integer K/V when the checkpoint quantizes its KV cache
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                 **({"past_key_values": cache} if cache is not None else {}))
        new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True).strip()
    print(json.dumps({"text": text, "token_ids": new.tolist(), "prompt_token_ids": ids[0].tolist()})
          if args.json else text)
    return 0


HANDLERS = {"eval": cmd_eval, "compare": cmd_compare, "generate": cmd_generate}
