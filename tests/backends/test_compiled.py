"""Compiled decoding (:class:`CompiledDecoder`): the same activation codes as the eager kernels, the
same greedy tokens and logits as eager decoding, and clear refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import quantize_tiny, random_ids
from transformers import DynamicCache

from quadllm.backends import place
from quadllm.backends.compiled import CompiledDecoder, CompileError
from quadllm.backends.int4 import int4pack_available
from quadllm.backends.int8 import act_codes, asym_act_codes
from quadllm.nn.kv_cache import cache_kwarg


@pytest.mark.parametrize("bits,clip", [(4, 1.0), (4, 0.85), (8, 0.9)])
def test_compiled_activation_codes_are_the_eager_codes(bits, clip):
    """The quantizer fused by inductor rounds every element as the eager ops do (codes and scales
    bit for bit, symmetric and asymmetric)."""
    sym = torch.compile(lambda x: act_codes(x, bits, clip), dynamic=False, fullgraph=True)
    asym = torch.compile(lambda x: asym_act_codes(x, bits, clip), dynamic=False, fullgraph=True)
    g = torch.Generator().manual_seed(bits)
    for _ in range(5):
        x = torch.randn(3, 200, generator=g) * torch.rand(3, 1, generator=g) * 10
        for got, ref in ((sym(x), act_codes(x, bits, clip)), (asym(x), asym_act_codes(x, bits, clip))):
            assert all(torch.equal(a, b) for a, b in zip(got, ref))


def _eager_greedy(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    cache, name = DynamicCache(), cache_kwarg(model)
    logits = model(input_ids=ids, use_cache=True, **{name: cache}).logits[:, -1]
    tokens, all_logits = [], [logits]
    for _ in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        tokens.append(tok)
        logits = model(input_ids=tok, use_cache=True, **{name: cache}).logits[:, -1]
        all_logits.append(logits)
    return torch.cat(tokens, 1), all_logits


@pytest.mark.skipif(not int4pack_available(), reason="torch's CPU INT4 GEMM does not run here")
@pytest.mark.parametrize("head", ["int8", "int4"])
def test_compiled_decoding_is_eager_decoding(head):
    """cpu-int4 with an INT8 or INT4 head (o-rank 4 leaves o_proj a padded width), batch 2: the
    compiled step gives the eager step's greedy tokens and its logits to float rounding."""
    model = quantize_tiny("llama", weights="rtn", method="quad", rank=8, o_rank=4,
                          model_kwargs=dict(hidden_size=64, num_attention_heads=4, head_dim=16, intermediate_size=128))
    place(model, "cpu-int4", head=head)
    ids = random_ids(2, 6, seed=3)
    steps = 5
    with torch.no_grad():
        ref_tokens, ref_logits = _eager_greedy(model, ids, steps)
    dec = CompiledDecoder(model, max_len=6 + steps + 1, batch=2)
    logits = dec.prefill(ids)
    got_logits = [logits]
    for i in range(steps):
        tok = logits.argmax(-1, keepdim=True)
        assert torch.equal(tok[:, 0], ref_tokens[:, i])
        logits = dec.step(tok)
        got_logits.append(logits)
    assert dec.compile_seconds is not None and dec.length == 6 + steps
    for got, ref in zip(got_logits, ref_logits):
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    # a second sequence reuses the compiled step and the cache
    again = dec.generate(ids, steps)
    assert torch.equal(again, ref_tokens)
    with pytest.raises(CompileError, match="max_len"):
        dec.generate(ids, 2 * steps)
    with pytest.raises(CompileError, match=r"\[2, tokens\]"):
        dec.prefill(ids[:1])


@pytest.mark.skipif(not int4pack_available(), reason="torch's CPU INT4 GEMM does not run here")
def test_decoders_of_two_models_each_decode_their_own_model():
    """The compiled step runs without dynamo's guards: two decoders of the same shapes, one per model,
    built and stepped in turn in one process, each give their own model's eager tokens and logits
    (each compiled its own graph; none runs the other's weights)."""
    kw = dict(weights="rtn", method="quad", rank=8, model_kwargs=dict(hidden_size=64, num_attention_heads=4,
                                                                        head_dim=16, intermediate_size=128))
    models = [quantize_tiny("llama", seed=s, **kw) for s in (1, 2)]
    ids = random_ids(1, 5, seed=4)
    decoders, refs = [], []
    for m in models:
        place(m, "cpu-int4", head="int8")
        with torch.no_grad():
            refs.append(_eager_greedy(m, ids, 3))
        decoders.append(CompiledDecoder(m, max_len=9))
    assert not torch.equal(refs[0][0], refs[1][0]) or not torch.allclose(refs[0][1][-1], refs[1][1][-1])
    logits = [d.prefill(ids) for d in decoders]
    for i in range(3):
        for k, d in enumerate(decoders):  # interleaved: the second model's graph is compiled after the first ran
            tok = logits[k].argmax(-1, keepdim=True)
            assert torch.equal(tok[:, 0], refs[k][0][:, i])
            logits[k] = d.step(tok)
            ref = refs[k][1][i + 1]
            assert ((logits[k] - ref).norm() / ref.norm()).item() < 1e-5
    assert all(d.compile_seconds is not None for d in decoders)


@pytest.mark.skipif(not int4pack_available(), reason="torch's CPU INT4 GEMM does not run here")
def test_a_decoders_compiled_step_goes_with_it(monkeypatch):
    """Each decoder compiles its own copy of the step's code; once the decoder is gone, so is that
    code's function (and with it dynamo's cache of graphs for it)."""
    import gc
    import weakref

    from quadllm.backends import compiled

    made = []
    own = compiled._own_step
    monkeypatch.setattr(compiled, "_own_step", lambda model: made.append(own(model)) or made[-1])
    model = quantize_tiny("llama", weights="rtn", method="quad", rank=8)
    place(model, "cpu-int4", head="int8")
    dec = CompiledDecoder(model, max_len=9)
    dec.step(dec.prefill(random_ids(1, 5, seed=4)).argmax(-1, keepdim=True))
    step = weakref.ref(made.pop())
    assert step() is not None
    del dec
    gc.collect()
    assert step() is None


@pytest.mark.skipif(not int4pack_available(), reason="torch's CPU INT4 GEMM does not run here")
def test_the_cpp_wrapper_gives_the_python_wrappers_logits():
    """The step through inductor's C++ wrapper (the default) and through its Python wrapper: the
    same kernels in the same order, so the same logits, bit for bit."""
    model = quantize_tiny("llama", weights="rtn", method="quad", rank=8)
    place(model, "cpu-int4", head="w8a8")
    ids = random_ids(1, 5, seed=6)
    out = {}
    for cpp in (True, False):
        dec = CompiledDecoder(model, max_len=8, cpp_wrapper=cpp)
        tok = dec.prefill(ids).argmax(-1, keepdim=True)
        out[cpp] = torch.stack([dec.step(tok), dec.step(tok)])
        assert dec.cpp_wrapper is cpp
    assert torch.equal(out[True], out[False])


@pytest.mark.skipif(not int4pack_available(), reason="torch's CPU INT4 GEMM does not run here")
def test_a_cpp_wrapper_that_does_not_build_falls_back_to_python(monkeypatch, caplog):
    """A first step whose C++ wrapper fails to build is compiled again with the Python wrapper,
    said in the log; a failure of the Python wrapper is still a CompileError."""
    from torch._inductor.exc import InductorError

    from quadllm.backends import compiled

    real = compiled._compiled_step

    def fake(model, cpp_wrapper):
        if not cpp_wrapper:
            return real(model, False)

        def broken(**kwargs):
            raise InductorError(RuntimeError("no compiler for the wrapper"), None)
        return broken

    monkeypatch.setattr(compiled, "_compiled_step", fake)
    model = quantize_tiny("llama", weights="rtn", method="quad", rank=8)
    place(model, "cpu-int4", head="int8")
    ids = random_ids(1, 5, seed=7)
    ref = CompiledDecoder(model, max_len=8, cpp_wrapper=False)
    want = ref.step(ref.prefill(ids).argmax(-1, keepdim=True))
    dec = CompiledDecoder(model, max_len=8)
    with caplog.at_level("WARNING", logger="quadllm.backends.compiled"):
        got = dec.step(dec.prefill(ids).argmax(-1, keepdim=True))
    assert torch.equal(got, want) and dec.cpp_wrapper is False
    assert "Python wrapper" in caplog.text
    monkeypatch.setattr(compiled, "_compiled_step", lambda model, cpp_wrapper: fake(model, True))
    with pytest.raises(CompileError, match="could not compile"):
        dec2 = CompiledDecoder(model, max_len=8)
        dec2.step(dec2.prefill(ids).argmax(-1, keepdim=True))


def test_the_integer_kv_cache_is_refused():
    model = quantize_tiny("llama", weights="rtn", method="quad", rank=8, kv_bits=4)
    with pytest.raises(CompileError, match="integer KV cache"):
        CompiledDecoder(model, max_len=16)
    with pytest.raises(CompileError, match="max_len"):
        CompiledDecoder(quantize_tiny("llama", weights="rtn", method="quad", rank=8), max_len=1)


def test_generate_compile_gives_the_eager_tokens(tiny_original, capsys):
    import json

    from quadllm.cli import main

    args = ["generate", str(tiny_original), "hello there", "--max-new-tokens", "4", "--json", "-q"]
    assert main(args) == 0
    eager = json.loads(capsys.readouterr().out)
    assert main(args + ["--compile"]) == 0
    compiled = json.loads(capsys.readouterr().out)
    assert compiled["token_ids"] == eager["token_ids"] and len(eager["token_ids"]) >= 1
