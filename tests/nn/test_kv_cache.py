"""The integer KV cache: the same grid as the simulated KV quantization, stored as codes."""

from __future__ import annotations

import pytest
import torch
from conftest import quantize_tiny, random_ids, tiny_tokenizer
from transformers import DynamicCache

from quadllm.config import RECIPE_OFF
from quadllm.core.quantizers import fake_quant_kv
from quadllm.evaluation.tasks.generation import generate
from quadllm.nn.kv_cache import (
    IntKVCache,
    cache_kwarg,
    cache_nbytes,
    dequantize_kv,
    make_cache,
    pack_uint4,
    quantize_kv,
    unpack_uint4,
)


@pytest.mark.parametrize("bits", [4, 8])
def test_codes_reproduce_the_simulated_grid(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 16, generator=g)
    x[0, 0, 0] = x[0, 0, 0].abs() + 2.0  # a row with only positive values: negative zero point
    codes, scale, zero = quantize_kv(x, bits, 0.95)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 2**bits - 1 and zero.dtype == torch.int16
    assert int(zero[0, 0, 0]) < 0
    assert torch.equal(dequantize_kv(codes, scale, zero, torch.float32), fake_quant_kv(x, bits, 0.95))
    assert torch.equal(unpack_uint4(pack_uint4(codes & 0xF)), codes & 0xF)
    with pytest.raises(ValueError, match="even"):
        pack_uint4(codes[..., :3])


def _kv_model(bits, arch="llama"):
    # without the searched clips and smoothing: the FP16 scales' rounding differences then cross fewer
    # activation rounding boundaries downstream, so the tolerance below holds
    model = quantize_tiny(arch, seed=0, method="quad", rank=8, weights="rtn", kv_bits=bits, **RECIPE_OFF)
    return model


@pytest.mark.parametrize("bits,arch", [(4, "llama"), (8, "qwen2")])
def test_decoding_with_integer_cache_matches_the_simulation(bits, arch):
    model = _kv_model(bits, arch)
    ids = random_ids(2, 20, seed=4)
    kw = cache_kwarg(model)
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits  # simulated K/V quantization, no cache
        cache = make_cache(model)
        assert isinstance(cache, IntKVCache)
        steps = [model(input_ids=ids[:, :12], use_cache=True, **{kw: cache}).logits[:, -1]]
        for t in range(12, 20):
            steps.append(model(input_ids=ids[:, t:t + 1], use_cache=True, **{kw: cache}).logits[:, -1])
        assert cache.get_seq_length() == 20
    got = torch.stack(steps, 1)
    want = full[:, 11:20]
    assert ((got - want).norm() / want.norm()) < 2e-3  # FP16 scales are the only difference
    # the cache holds codes: bits/32 of a float32 cache, plus per-token scales and zero points
    ref = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{kw: ref})
    hd = 16
    expected = (hd * bits / 8 + 4) / (hd * 4)
    assert cache_nbytes(cache) / cache_nbytes(ref) == pytest.approx(expected, rel=1e-6)
    # after decoding, a forward without the cache quantizes K and V again (nothing leaks)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, full)


def test_models_without_kv_quantization_keep_the_default_cache():
    assert make_cache(_kv_model(16)) is None
    with pytest.raises(ValueError, match="--kv-bits"):
        IntKVCache(_kv_model(16))


def test_generation_uses_the_integer_cache(monkeypatch):
    model = _kv_model(4)
    tok = tiny_tokenizer()
    made = []
    import quadllm.evaluation.tasks.generation as generation

    real = generation.make_cache
    monkeypatch.setattr(generation, "make_cache", lambda m: made.append(real(m)) or made[-1])
    out = generate(model, tok, ["abc", "hello there"], max_new_tokens=4, progress=False)
    assert len(out) == 2 and made and isinstance(made[0], IntKVCache)
    assert made[0].get_seq_length() > 0 and cache_nbytes(made[0]) > 0


def test_the_integer_cache_drops_ended_rows():
    model = _kv_model(4)
    ids = torch.randint(0, 64, (3, 7))
    cache = IntKVCache(model)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **{cache_kwarg(model): cache})
        cache.batch_select_indices(torch.tensor([0, 2]))
        nxt = torch.randint(0, 64, (3, 1))
        kept = model(input_ids=nxt[[0, 2]], use_cache=True, **{cache_kwarg(model): cache}).logits
        ref = IntKVCache(model)
        model(input_ids=ids[[0, 2]], use_cache=True, **{cache_kwarg(model): ref})
        want = model(input_ids=nxt[[0, 2]], use_cache=True, **{cache_kwarg(model): ref}).logits
    assert torch.allclose(kept, want, atol=1e-5) and cache.get_seq_length() == 8
