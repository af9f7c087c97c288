"""transformers loads a stock-layout checkpoint: ``from_pretrained`` (quadllm imported, or through
the ``auto_map`` shim with ``trust_remote_code``) gives quadllm.load's logits; generate, pipeline
and save_pretrained work; without quadllm, loading stops instead of returning random weights."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import random_ids, stock_checkpoint
from transformers import AutoModelForCausalLM, pipeline

import quadllm
from quadllm.io.stock_layout import MARKER
from quadllm.nn.modules import QuadLinear

CASES = {"llama-padded-tied": ("llama", {}), "qwen2-down-rank": ("qwen2", {"down_rank": 4, "o_rank": 2}),
         "qwen3-kv4": ("qwen3", {"kv_bits": 4})}


def _checkpoint(tmp_path, arch: str, **extra):
    return stock_checkpoint(tmp_path / "ckpt", arch, **extra)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", sorted(CASES))
def test_from_pretrained_gives_quadllm_loads_logits(tmp_path, case):
    arch, extra = CASES[case]
    ckpt = _checkpoint(tmp_path, arch, **extra)
    ref, _, _ = quadllm.load(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    assert sum(isinstance(m, QuadLinear) for m in model.modules()) == 2 * 7
    ids = random_ids(2, 12, seed=4)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    if extra.get("kv_bits"):
        assert all(getattr(layer.self_attn, "quad_kv", None) is not None for layer in model.model.layers)
    assert not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


def test_generate_pipeline_and_save_pretrained_round_trip(tmp_path):
    ckpt = _checkpoint(tmp_path, "llama")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ref, tok, _ = quadllm.load(ckpt)
    prompt = torch.tensor([[1, 40, 41, 42]])
    out = model.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(out, ref.generate(prompt, max_new_tokens=6, do_sample=False))
    chat = pipeline("text-generation", model=str(ckpt), dtype=torch.float32)
    reply = chat([{"role": "user", "content": "hi"}], max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
    model.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", dtype=torch.float32)
    ids = random_ids(2, 10, seed=6)
    assert torch.equal(_logits(again, ids), _logits(model, ids))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "again" / "model.safetensors"), "pt") as f:
        assert sum(k.endswith(f"proj.{MARKER}") for k in f.keys()) == 2 * 7


def test_the_cpu_int8_backend_runs_a_model_transformers_loaded(tmp_path):
    ckpt = _checkpoint(tmp_path, "qwen2")
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    ref, _, _ = quadllm.load(ckpt)
    assert quadllm.place(model, "cpu-int8") == quadllm.place(ref, "cpu-int8")
    ids = random_ids(2, 10, seed=7)
    assert torch.equal(_logits(model, ids), _logits(ref, ids))


def _fresh_python(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_without_quadllm_loading_fails_loudly_and_the_shim_loads_it_with_trust_remote_code(tmp_path):
    ckpt = _checkpoint(tmp_path, "llama")
    plain = _fresh_python(f"""
        import sys
        from transformers import AutoModelForCausalLM
        AutoModelForCausalLM.from_pretrained({str(ckpt)!r})
        print("LOADED", "quadllm" in sys.modules)
        """, tmp_path)
    assert plain.returncode != 0 and "LOADED" not in plain.stdout
    assert "mismatch" in plain.stderr.lower()
    shim = _fresh_python(f"""
        import sys, torch
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(ckpt)!r}, trust_remote_code=True, dtype=torch.float32)
        print("LOADED", "quadllm" in sys.modules, type(m.model.layers[0].mlp.down_proj).__name__)
        """, tmp_path)
    assert shim.returncode == 0, shim.stderr[-2000:]
    assert "LOADED True QuadLinear" in shim.stdout


def test_a_lora_fine_tune_is_refused_rather_than_loaded_with_fresh_weights(tmp_path):
    from quadllm.cli.app import main

    ckpt = _checkpoint(tmp_path, "llama")
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 200)
    assert main(["finetune", str(ckpt), "--method", "lora", "--out", str(tmp_path / "lora"), "--max-steps", "1",
                 "--loss", "ce", "--data", str(tmp_path / "t.txt"), "--max-seqlen", "32", "-q"]) == 0
    assert quadllm.load(tmp_path / "lora")[2]["structure"]["lora"]
    with pytest.raises(ValueError, match="LoRA"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "lora", dtype=torch.float32)
