"""Original models: a load that misses or gains tensors is an error, and a quadllm checkpoint that
lost its quadllm_config.json is named as such, never evaluated as random weights."""

from __future__ import annotations

import pytest
import torch
from conftest import quantize_tiny, tiny_model, tiny_tokenizer
from safetensors.torch import load_file, save_file

from quadllm import save
from quadllm.cli import main
from quadllm.io.sources import ModelError, load_model


def _saved(tmp_path, arch="llama-untied"):
    d = tmp_path / "orig"
    tiny_model(arch, torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_a_complete_model_loads(tmp_path):
    model, _, source = load_model(str(_saved(tmp_path)))
    assert source.kind == "hf-dir" and sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_a_model_missing_or_gaining_tensors_is_refused(tmp_path, damage):
    d = _saved(tmp_path)
    state = load_file(d / "model.safetensors")
    if damage == "missing":
        state.pop("model.layers.1.mlp.down_proj.weight")
    elif damage == "unexpected":
        state["model.layers.0.extra.weight"] = torch.zeros(3)
    else:
        state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 48)
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="did not load completely"):
        load_model(str(d))


def test_a_checkpoint_without_its_quadllm_config_is_named_damaged(tmp_path, caplog):
    model = quantize_tiny("llama", method="quarot", weights="rtn")
    save(model, tiny_tokenizer(), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "quadllm_config.json").unlink()
    with pytest.raises(ModelError, match="damaged quadllm checkpoint"):
        load_model(str(tmp_path / "ckpt"))
    assert main(["eval", str(tmp_path / "ckpt"), "--max-windows", "1", "--seqlen", "16", "-q"]) == 2
    assert "damaged quadllm checkpoint" in caplog.text
