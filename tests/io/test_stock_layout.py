"""The stock layout (checkpoint format 2): a QUAD model written as the plain architecture of width
d + r (+ padding), exact against quadllm's own modules; ``quadllm convert`` from format 1."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ARCHS, quantize_tiny, random_ids, tiny_tokenizer
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import quadllm
from quadllm.cli.app import main
from quadllm.io.checkpoint import CheckpointError, read_meta
from quadllm.io.stock_layout import (
    MARKER,
    QUANT_METHOD,
    SHIM_FILE,
    expanded_norm,
    insert_zeros,
    original_config,
    padding,
    to_stock_modules,
)
from quadllm.nn.modules import QuadLinear, QuadRMSNorm

OLD = Path(__file__).resolve().parents[1] / "fixtures" / "old"


@pytest.mark.parametrize("d,r,pad", [(576, 64, 8), (896, 64, 6), (48, 0, 0), (48, 8, 1)])
def test_a_stock_rmsnorm_over_the_padded_width_equals_quads_norm_over_d(d, r, pad):
    eps = 1e-5
    eps2, gain = expanded_norm(d, d + r + pad, eps)
    assert eps2 == pytest.approx(eps * d / (d + r + pad)) and gain == pytest.approx(math.sqrt(d / (d + r + pad)))
    x = torch.randn(3, 5, d + r, dtype=torch.float64) * torch.logspace(-2, 2, d + r, dtype=torch.float64)
    padded = insert_zeros(x, -1, r, pad)

    def unpad(y):
        assert torch.equal(y[..., r:r + pad], torch.zeros_like(y[..., r:r + pad]))
        return torch.cat([y[..., :r], y[..., r + pad:]], -1)

    # the definitions, in float64: QUAD's norm divides by d; a stock one by its own width
    want = x / torch.sqrt(x.pow(2).sum(-1, keepdim=True) / d + eps)
    stock = gain * padded / torch.sqrt(padded.pow(2).mean(-1, keepdim=True) + eps2)
    torch.testing.assert_close(unpad(stock), want, rtol=1e-13, atol=0)
    torch.testing.assert_close(QuadRMSNorm(d, eps)(x), want, rtol=1e-13, atol=0)
    # transformers' own class (it computes in float32)
    norm = LlamaRMSNorm(d + r + pad, eps2)
    with torch.no_grad():
        norm.weight.fill_(gain)
    torch.testing.assert_close(unpad(norm(padded.float())).double(), want, rtol=1e-6, atol=1e-6)


def test_padding_makes_the_width_a_multiple_of_the_head_count():
    assert padding(640, 9) == 8 and padding(960, 14) == 6 and padding(64, 8) == 0
    with pytest.raises(ValueError):
        expanded_norm(10, 8, 1e-6)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


STOCK_CASES = [("llama", {}), ("llama-untied", {"o_rank": 2}), ("qwen2", {"down_rank": 4, "act_sym": False}),
               ("qwen3", {"kv_bits": 4}), ("mistral", {"learn_transform": 2, "weights": "rtn"}),
               ("qwen2", {"overrides": ["layers.0.*=skip", "*.down_proj=a8", "layers.1.mlp.up_proj=w4a16"]})]


@pytest.mark.parametrize("arch,extra", STOCK_CASES, ids=[a + ("-overrides" if "overrides" in e else "")
                                                          for a, e in STOCK_CASES])
def test_the_stock_model_computes_what_the_quad_model_computes(arch, extra):
    assert arch in ARCHS
    cfg = {"method": "quad", "rank": 8, "weights": "gptq", **extra}
    model = quantize_tiny(arch, **cfg)
    ids = random_ids(2, 12, seed=5)
    before = _logits(model, ids)
    to_stock_modules(model, {k: model.quadllm_info[k] for k in ("quant_config", "structure")},
                     table_dtype=torch.float32)  # without the FP16 rounding of the stored tables: exact
    cfg = model.config
    assert cfg.hidden_size % cfg.num_attention_heads == 0 and cfg.hidden_size >= 48 + 8
    assert cfg.quantization_config["quant_method"] == QUANT_METHOD and not cfg.tie_word_embeddings
    assert not any(isinstance(m, QuadRMSNorm) for m in model.modules())
    assert original_config(cfg).hidden_size == 48
    after = _logits(model, ids)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4 * float(before.abs().max()))


def test_a_saved_stock_checkpoint_reloads_to_the_same_logits_and_stops_a_loader_without_quadllm(tmp_path):
    model = quantize_tiny("llama", method="quad", rank=8, weights="rtn")
    ids = random_ids(2, 12, seed=5)
    to_stock_modules(model, {k: model.quadllm_info[k] for k in ("quant_config", "structure")})
    quadllm.save(model, tiny_tokenizer(), tmp_path / "ckpt")
    meta = read_meta(tmp_path / "ckpt")
    assert meta["format_version"] == 2
    loaded, _, _ = quadllm.load(tmp_path / "ckpt")
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=0, atol=1e-5)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        markers = [k for k in f.keys() if k.endswith(f"proj.{MARKER}")]
        assert len(markers) == 2 * 7 and all(f.get_slice(k).get_shape() == [0] for k in markers)
    assert (tmp_path / "ckpt" / SHIM_FILE).is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in OLD.iterdir() if p.is_dir()))
def test_convert_rewrites_an_old_checkpoint_whose_logits_stay_within_the_tables_fp16_rounding(tmp_path, name):
    old = tmp_path / "old"
    shutil.copytree(OLD / name, old)
    before = {f.name: f.read_bytes() for f in old.iterdir() if f.is_file()}
    ref = torch.load(old / "logits.pt")
    assert main(["convert", str(old), str(tmp_path / "new"), "-q"]) == 0
    assert {f.name: f.read_bytes() for f in old.iterdir() if f.is_file()} == before  # the old one is kept
    model, _, meta = quadllm.load(tmp_path / "new")
    assert meta["format_version"] == 2 and meta["converted_from"]["format_version"] == 1
    config = json.loads((tmp_path / "new" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == QUANT_METHOD
    assert config["hidden_size"] % config["num_attention_heads"] == 0
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], use_cache=False).logits
    # the tables' FP16 rounding moves a few activations across an INT4 step: small everywhere, a
    # little larger at the positions where one flips
    diff, scale = (logits - ref["logits"]).abs(), float(ref["logits"].abs().max())
    assert float(diff.mean()) < 1e-3 * scale and float(diff.max()) < 1e-2 * scale, (float(diff.mean()), scale)
    assert (logits.argmax(-1) == ref["logits"].argmax(-1)).float().mean() > 0.98
    assert any(isinstance(m, QuadLinear) for m in model.modules())


def test_convert_refuses_a_stock_checkpoint_the_same_directory_and_a_foreign_one(tmp_path):
    old = OLD / sorted(p.name for p in OLD.iterdir() if p.is_dir())[0]
    with pytest.raises(CheckpointError, match="same"):
        quadllm.convert(old, old)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not a quadllm checkpoint"):
        quadllm.convert(old, foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    quadllm.convert(old, tmp_path / "new")
    assert main(["convert", str(tmp_path / "new"), str(tmp_path / "newer"), "-q"]) == 2
    assert not (tmp_path / "newer").exists()
