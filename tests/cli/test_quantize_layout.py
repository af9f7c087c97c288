"""``quadllm quantize`` writes the stock layout by default (``--layout stock``, or ``auto`` in memory): a
checkpoint transformers loads as its own architecture, equal to what ``quadllm.load`` reads back;
streaming, which never holds the model, refuses ``stock`` first and writes quadllm's layout with ``auto``."""

from __future__ import annotations

import json

import torch
from conftest import random_ids
from transformers import AutoModelForCausalLM

import quadllm
from quadllm.cli import main


def _args(orig, out, *extra):
    return ["quantize", "--model", str(orig), "--rank", "8", "--weights", "rtn", "--calib-samples", "4",
            "--calib-seqlen", "16", "--out", str(out), "-q", *extra]


def test_the_stock_layout_loads_in_transformers_as_quadllm_loads_it(tiny_original, tmp_path):
    out = tmp_path / "stock"
    assert main(_args(tiny_original, out, "--layout", "stock", "--streaming", "off")) == 0
    config = json.loads((out / "config.json").read_text())
    original = json.loads((tiny_original / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "quadllm"
    assert config["hidden_size"] >= original["hidden_size"] + 8
    ref, _, meta = quadllm.load(out)
    assert meta["format_version"] == 2
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = random_ids(2, 12, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_streaming_refuses_the_stock_layout_before_loading(tiny_original, tmp_path, caplog):
    out = tmp_path / "stock"
    assert main(_args(tiny_original, out, "--layout", "stock", "--streaming", "on")) == 2
    assert "--layout stock" in caplog.text
    assert not out.exists()


def test_the_default_is_the_stock_layout_in_memory_and_quadllms_when_streaming(tiny_original, tmp_path, caplog):
    assert main(_args(tiny_original, tmp_path / "mem", "--streaming", "off")) == 0
    assert quadllm.load(tmp_path / "mem")[2]["format_version"] == 2
    caplog.set_level("INFO")
    args = [a for a in _args(tiny_original, tmp_path / "stream", "--streaming", "on") if a != "-q"]
    assert main(args) == 0
    assert quadllm.load(tmp_path / "stream")[2]["format_version"] == 1
    assert "quadllm convert" in caplog.text
    assert main(_args(tiny_original, tmp_path / "old", "--streaming", "off", "--layout", "quadllm")) == 0
    assert quadllm.load(tmp_path / "old")[2]["format_version"] == 1
