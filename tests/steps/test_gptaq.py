"""``weights="gptaq"``: GPTQ on the target that maps the quantized model's inputs to the
full-precision model's outputs. The full-precision stream each layer is calibrated against is the
float model's own hidden states; in memory and streaming give the same checkpoint."""

from __future__ import annotations

import copy

import torch
from conftest import mean_kl, quantized_in_memory_and_streaming, random_ids, tiny_model

import quadllm.pipelines.recipe as recipe_module
from quadllm import QuantConfig, quantize
from quadllm.arch import get_adapter
from quadllm.config import RECIPE_OFF
from quadllm.pipelines.in_memory import transform
from quadllm.steps.calibration import capture_layer_inputs, run_layer
from quadllm.steps.transforms import set_act_enabled


def test_each_layer_is_calibrated_against_the_float_models_hidden_states(monkeypatch):
    samples = random_ids(4, 16)
    cfg = QuantConfig(method="quad", rank=8, weights="gptaq", calib_samples=4, calib_seqlen=16, calib_batch=2)
    fp = tiny_model("qwen2", torch.float32, seed=0)
    expected = copy.deepcopy(fp)
    transform(expected, cfg, samples, progress=False)
    set_act_enabled(expected, False)
    adapter = get_adapter(expected)
    inputs = capture_layer_inputs(expected, adapter, samples, 2)
    want = []
    for layer in adapter.layers(expected):
        want.append([h.clone() for h in inputs.hidden])
        inputs.hidden = [run_layer(layer, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]

    seen = []
    real = recipe_module.gptq_layer

    def spy(layer, adapter, config, inputs, index, reference_layer=None, **kw):
        if reference_layer is not None:
            seen.append([h.clone() for h in inputs.reference])
        return real(layer, adapter, config, inputs, index, reference_layer, **kw)

    monkeypatch.setattr(recipe_module, "gptq_layer", spy)
    quantize(fp, cfg, samples, progress=False)
    assert len(seen) == len(want) == 2
    for got, ref in zip(seen, want):
        for a, b in zip(got, ref):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # the quantized stream of layer 1 differs from the float one: there is something to correct
    assert not torch.allclose(seen[1][0], inputs_after_quantized_layer0(cfg, samples), atol=1e-6)


def inputs_after_quantized_layer0(cfg, samples):
    model = tiny_model("qwen2", torch.float32, seed=0)
    quantize(model, QuantConfig(**{**cfg.to_dict(), "weights": "gptq"}), samples, progress=False)
    set_act_enabled(model, False)
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter, samples, 2)
    return run_layer(adapter.layers(model)[0], inputs.hidden[0], inputs.kwargs[0])


def test_gptaq_in_memory_and_streaming_give_the_same_checkpoint(tmp_path):
    cfg = QuantConfig(method="quad", rank=8, weights="gptaq", down_rank=4, calib_samples=4, calib_seqlen=16,
                      calib_batch=2)
    model, a, b, meta = quantized_in_memory_and_streaming(tmp_path, "llama", cfg, random_ids(4, 16, seed=3))
    assert meta["quant_config"]["weights"] == "gptaq"
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(a(ids).logits, ref)
        assert torch.allclose(b(ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_gptaq_brings_the_outputs_closer_to_fp_than_gptq():
    samples = random_ids(32, 16)
    ids = random_ids(3, 16, seed=7)  # held out
    fp = tiny_model("llama", torch.float32, seed=0, num_hidden_layers=4)
    with torch.no_grad():
        ref = torch.log_softmax(fp(ids).logits, -1)
    errs = {}
    for weights in ("gptq", "gptaq"):
        model = copy.deepcopy(fp)
        quantize(model, QuantConfig(method="quad", rank=8, weights=weights, calib_samples=32,
                                    calib_seqlen=16, **RECIPE_OFF), samples, progress=False)
        with torch.no_grad():
            out = torch.log_softmax(model(ids).logits, -1)
        errs[weights] = mean_kl(ref, out)
    assert errs["gptaq"] < errs["gptq"], errs
