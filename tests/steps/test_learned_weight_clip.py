"""``w_clip_learn``: each weight row's clip ratio trained against the float layer's output, starting
from the MSE search's, then used by GPTQ/RTN in place of the search."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    config_recorded_before,
    first_float_layer,
    quantize_tiny,
    quantized_in_memory_and_streaming,
    random_ids,
)

from quadllm import QuantConfig
from quadllm.config import ConfigError
from quadllm.core.quantizers import weight_clip_ratios
from quadllm.nn.modules import QuadLinear
from quadllm.steps import learned_weight_clip
from quadllm.steps.calibration import run_layer
from quadllm.steps.layer_fit import float_copy, float_targets
from quadllm.steps.learned_weight_clip import WEIGHT_CLIP_MIN, learn_layer_weight_clips
from quadllm.steps.transforms import set_layer_activation_quant
from quadllm.steps.weights import rtn_layer


def _config(**kw) -> QuantConfig:
    return QuantConfig(method="quad", rank=8, weights="rtn", calib_samples=8, calib_seqlen=16, calib_batch=2,
                       w_clip_learn=30, **kw)


def _error(layer, reference, inputs) -> float:
    """The quantized layer's squared output error against the float layer, activations quantized."""
    with torch.no_grad():
        return sum(float((run_layer(layer, h, kw) - run_layer(reference, h, kw)).pow(2).sum())
                   for h, kw in zip(inputs.hidden, inputs.kwargs))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_learned_ratios_lower_the_quantized_layers_output_error_below_the_mse_search(arch):
    cfg = _config()
    layer, adapter, inputs = first_float_layer(arch, cfg)
    reference, searched = float_copy(layer), float_copy(layer)
    set_layer_activation_quant(searched, adapter, cfg, 0)
    clips = learn_layer_weight_clips(layer, adapter, inputs, float_targets(reference, inputs), cfg, 0)
    assert clips is not None and set(clips) == set(adapter.all_linears)
    for name, ratio in clips.items():
        lin = layer.get_submodule(name)
        assert not torch.nn.utils.parametrize.is_parametrized(lin)
        assert ratio.shape == (lin.out_features, 1) and not ratio.requires_grad
        assert bool((ratio >= WEIGHT_CLIP_MIN).all()) and bool((ratio <= 1).all())
    start = {n: weight_clip_ratios(layer.get_submodule(n).weight[:, 8:].float()) for n in clips}
    assert any(not torch.allclose(clips[n], start[n]) for n in clips)  # trained away from the search
    rtn_layer(layer, adapter, cfg, 0, clips=clips)
    rtn_layer(searched, adapter, cfg, 0)
    learned, mse = _error(layer, reference, inputs), _error(searched, reference, inputs)
    assert learned < 0.97 * mse, (learned, mse)


def test_ratios_that_do_not_lower_the_error_are_discarded_and_the_weights_left_alone(monkeypatch):
    cfg = _config()
    layer, adapter, inputs = first_float_layer("llama", cfg)
    before = {n: m.weight.detach().clone() for n, m in layer.named_modules() if isinstance(m, QuadLinear)}
    monkeypatch.setattr(learned_weight_clip, "WEIGHT_CLIP_LR", 5.0)  # every ratio jumps to a bound
    targets = float_targets(float_copy(layer), inputs)
    assert learn_layer_weight_clips(layer, adapter, inputs, targets, cfg, 0) is None
    for n, w in before.items():
        lin = layer.get_submodule(n)
        assert not torch.nn.utils.parametrize.is_parametrized(lin) and torch.equal(lin.weight, w)


def test_the_option_is_validated_recorded_and_old_configurations_load():
    model = quantize_tiny("llama", method="quad", rank=8, weights="gptq", w_clip_learn=4)
    layers = len(model.model.layers)
    assert model.quadllm_info["timings"]["learned_weight_clips_kept"].endswith(f"of {layers} layers")
    assert QuantConfig(method="quarot", weights="rtn", w_clip_learn=4, mode="w4a16").needs_calibration
    assert "clip learned per layer (4 steps)" in QuantConfig(w_clip_learn=4).describe()
    with pytest.raises(ConfigError, match="w_clip_learn"):
        QuantConfig(w_clip_learn=-1)
    assert config_recorded_before("w_clip_learn").w_clip_learn == 0


def test_in_memory_and_streaming_checkpoints_are_the_same(tmp_path):
    cfg = QuantConfig(method="quad", rank=8, weights="gptq", w_clip_learn=4, calib_samples=4, calib_seqlen=16,
                      calib_batch=2)
    model, a, b, meta = quantized_in_memory_and_streaming(tmp_path, "qwen2", cfg, random_ids(4, 16, seed=3))
    assert meta["quant_config"]["w_clip_learn"] == 4
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, model(ids).logits)
        torch.testing.assert_close(b(ids).logits, model(ids).logits)


@pytest.mark.parametrize("better", ["learned", "searched"])
def test_after_quantization_the_layer_keeps_the_ratios_whose_output_is_nearer_the_float_layers(better):
    cfg = _config()
    layer, adapter, inputs = first_float_layer("llama", cfg)
    searched = {n: weight_clip_ratios(layer.get_submodule(n).weight[:, 8:].float()) for n in adapter.all_linears}
    poor = {n: torch.full_like(r, WEIGHT_CLIP_MIN) for n, r in searched.items()}  # clips 80% of every row
    learned, search = (searched, poor) if better == "learned" else (poor, searched)
    expected = {}
    for name, clips in (("learned", learned), ("searched", search)):
        twin = float_copy(layer)
        set_layer_activation_quant(twin, adapter, cfg, 0)
        rtn_layer(twin, adapter, cfg, 0, clips=clips)
        expected[name] = twin.state_dict()

    def quantize(target, clips):  # as the pipeline's GPTQ, with the "search" standing for None
        rtn_layer(target, adapter, cfg, 0, clips=search if clips is None else clips)

    targets = float_targets(float_copy(layer), inputs)
    kept = learned_weight_clip.keep_after_quantization(layer, adapter, inputs, targets, learned, quantize, 0)
    assert kept == (better == "learned")
    got = layer.state_dict()
    assert set(got) == set(expected[better])
    assert all(torch.equal(got[k], expected[better][k]) for k in got)


def test_with_gptq_the_pipeline_quantizes_twice_and_records_what_it_kept(monkeypatch):
    calls = []
    real = learned_weight_clip.keep_after_quantization

    def spy(layer, adapter, inputs, targets, clips, quantize, index):
        calls.append(index)
        return real(layer, adapter, inputs, targets, clips, quantize, index)

    monkeypatch.setattr("quadllm.pipelines.recipe.keep_after_quantization", spy)
    model = quantize_tiny(method="quad", rank=8, weights="gptq", w_clip_learn=4)
    layers = model.config.num_hidden_layers
    # only the layers whose ratios passed the test before GPTQ are quantized twice
    assert calls and calls == sorted(set(calls)) and set(calls) <= set(range(layers))
    kept = model.quadllm_info["timings"]["learned_weight_clips_kept"]
    assert kept.endswith(f"of {layers} layers") and int(kept.split(" of ")[0]) <= len(calls)
