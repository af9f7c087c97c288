"""The per-layer recipe: the skeleton it builds for loading has exactly the modules, tensors and
online transforms that its transform and quantization steps produce, for every architecture and
configuration; a checkpoint whose recorded structure disagrees with its configuration is refused."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import init_empty_weights
from conftest import ARCHS, quantize_tiny, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM

from quadllm import CheckpointError, QuantConfig, load, save
from quadllm.arch import get_adapter
from quadllm.backends import place
from quadllm.config import ConfigError
from quadllm.nn.modules import QuadLinear
from quadllm.pipelines.loading import build_skeleton
from quadllm.analysis.report.collect import linear_precision, module_precisions
from quadllm.pipelines.recipe import LayerRecipe, check_overrides, module_table

CONFIGS = [dict(method="quad", rank=8, weights="rtn"), dict(method="quarot", weights="rtn", kv_bits=4),
           dict(method="rtn", weights="rtn", mode="w4a4a8"), dict(method="quad", rank=4, weights="gptq", group_size=16),
           dict(method="quad", rank=8, weights="rtn", a_clip_search=True),
           dict(method="quad", rank=8, weights="gptq", overrides=["layers.0.*=skip", "*.down_proj=a8",
                                                                  "layers.1.self_attn.q_proj=w4a16"])]


def _layout(model):
    tensors = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    linears = {n: (m.in_features, m.out_features, m.rank,
                   m.act.bits if "act_clip" in m._buffers else m.act,  # a searched clip comes with the tensors
                   type(m.transform).__name__,
                   getattr(m.transform, "orders", None)) for n, m in model.named_modules() if isinstance(m, QuadLinear)}
    return tensors, linears


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_skeleton_matches_what_the_steps_produce(arch, cfg):
    model = quantize_tiny(arch, **cfg)
    with init_empty_weights(include_buffers=False):
        empty = AutoModelForCausalLM.from_config(tiny_config(arch))
    build_skeleton(empty, QuantConfig(**cfg, calib_samples=4, calib_seqlen=16), model.quadllm_info["structure"],
                   torch.float32)
    assert _layout(empty) == _layout(model)


def test_the_recipe_checks_the_rank_against_the_model_once():
    model = quantize_tiny("llama", method="quarot", weights="rtn")
    with pytest.raises(ConfigError, match="larger than the hidden size 48"):
        LayerRecipe(QuantConfig(rank=49), get_adapter(model))


def test_a_structure_that_disagrees_with_the_config_is_refused(tmp_path):
    model = quantize_tiny("llama", method="quad", rank=8, weights="rtn")
    save(model, tiny_tokenizer(), tmp_path / "ckpt")
    meta_file = tmp_path / "ckpt" / "quadllm_config.json"
    meta = json.loads(meta_file.read_text())
    meta["structure"]["rank"] = 4
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="settings differ"):  # the recorded hash sees the edit first
        load(tmp_path / "ckpt")
    del meta["integrity"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="rank is 4, the configuration gives 8"):
        load(tmp_path / "ckpt")


#: every kind of module setting, in an order where a later pattern overrides an earlier one
OVERRIDES = ["layers.0.*=skip", "*.down_proj=a8", "layers.1.self_attn.q_proj=w4a16", "re:layers\\.0\\.mlp\\.up_proj=a4"]


def test_overrides_give_each_module_its_precision_and_the_checkpoint_records_them(tmp_path):
    model = quantize_tiny("qwen2", method="quad", rank=8, weights="gptq", overrides=OVERRIDES)
    table = model.quadllm_info["structure"]["modules"]
    assert table == module_table(QuantConfig.from_dict(model.quadllm_info["quant_config"]), get_adapter(model))
    assert {k for k, v in table.items() if v == "fp"} == {
        f"layers.0.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj")}
    assert table["layers.0.mlp.up_proj"] == "w4a4" and table["layers.0.mlp.down_proj"] == "w4a8"
    assert table["layers.1.self_attn.q_proj"] == "w4a16" and table["layers.1.self_attn.k_proj"] == "w4a4"
    layers = get_adapter(model).layers(model)
    for key, want in table.items():
        _, i, name = key.split(".", 2)
        assert linear_precision(layers[int(i)].get_submodule(name)) == want, key
    assert module_precisions(model)[1]["mlp.down_proj"] == "w4a8"
    # a skipped linear holds its float weight (stored in FP16) and no codes; GPTQ left it alone
    skipped = layers[0].get_submodule("self_attn.q_proj")
    assert not skipped.quantized and skipped.weight.dtype == torch.float32
    assert torch.equal(skipped.weight, skipped.weight.half().float())
    save(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, _, meta = load(tmp_path / "ckpt")
    assert meta["structure"]["modules"] == table
    ids = torch.randint(0, 160, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        # cpu-int8 runs the W4A4/W4A8 linears and leaves full-precision and weight-only ones to the float path
        counts = place(loaded, "cpu-int8")
        assert counts == {"cpu-int8": sum(v in ("w4a4", "w4a8") for v in table.values()),
                          "fake": sum(v in ("fp", "w4a16") for v in table.values())}
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-3, atol=1e-3)


def test_skipping_every_module_gives_the_exact_transformed_model_as_stored():
    """``*=skip``: every step but the rounding to storage precision is exact, so the model equals the
    exactly transformed float model rounded the same way (and W4A4 does not)."""
    from conftest import random_ids, tiny_model

    from quadllm.io.storage import round_to_storage
    from quadllm.pipelines.in_memory import transform
    from quadllm.steps.transforms import set_act_enabled

    cfg = dict(method="quad", rank=8, weights="rtn", a_clip_search=False, o_rank=0, down_smooth=0.0)
    ids = random_ids(2, 12, seed=5)
    exact = tiny_model("llama", torch.float32, seed=0)
    transform(exact, QuantConfig(**cfg, calib_samples=4, calib_seqlen=16), random_ids(4, 16), progress=False)
    set_act_enabled(exact, False)
    round_to_storage(exact)
    with torch.no_grad():
        want = exact(ids).logits
        skipped = quantize_tiny("llama", **cfg, overrides=["*=skip"])(ids).logits
        quantized = quantize_tiny("llama", **cfg)(ids).logits
    assert (skipped - want).abs().max() < 1e-5 * want.abs().max()
    assert (quantized - want).abs().max() > 1e-3 * want.abs().max()


def test_an_override_that_names_no_module_is_refused_with_the_names_it_could_match():
    model = quantize_tiny("llama", method="quarot", weights="rtn")
    with pytest.raises(ConfigError, match="names no module.*layers.0.self_attn.q_proj"):
        LayerRecipe(QuantConfig(rank=8, overrides=["*.qkv_proj=a8"]), get_adapter(model))
    check_overrides(QuantConfig(overrides=["model.layers.1.*=a8"]), get_adapter(model))


def test_rank_overrides_build_each_layers_decomposition_and_the_checkpoint_records_them(tmp_path):
    from conftest import random_ids

    overrides = ["layers.0.self_attn.o_proj=rank0", "layers.1.self_attn.o_proj=rank4", "layers.0.mlp.down_proj=rank8"]
    model = quantize_tiny("llama", method="quad", rank=8, weights="rtn", o_rank=2, overrides=overrides)
    layers = get_adapter(model).layers(model)
    heads = get_adapter(model).num_heads
    assert [layers[i].self_attn.o_proj.rank for i in (0, 1)] == [0, 4 * heads]
    assert [layers[i].mlp.down_proj.rank for i in (0, 1)] == [8, 0]
    save(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, _, meta = load(tmp_path / "ckpt")
    assert meta["structure"]["module_ranks"] == {"layers.0.self_attn.o_proj": 0, "layers.0.mlp.down_proj": 8,
                                                 "layers.1.self_attn.o_proj": 4, "layers.1.mlp.down_proj": 0}
    ids = random_ids(2, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("override,match", [
    ("*.q_proj=rank4", "o_proj \\(per head\\) and down_proj inputs only"),
    ("*.o_proj=rank16", "smaller than the head dimension"),
    ("*.down_proj=rank96", "smaller than the intermediate size"),
])
def test_bad_rank_overrides_are_refused_before_any_work(override, match):
    with pytest.raises(ConfigError, match=match):
        check_overrides(QuantConfig(method="quad", rank=8, overrides=[override]), get_adapter(tiny_config("llama")))
