"""``down_rank`` and ``o_rank``: the top principal coordinates of down_proj's input, and of each KV
head's values in o_proj's input, kept in full precision. Both are exact on the float model; quantized, it lowers the error; the checkpoint carries it in memory and
streaming alike, with the clip search on it (the backends and fine-tuning: their own tests)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import (
    float_layers_in_basis,
    mean_kl,
    quantize_tiny,
    quantized_in_memory_and_streaming,
    random_ids,
    tiny_model,
    tiny_tokenizer,
)

from quadllm import QuantConfig, load, quantize, save
from quadllm.config import RECIPE_OFF, ConfigError
from quadllm.core.decompose import Reordered, SubspaceSplit
from quadllm.steps.decompose import decompose_down_proj, decompose_o_proj


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_the_split_of_down_proj_is_exact_on_the_float_model(arch):
    model = tiny_model(arch, torch.float64, seed=0)
    cfg = QuantConfig(method="quad", rank=8, weights="rtn", calib_samples=4, calib_seqlen=16)
    ids = random_ids(2, 12, seed=5)
    ref, adapter, inputs, layers = float_layers_in_basis(model, cfg, random_ids(4, 16), ids)
    energies = []
    for i, layer in layers:
        energies.append(decompose_down_proj(layer, adapter, inputs, 5, i))
        down = layer.get_submodule(adapter.down_proj)
        assert isinstance(down.transform, SubspaceSplit) and down.rank == 5
        assert down.in_features == adapter.intermediate_size + 5 == down.weight.shape[1]
    assert all(5 / adapter.intermediate_size < e < 1 for e in energies), energies  # better than any 5 axes on average
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("arch, kv_heads", [("llama", 1), ("qwen2", 1), ("llama-untied", 3)])
@pytest.mark.parametrize("method", ["quad", "rtn"])
def test_the_o_proj_split_is_exact_on_the_float_model(arch, kv_heads, method):
    model = tiny_model(arch, torch.float64, seed=0, num_key_value_heads=kv_heads)
    cfg = QuantConfig(method=method, rank=8 if method == "quad" else None, weights="rtn", calib_samples=4,
                      calib_seqlen=16)
    ids = random_ids(2, 12, seed=5)
    ref, adapter, inputs, layers = float_layers_in_basis(model, cfg, random_ids(4, 16), ids)
    for i, layer in layers:
        energy = decompose_o_proj(layer, adapter, inputs, 4, i)
        assert 4 / adapter.head_dim < energy < 1
        o = layer.get_submodule(adapter.o_proj)
        assert isinstance(o.transform, Reordered) and o.rank == adapter.num_heads * 4
        assert o.in_features == adapter.num_heads * adapter.head_dim  # no extra width
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, rtol=1e-9, atol=1e-9)


def test_o_rank_refuses_a_quantized_kv_cache_and_a_rank_beyond_the_head():
    with pytest.raises(ConfigError, match="kv_bits 16"):
        QuantConfig(o_rank=4, kv_bits=4)
    with pytest.raises(ConfigError, match="head dimension 16"):
        QuantConfig(rank=8, o_rank=16).check_model_sizes(48, 96, 16)


def test_keeping_down_proj_or_o_proj_coordinates_lowers_the_error():
    samples = random_ids(8, 16)
    ids = random_ids(3, 16, seed=7)  # held out
    fp = tiny_model("llama", torch.float32, seed=0, intermediate_size=128)
    with torch.no_grad():
        ref = torch.log_softmax(fp(ids).logits, -1)
    errs = {}
    for label, extra in (("base", {}), ("down", dict(down_rank=16)), ("o", dict(o_rank=4))):
        model = copy.deepcopy(fp)
        quantize(model, QuantConfig(method="quad", rank=8, weights="gptq", calib_samples=8, calib_seqlen=16, **extra),
                 samples, progress=False)
        with torch.no_grad():
            errs[label] = mean_kl(ref, torch.log_softmax(model(ids).logits, -1))
    assert errs["down"] < errs["base"] and errs["o"] < errs["base"], errs


def test_the_checkpoint_carries_the_split_in_memory_and_streaming(tmp_path):
    cfg = QuantConfig(method="quad", rank=8, weights="gptq", down_rank=6, o_rank=3, down_smooth=0.5,
                      a_clip_search=True, calib_samples=4, calib_seqlen=16, calib_batch=2)
    model, a, b, meta = quantized_in_memory_and_streaming(tmp_path, "qwen2", cfg, random_ids(4, 16, seed=3))
    assert meta["quant_config"]["down_rank"] == 6 and meta["structure"]["down_rank"] == 6
    assert meta["structure"]["o_rank"] == 3
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(a(ids).logits, ref)
        assert torch.allclose(b(ids).logits, ref, rtol=1e-4, atol=1e-4)
    for m in (a, b):
        downs = [layer.mlp.down_proj for layer in m.model.layers]
        assert all(isinstance(x.transform, SubspaceSplit) and x.rank == 6 and x.act.enabled for x in downs)
        assert all(x.act_enabled and x.act.clip_ratio == float(x.act_clip) for x in downs)
        assert all(isinstance(layer.self_attn.o_proj.transform, Reordered) and layer.self_attn.o_proj.rank == 9
                   for layer in m.model.layers)


def test_a_checkpoint_from_before_the_new_options_still_loads(tmp_path):
    import json

    from quadllm.io.checkpoint import settings_hash

    model = quantize_tiny("llama", method="quad", rank=8, weights="rtn", **RECIPE_OFF)  # as the release made it
    save(model, tiny_tokenizer(), tmp_path / "old")
    meta_file = tmp_path / "old" / "quadllm_config.json"
    meta = json.loads(meta_file.read_text())
    for key in ("down_rank", "o_rank"):  # what a checkpoint of the previous release records
        meta["structure"].pop(key)
        meta["quant_config"].pop(key)
    meta["quant_config"].pop("act_sym")
    meta["integrity"] = settings_hash(meta)  # as that release wrote it
    meta_file.write_text(json.dumps(meta))
    loaded, _, _ = load(tmp_path / "old", verify=False)
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
