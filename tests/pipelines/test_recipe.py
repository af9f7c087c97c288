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
from quadllm.config import ConfigError
from quadllm.nn.modules import QuadLinear
from quadllm.pipelines.loading import build_skeleton
from quadllm.pipelines.recipe import LayerRecipe

CONFIGS = [dict(method="quad", rank=8, weights="rtn"), dict(method="quarot", weights="rtn", kv_bits=4),
           dict(method="rtn", weights="rtn", mode="w4a4a8"), dict(method="quad", rank=4, weights="gptq", group_size=16),
           dict(method="quad", rank=8, weights="rtn", a_clip_search=True)]


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
