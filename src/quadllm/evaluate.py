"""Quality of a model against text and against its original: perplexity (the papers'
protocol), mean KL divergence from the original's next-token distribution, top-1 agreement."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@torch.no_grad()
def window_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, reference: nn.Module | None = None,
               progress: bool = True, desc: str = "eval") -> dict[str, Any]:
    """Perplexity over non-overlapping ``windows`` [n, seqlen] (loss averaged over every predicted
    token), and with ``reference`` the mean KL(reference ‖ model) per token, the top-1 agreement
    and the reference's own perplexity on the same windows."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [n, seqlen] tensor, got {tuple(windows.shape)}")
    t0 = time.perf_counter()
    nll = 0.0
    ref_nll = 0.0
    kl = 0.0
    agree = 0
    tokens = 0
    bar = tqdm(range(windows.shape[0]), desc=desc, unit="window", disable=not progress)
    for i in bar:
        ids = windows[i:i + 1]
        targets = ids[0, 1:]
        logp = F.log_softmax(window_logits(model, ids)[0, :-1].double(), dim=-1)
        if not torch.isfinite(logp).all():
            raise FloatingPointError(f"non-finite logits in window {i}")
        nll -= float(logp.gather(1, targets[:, None]).sum())
        tokens += targets.numel()
        if reference is not None:
            ref_logp = F.log_softmax(window_logits(reference, ids)[0, :-1].double(), dim=-1)
            ref_nll -= float(ref_logp.gather(1, targets[:, None]).sum())
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        bar.set_postfix(ppl=f"{math.exp(nll / tokens):.3f}")
    result: dict[str, Any] = {
        "ppl": math.exp(nll / tokens),
        "tokens": tokens,
        "windows": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "seconds": time.perf_counter() - t0,
    }
    if reference is not None:
        result.update(kl=kl / tokens, top1_agreement=agree / tokens, reference_ppl=math.exp(ref_nll / tokens))
    return result
