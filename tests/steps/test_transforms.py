"""The transforms are exact: before any quantization the QUAD model reproduces the original."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, tiny_model

from quadllm.arch import get_adapter
from quadllm.config import QuantConfig
from quadllm.nn.modules import QuadHead, QuadLinear
from quadllm.pipelines.in_memory import transform


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("method,rank", [("quad", 8), ("quad", 20), ("quarot", None), ("rtn", None)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-3)])
def test_transform_reproduces_logits(arch, method, rank, dtype, tol):
    model = tiny_model(arch, dtype)
    ids = random_ids(2, 24)
    with torch.no_grad():
        ref = model(ids).logits
    config = QuantConfig(method=method, rank=rank, kv_bits=16)
    info = transform(model, config, random_ids(4, 16, seed=2), progress=False)
    with torch.no_grad():
        out = model(ids).logits
    assert _rel(out, ref) < tol
    if rank:
        assert 0 < info["captured_energy"] <= 1
        lin = model.model.layers[0].self_attn.q_proj
        assert isinstance(lin, QuadLinear) and lin.in_features == 48 + rank and lin.rank == rank


def test_transform_changes_the_weights(arch):
    """Guard against a vacuous exactness test: the weights really move to another basis."""
    model = tiny_model(arch)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    transform(model, QuantConfig(method="quad", rank=8), random_ids(4, 16), progress=False)
    after = model.model.layers[0].mlp.up_proj.weight
    assert after.shape == (before.shape[0], before.shape[1] + 8)
    assert not torch.allclose(after[:, 8:], before, atol=1e-3)


def test_rank_larger_than_hidden_is_an_error():
    from quadllm.config import ConfigError

    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="larger than the hidden size"):
        transform(model, QuantConfig(method="quad", rank=49), random_ids(2, 16), progress=False)


def test_nan_in_calibration_is_an_error():
    from quadllm.steps.calibration import CalibrationError

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[5, 3] = float("nan")
    ids = random_ids(2, 16)
    ids[0, 4] = 5
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        transform(model, QuantConfig(method="quad", rank=8), ids, progress=False)


def test_tied_head_is_held_once():
    model = tiny_model("llama")
    transform(model, QuantConfig(method="quad", rank=8), random_ids(2, 16), progress=False)
    head = model.lm_head
    assert isinstance(head, QuadHead) and head.tied
    assert head.table() is model.model.embed_tokens.weight
    names = [n for n, _ in model.named_parameters()]
    assert sum("embed_tokens.weight" in n for n in names) == 1
    assert not any(n.startswith("lm_head.own_weight") for n in names)


def test_unknown_architecture_is_rejected():
    from transformers import GPT2Config, GPT2LMHeadModel

    from quadllm.arch import UnsupportedArchitecture

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitecture, match="supports: llama, mistral, qwen2, qwen3"):
        get_adapter(model)


def test_kv_quant_rotation_is_exact_at_16_bits_and_active_at_4():
    model = tiny_model("llama", torch.float64)
    ids = random_ids(1, 24)
    with torch.no_grad():
        ref = model(ids).logits
    m4 = copy.deepcopy(model)
    transform(m4, QuantConfig(method="quarot", kv_bits=4), random_ids(2, 16), progress=False)
    with torch.no_grad():
        out4 = m4(ids).logits
    err4 = _rel(out4, ref)
    assert 1e-4 < err4 < 0.5  # 4-bit KV changes the output, but not beyond recognition
    for layer in m4.model.layers:
        layer.self_attn.quad_kv.bits = 16
    with torch.no_grad():
        assert _rel(m4(ids).logits, ref) < 1e-5  # the q/k rotation alone is exact
