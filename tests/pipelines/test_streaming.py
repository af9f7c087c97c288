"""Streaming quantization (one decoder layer at a time from memory-mapped safetensors) gives the
checkpoint the in-memory pipeline gives, for every architecture, sharded or not, with the
activations in memory or on disk; bad inputs and interruptions leave nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer

from quadllm import QuantConfig, load, quantize, save
from quadllm.cli import main
from quadllm.io.checkpoint import WEIGHTS_INDEX, CheckpointError, weight_files, weights_hash
from quadllm.pipelines.streaming import ActivationStore, LazyWeights, quantize_streaming

CFG = dict(method="quad", rank=8, weights="gptq", calib_samples=4, calib_seqlen=16, calib_batch=2)


def _original(tmp_path, arch="llama", shard=None):
    model = tiny_model(arch, torch.float32, seed=0)
    d = tmp_path / f"orig-{arch}"
    model.save_pretrained(d, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer().save_pretrained(d)
    return model, d


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _codes(model):
    return {k: v for k, v in model.state_dict().items() if k.endswith("qweight")}


@pytest.mark.parametrize("arch", ["llama", "llama-untied", "qwen2", "qwen3", "mistral"])
def test_streaming_matches_the_in_memory_pipeline(tmp_path, arch):
    model, d = _original(tmp_path, arch)
    samples = random_ids(4, 16, seed=3)
    cfg = dict(CFG, kv_bits=4) if arch == "qwen2" else CFG
    if arch == "llama-untied":  # per-module precisions stream too
        cfg = dict(CFG, overrides=["layers.0.*=skip", "*.down_proj=a8", "layers.1.mlp.up_proj=w4a16",
                                   "layers.1.self_attn.o_proj=rank0", "layers.1.mlp.down_proj=rank4"])
    quantize(model, QuantConfig(**cfg), samples, progress=False)
    save(model, tiny_tokenizer(), tmp_path / "mem")
    summary = quantize_streaming(d, QuantConfig(**cfg), samples, tmp_path / "stream", tiny_tokenizer(),
                                 progress=False)
    a, _, meta_a = load(tmp_path / "mem")
    b, _, meta_b = load(tmp_path / "stream")
    assert meta_b["structure"] == meta_a["structure"] and meta_b["streaming"]["shards"] == 3
    assert (tmp_path / "stream" / WEIGHTS_INDEX).is_file() and len(weight_files(tmp_path / "stream")) == 3
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and _codes(a)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # the same checkpoint, tensor for tensor
    ids = random_ids(2, 12, seed=8)
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    assert summary["tensor_bytes"] == meta_a["sizes"]["tensor_bytes"]
    assert summary["peak_memory_mb"] > 0


def test_sharded_input_spilled_activations_and_rtn(tmp_path):
    """An index of several input shards is read lazily; activations spilled to disk give the same
    checkpoint as activations in memory; RTN (no calibration) streams too."""
    _, d = _original(tmp_path, "llama-untied", shard="20KB")
    assert (d / WEIGHTS_INDEX).is_file()
    lazy = LazyWeights(d)
    assert len(set(lazy.weight_map.values())) > 1 and lazy.numel() > 0
    samples = random_ids(4, 16, seed=3)
    quantize_streaming(d, QuantConfig(**CFG), samples, tmp_path / "mem", progress=False)
    quantize_streaming(d, QuantConfig(**CFG), samples, tmp_path / "disk", progress=False, activation_budget_bytes=0,
                       workdir=tmp_path)
    assert not list(tmp_path.glob("quadllm-acts-*"))  # the spill directory is removed
    a, _, _ = load(tmp_path / "mem")
    b, _, _ = load(tmp_path / "disk")
    ids = random_ids(2, 12, seed=8)
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    quantize_streaming(d, QuantConfig(method="rtn", weights="rtn"), None, tmp_path / "rtn", progress=False)
    assert torch.isfinite(_logits(load(tmp_path / "rtn")[0], ids)).all()


def _mapped(directory) -> list[str]:
    """Lines of /proc/self/maps that map a file of ``directory``."""
    return [line for line in Path("/proc/self/maps").read_text().splitlines() if str(directory) in line]


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc/self/maps")
def test_lazy_weights_keep_no_file_mapped(tmp_path):
    """Tensors are copied out and the file unmapped at once: pages of a mapping left open count in
    the process's resident memory, which would grow to the whole model over a streaming run."""
    model, d = _original(tmp_path, "llama-untied", shard="20KB")
    lazy = LazyWeights(d)
    assert lazy.numel() == sum(p.numel() for p in model.state_dict().values())
    ref = model.state_dict()
    got = {k: lazy.get(k) for k in lazy.weight_map}
    half = lazy.get("model.embed_tokens.weight", torch.float16)
    assert not _mapped(d), _mapped(d)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert half.dtype == torch.float16 and torch.equal(half, ref["model.embed_tokens.weight"].half())
    got["model.embed_tokens.weight"].zero_()  # a private copy: the file is unchanged
    assert torch.equal(lazy.get("model.embed_tokens.weight"), ref["model.embed_tokens.weight"])


def test_activation_store_round_trips_on_disk(tmp_path):
    store = ActivationStore(budget_bytes=10, workdir=tmp_path)
    ts = [torch.randn(3, 4), torch.randn(2, 4)]
    for t in ts:
        store.append(t)
    assert all(torch.equal(a, b) for a, b in zip(store, ts)) and len(store) == 2
    store.close()
    assert not list(tmp_path.iterdir())


def test_streaming_errors_leave_nothing_behind(tmp_path, monkeypatch):
    _, d = _original(tmp_path)
    samples = random_ids(4, 16, seed=3)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    shutil.copy(d / "config.json", empty)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        quantize_streaming(empty, QuantConfig(**CFG), samples, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    good = tmp_path / "good"
    quantize_streaming(d, QuantConfig(**CFG), samples, good, progress=False)
    before = (good / "quadllm_config.json").read_text()

    import quadllm.pipelines.recipe as recipe

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # an interruption in the middle of layer 1
        return real(*args, **kwargs)

    real = recipe.gptq_layer
    monkeypatch.setattr(recipe, "gptq_layer", failing)
    with pytest.raises(KeyboardInterrupt):
        quantize_streaming(d, QuantConfig(**CFG), samples, good, progress=False)
    monkeypatch.undo()
    assert (good / "quadllm_config.json").read_text() == before  # the good checkpoint is untouched
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".good")]  # no temporary left
    load(good)

    # a sharded checkpoint with a shard missing or a corrupt index is a clear error
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    assert weights_hash(broken) == weights_hash(good)
    (broken / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing model-00002-of-00003"):
        load(broken)
    (broken / WEIGHTS_INDEX).write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load(broken)

    # NaN in a weight: a clear error naming it
    from safetensors.torch import load_file, save_file

    sd = load_file(d / "model.safetensors")
    sd["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj.weight has NaN"):
        quantize_streaming(d, QuantConfig(**CFG), samples, tmp_path / "nan", progress=False)
    assert not (tmp_path / "nan").exists()


def test_cli_streaming(tmp_path, capsys):
    _, d = _original(tmp_path, "qwen2")
    text = tmp_path / "calib.txt"
    text.write_text("streaming quantization reads one layer at a time. " * 80)
    args = ["quantize", "--model", str(d), "--rank", "8", "--calib", str(text), "--calib-samples", "4",
            "--calib-seqlen", "16", "--out", str(tmp_path / "q"), "-q"]
    assert main(args + ["--streaming", "on"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["streaming"] and summary["peak_memory_mb"] > 0 and summary["checkpoint_mb"] > 0
    model, _, meta = load(tmp_path / "q")
    assert meta["quant_config"]["rank"] == 8 and meta["original_model"]["path"] == str(d)
    assert main(["eval", str(tmp_path / "q"), "--data", str(text), "--seqlen", "32", "--max-windows", "2", "-q"]) == 0
    # the in-memory path prints the same summary, without the streaming mark
    capsys.readouterr()
    assert main(args[:-3] + ["--out", str(tmp_path / "m"), "-q", "--streaming", "off"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert "streaming" not in plain and plain.keys() | {"streaming"} == summary.keys()
    # a hub model cannot stream (a GGUF streams from its dequantized cache: tests/e2e/test_smollm2.py)
    assert main(["quantize", "--model", "some-org/some-model", "--streaming", "on", "--out", str(tmp_path / "g"),
                 "-q"]) == 2
    assert not (tmp_path / "g").exists()
