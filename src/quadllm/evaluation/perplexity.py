"""Quality of a model against text and against its original: perplexity (the papers'
protocol), mean KL divergence from the original's next-token distribution, top-1 agreement."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.text import TextSource, load_text, tokenize_windows
from ..errors import QuadllmError

log = logging.getLogger(__name__)


class EvaluationError(QuadllmError, FloatingPointError):
    """A model whose outputs cannot be scored (NaN or Inf logits)."""


@torch.no_grad()
def window_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Log-probabilities (float32, on the CPU) of the next token at every position but the last;
    ``ids`` go to the model's device."""
    logits = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits[0, :-1].float()
    return F.log_softmax(logits, dim=-1).cpu()


def kl_per_position(ref: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(reference ‖ model) at every position, from both log-probabilities [..., V]."""
    return (ref.exp() * (ref - logp)).sum(-1)


@dataclass
class _Tally:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def add(self, logp: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor | None) -> None:
        if not torch.isfinite(logp).all():
            raise EvaluationError("the model produced NaN or Inf logits; its weights (or the backend) are broken")
        self.nll -= float(logp.gather(1, targets[:, None]).double().sum())
        self.tokens += targets.numel()
        if ref is not None:
            self.kl += float(kl_per_position(ref, logp).double().sum())
            self.agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())


@torch.no_grad()
def evaluate_many(models: dict[str, nn.Module], windows: torch.Tensor, reference: nn.Module | None = None,
                  progress: bool = True, on_window: Callable[[int, dict[str, Any]], None] | None = None,
                  resume: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Evaluate several models on the same windows, computing the reference once per window.

    Returns, per model name, ``ppl``, ``tokens``, ``windows``, ``seqlen``, ``seconds`` and, with a
    reference, ``kl`` (mean KL(reference ‖ model) per token), ``top1_agreement`` and
    ``reference_ppl``. ``resume`` takes such a result for the first ``windows`` windows (every
    model at the same count) and continues from there.
    """
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seqlen] tensor, got {tuple(windows.shape)}")
    tallies = {name: _Tally() for name in models}
    ref_tally = _Tally()
    start = 0
    if resume:
        start, ref_tally = _restore(resume, tallies, reference is not None)
    bar = tqdm(range(start, windows.shape[0]), desc="eval", unit="window", disable=not progress,
               initial=start, total=windows.shape[0])
    for i in bar:
        ids = windows[i:i + 1]
        targets = ids[0, 1:]
        ref = None
        if reference is not None:
            t0 = time.perf_counter()
            ref = window_logprobs(reference, ids)
            ref_tally.add(ref, targets, None)
            ref_tally.seconds += time.perf_counter() - t0
        for name, model in models.items():
            t0 = time.perf_counter()
            if model is reference and ref is not None:
                logp = ref
            else:
                logp = window_logprobs(model, ids)
            tallies[name].add(logp, targets, ref)
            tallies[name].seconds += time.perf_counter() - t0
        first = next(iter(tallies.values()))
        bar.set_postfix(ppl=f"{math.exp(first.nll / first.tokens):.3f}")
        if on_window is not None:
            on_window(i, _summaries(tallies, ref_tally, windows, i + 1, reference is not None))
    return _summaries(tallies, ref_tally, windows, windows.shape[0], reference is not None)


def _restore(previous: dict[str, dict[str, Any]], tallies: dict[str, _Tally], with_ref: bool) -> tuple[int, _Tally]:
    """Rebuild the running sums from a summary of the first windows."""
    if set(previous) != set(tallies):
        raise ValueError(f"cannot resume: models {sorted(previous)} != {sorted(tallies)}")
    done = {r["windows"] for r in previous.values()}
    if len(done) != 1:
        raise ValueError("cannot resume: the models were evaluated on different numbers of windows")
    ref_tally = _Tally()
    for name, r in previous.items():
        t = tallies[name]
        t.tokens = int(r["tokens"])
        t.nll = math.log(r["ppl"]) * t.tokens
        t.seconds = float(r["seconds"])
        if with_ref:
            t.kl = r["kl"] * t.tokens
            t.agree = round(r["top1_agreement"] * t.tokens)
            ref_tally = _Tally(nll=math.log(r["reference_ppl"]) * t.tokens, tokens=t.tokens)
    return done.pop(), ref_tally


def _summaries(tallies, ref_tally, windows, n_done, with_ref) -> dict[str, dict[str, Any]]:
    out = {}
    for name, t in tallies.items():
        r: dict[str, Any] = {"ppl": math.exp(t.nll / t.tokens), "tokens": t.tokens, "windows": n_done,
                             "seqlen": int(windows.shape[1]), "seconds": t.seconds}
        if with_ref:
            r.update(kl=t.kl / t.tokens, top1_agreement=t.agree / t.tokens,
                     reference_ppl=math.exp(ref_tally.nll / ref_tally.tokens))
        out[name] = r
    return out


def perplexity(model: nn.Module, windows: torch.Tensor, reference: nn.Module | None = None,
               progress: bool = True) -> dict[str, Any]:
    """Perplexity over non-overlapping ``windows`` [n, seqlen] (loss averaged over every predicted
    token), and with ``reference`` the KL, top-1 agreement and the reference's perplexity."""
    t0 = time.perf_counter()
    result = evaluate_many({"model": model}, windows, reference, progress)["model"]
    result["seconds"] = time.perf_counter() - t0
    return result


def evaluate(model: nn.Module, tokenizer, data: str | TextSource | None = None, seqlen: int = 2048,
             max_windows: int | None = None, reference: nn.Module | None = None,
             data_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` on ``data`` (a name or file; None: the embedded default's
    evaluation part) and, with a ``reference`` model, KL and top-1 agreement."""
    source = data if isinstance(data, TextSource) else load_text(data, "eval", data_dir=data_dir)
    log.info("evaluation data: %s", source.origin)
    windows = tokenize_windows(tokenizer, source.text, seqlen, max_windows)
    result = perplexity(model, windows, reference=reference, progress=progress)
    result["data"] = source.origin
    return result
