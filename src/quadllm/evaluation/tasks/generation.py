"""Batched greedy generation with a KV cache, for generative tasks (GSM8K, HumanEval).

Works with any transformers causal LM, quadllm models included (``quadllm.load(dir)``): prompts
are tokenized one by one, sorted by length (longest first, as lm-evaluation-harness does),
left-padded into batches with an attention mask and matching position ids, prefilled once and
decoded token by token from the cache. A sequence ends at an end-of-sequence token, at the first
occurrence of a stop string (cut off, not returned) or after ``max_new_tokens``; it then leaves
the batch (its rows of the cache are dropped), and a batch ends when all its sequences have. Decoding is plain argmax (no sampling, no penalties), so a prompt
gives the same text alone or in any batch, up to float rounding.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ...nn.kv_cache import cache_kwarg, make_cache

log = logging.getLogger(__name__)

#: Context length assumed when the model's configuration names none (the harness's default).
DEFAULT_MAX_LENGTH = 2048


def encode(tokenizer, prompt: str, add_special_tokens: bool | None = None) -> list[int]:
    """Token ids of ``prompt``. ``add_special_tokens=None`` follows the harness: the tokenizer's
    default, except for prompts that already start with the BOS string (chat templates)."""
    if add_special_tokens is None:
        bos = getattr(tokenizer, "bos_token", None)
        add_special_tokens = not (bos and prompt.startswith(bos))
    return list(tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop string, and whether one occurred."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def eos_token_ids(model: nn.Module, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the model's generation config's."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def model_max_length(model: nn.Module) -> int:
    """The model's context length (``max_position_embeddings`` or similar), as the harness reads it."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_LENGTH


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 256,
             stop: Sequence[str] = (), batch_size: int = 8, add_special_tokens: bool | None = None,
             max_length: int | None = None, progress: bool = True, desc: str = "generate") -> list[str]:
    """Greedy continuations of ``prompts`` (decoded without special tokens, cut at the first stop
    string), in the order given.

    ``max_length``: context length of the model (default :func:`model_max_length`); longer
    prompts keep their last ``max_length - max_new_tokens`` tokens (with a warning), as the
    harness does. ``add_special_tokens``: see :func:`encode`.
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be positive")
    max_length = max_length or model_max_length(model)
    keep = max_length - max_new_tokens
    if keep < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for the prompt in the model's "
                         f"context of {max_length} tokens")
    encoded = [encode(tokenizer, p, add_special_tokens) for p in prompts]
    for i, ids in enumerate(encoded):
        if len(ids) > keep:
            log.warning("prompt %d has %d tokens; keeping its last %d (context %d, %d new tokens)",
                        i, len(ids), keep, max_length, max_new_tokens)
            encoded[i] = ids[-keep:]
        if not encoded[i]:
            raise ValueError(f"prompt {i} is empty after tokenization")
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    device = next(model.parameters()).device
    params = inspect.signature(model.forward).parameters
    keep_logits = "logits_to_keep" in params
    cache_arg = cache_kwarg(model)
    was_training = model.training
    model.eval()
    out: list[str] = [""] * len(encoded)
    bar = tqdm(total=len(encoded), desc=desc, unit="prompt", disable=not progress)
    t0, n_tokens = time.perf_counter(), 0
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            texts, new = _batch(model, tokenizer, [encoded[i] for i in idx], pad, eos, stop, max_new_tokens,
                                device, keep_logits, cache_arg)
            for i, text in zip(idx, texts):
                out[i] = text
            n_tokens += new
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{n_tokens / (time.perf_counter() - t0):.1f}")
    finally:
        bar.close()
        model.train(was_training)
    log.debug("%s: %d prompts, %d new tokens in %.1f s", desc, len(encoded), n_tokens, time.perf_counter() - t0)
    return out


def _batch(model: nn.Module, tokenizer, rows: list[list[int]], pad: int, eos: set[int], stop: Sequence[str],
           max_new_tokens: int, device: torch.device, keep_logits: bool, cache_arg: str) -> tuple[list[str], int]:
    """Generate for one batch of token lists; returns the texts and the number of new tokens."""
    n, width = len(rows), max(len(r) for r in rows)
    ids = torch.full((n, width), pad, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    extra = {"logits_to_keep": 1} if keep_logits else {}
    int_cache = make_cache(model)  # integer K/V for models quantized with --kv-bits 4 or 8
    if int_cache is not None:
        extra[cache_arg] = int_cache
    result = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **extra)
    cache = _cache_of(result)
    generated: list[list[int]] = [[] for _ in rows]
    texts, done = [""] * n, [False] * n
    live = list(range(n))  # the rows still in the model's batch, in batch order
    for step in range(max_new_tokens):
        nxt = result.logits[:, -1].argmax(-1).tolist()
        for i, t in zip(live, nxt):
            if t in eos:
                done[i] = True
                continue
            generated[i].append(t)
            texts[i], hit = cut_at_stop(tokenizer.decode(generated[i], skip_special_tokens=True), stop)
            done[i] = hit
        if all(done) or step == max_new_tokens - 1:
            break
        keep = [j for j, i in enumerate(live) if not done[i]]
        if len(keep) < len(live):  # drop ended rows: the rest decode as before, for less compute
            sel = torch.tensor(keep, dtype=torch.long, device=device)
            _select_rows(cache, sel)
            mask, pos = mask[sel], pos[sel]
            live, nxt = [live[j] for j in keep], [nxt[j] for j in keep]
        feed = torch.tensor(nxt, dtype=torch.long, device=device)
        mask = torch.cat([mask, mask.new_ones((len(live), 1))], dim=1)
        pos = pos[:, -1:] + 1
        result = model(input_ids=feed[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                       **{cache_arg: cache})
        cache = _cache_of(result)
    return texts, sum(len(g) for g in generated)


def _select_rows(cache, rows: torch.Tensor) -> None:
    """Keep only the batch ``rows`` of a transformers ``Cache`` (quadllm's integer cache included)."""
    if not hasattr(cache, "batch_select_indices"):
        raise TypeError(f"cannot drop finished rows from a {type(cache).__name__} cache")
    cache.batch_select_indices(rows)


def _cache_of(result):
    cache = getattr(result, "cache", None)
    return cache if cache is not None else getattr(result, "past_key_values", None)
