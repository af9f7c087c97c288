"""The configuration object, and the evaluation metrics against hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import random_ids, tiny_model

from quadllm.evaluation.perplexity import evaluate_many, perplexity


def test_metrics_match_hand_computation():
    model = tiny_model("llama", torch.float64)
    other = tiny_model("llama", torch.float64, seed=5)
    windows = random_ids(3, 12)
    res = evaluate_many({"a": model, "b": other}, windows, reference=model, progress=False)
    nll_b, kl_b, agree_b, n = 0.0, 0.0, 0, 0
    nll_a = 0.0
    with torch.no_grad():
        for w in windows:
            la = F.log_softmax(model(w[None]).logits[0, :-1].float(), -1).double()
            lb = F.log_softmax(other(w[None]).logits[0, :-1].float(), -1).double()
            t = w[1:]
            nll_a -= la[torch.arange(len(t)), t].sum().item()
            nll_b -= lb[torch.arange(len(t)), t].sum().item()
            kl_b += (la.exp() * (la - lb)).sum().item()
            agree_b += (la.argmax(-1) == lb.argmax(-1)).sum().item()
            n += len(t)
    assert res["a"]["kl"] == 0 and res["a"]["top1_agreement"] == 1
    assert res["b"]["ppl"] == pytest.approx(math.exp(nll_b / n), rel=1e-5)
    assert res["b"]["reference_ppl"] == pytest.approx(math.exp(nll_a / n), rel=1e-5)
    assert res["b"]["kl"] == pytest.approx(kl_b / n, rel=1e-4)
    assert res["b"]["top1_agreement"] == pytest.approx(agree_b / n)
    assert res["b"]["tokens"] == 3 * 11 and res["b"]["windows"] == 3 and res["b"]["seqlen"] == 12
    single = perplexity(other, windows, progress=False)
    assert single["ppl"] == pytest.approx(res["b"]["ppl"], rel=1e-9) and "kl" not in single


def test_empty_windows_are_an_error():
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(tiny_model("llama"), torch.zeros(0, 8, dtype=torch.long), progress=False)


def test_resumed_evaluation_equals_a_full_one():
    model = tiny_model("llama", torch.float64)
    other = tiny_model("llama", torch.float64, seed=5)
    windows = random_ids(4, 12)
    full = evaluate_many({"a": model, "b": other}, windows, reference=model, progress=False)
    half = evaluate_many({"a": model, "b": other}, windows[:2], reference=model, progress=False)
    resumed = evaluate_many({"a": model, "b": other}, windows, reference=model, progress=False, resume=half)
    for name in ("a", "b"):
        for key in ("ppl", "kl", "top1_agreement", "reference_ppl", "tokens", "windows"):
            assert resumed[name][key] == pytest.approx(full[name][key], rel=1e-9, abs=1e-12), (name, key)
    with pytest.raises(ValueError, match="cannot resume"):
        evaluate_many({"a": model}, windows, reference=model, progress=False, resume=half)
