"""Quantize tiny models end to end, save, load, and check nothing is lost or half-written."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids, tiny_model

from quadllm import CheckpointError, QuantConfig, load, quantize, save
from quadllm.nn.modules import QuadLinear


class _Tok:
    """Just enough tokenizer for save/load: none is written (tokenizer=None)."""


def _quantized(arch="llama", **cfg):
    model = tiny_model(arch, torch.float32)
    config = QuantConfig(calib_samples=4, calib_seqlen=16, **cfg)
    quantize(model, config, random_ids(4, 16), progress=False)
    return model


def _save_load(model, tmp_path, monkeypatch):
    out = save(model, None, tmp_path / "ckpt", original={"spec": "tiny"})
    # no tokenizer was saved: load the model part only
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    loaded, _, meta = load(out)
    return out, loaded, meta


@pytest.mark.parametrize("cfg", [
    dict(method="quad", rank=8, mode="w4a4"),
    dict(method="quad", rank=8, mode="w4a4a8", kv_bits=4, weights="rtn"),
    dict(method="quarot", mode="w4a8", group_size=8, act_order=True),
    dict(method="rtn", mode="w4a16", weights="rtn"),
])
def test_round_trip_gives_identical_logits(arch, cfg, tmp_path, monkeypatch):
    model = _quantized(arch, **cfg)
    ids = random_ids(2, 20, seed=7)
    with torch.no_grad():
        before = model(ids).logits
    out, loaded, meta = _save_load(model, tmp_path, monkeypatch)
    with torch.no_grad():
        after = loaded(ids).logits
    assert torch.equal(before, after)
    assert meta["quant_config"]["method"] == cfg["method"]
    assert meta["format"] == "quadllm" and meta["original_model"] == {"spec": "tiny"}
    lin = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(lin, QuadLinear) and lin.quantized and lin.qweight.dtype == torch.uint8


def test_checkpoint_stores_packed_int4(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model = _quantized(method="quad", rank=8)
    out, _, meta = _save_load(model, tmp_path, monkeypatch)
    state = load_file(str(out / "model.safetensors"))
    q = state["model.layers.0.mlp.up_proj.qweight"]
    assert q.dtype == torch.uint8 and q.shape == (96, 48 // 2)  # 56 inputs - 8 outliers = 48 codes, 2 per byte
    assert state["model.layers.0.mlp.up_proj.w_outlier"].shape == (96, 8)
    assert state["model.layers.0.mlp.up_proj.w_outlier"].dtype == torch.float16
    assert state["model.embed_tokens.weight"].dtype == torch.float16
    assert not any(k.startswith("lm_head.own_weight") for k in state)  # tied: the table is stored once
    assert meta["quant_config"]["seed"] == 0 and meta["structure"]["rank"] == 8


def test_quantization_changes_outputs_but_stays_close():
    model = tiny_model("llama", torch.float32)
    ids = random_ids(2, 20, seed=7)
    with torch.no_grad():
        ref = model(ids).logits
    quantize(model, QuantConfig(method="quad", rank=8, calib_samples=4, calib_seqlen=16), random_ids(4, 16),
             progress=False)
    with torch.no_grad():
        out = model(ids).logits
    rel = float((out - ref).norm() / ref.norm())
    assert 1e-3 < rel < 1.0


def test_failed_save_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    model = _quantized(method="quad", rank=8)
    good = save(model, None, tmp_path / "ckpt")
    good_bytes = (good / "model.safetensors").read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("quadllm.io.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="No space left"):
        save(model, None, tmp_path / "ckpt")
    with pytest.raises(OSError):
        save(model, None, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    assert (good / "model.safetensors").read_bytes() == good_bytes


def test_save_refuses_to_overwrite_other_directories(tmp_path):
    model = _quantized(method="rtn", weights="rtn")
    other = tmp_path / "important"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a quadllm checkpoint"):
        save(model, None, other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_save_requires_a_quantized_model(tmp_path):
    with pytest.raises(CheckpointError, match="not been quantized"):
        save(tiny_model("llama"), None, tmp_path / "x")


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match="not a quadllm checkpoint"):
        load(tmp_path / "plain")
    model = _quantized(method="quad", rank=8)
    out = save(model, None, tmp_path / "ckpt")
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", lambda *a, **k: None)
    weights = out / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="damaged.*truncated"):
        load(out)
    record = json.loads((out / "quadllm_config.json").read_text())
    del record["files"]  # without the integrity record, safetensors itself refuses the truncated file
    (out / "quadllm_config.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="corrupt"):
        load(out)
    weights.write_bytes(data)
    cfg = out / "quadllm_config.json"
    meta = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        load(out)
    meta["format_version"] = 99
    cfg.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99"):
        load(out)


def test_generation_with_cache_matches_full_forward():
    """Greedy decoding through the KV cache (with 4-bit KV) agrees with recomputing from scratch."""
    model = _quantized(method="quad", rank=8, kv_bits=4)
    ids = random_ids(1, 10, seed=3)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6,
                             do_sample=False, pad_token_id=0)
        seq = ids
        for _ in range(6):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_weights_hash_is_of_the_tensors_not_the_file_bytes(tmp_path):
    """Two files with the same tensors but another header order (safetensors writes its metadata
    in a varying order) hash the same; one changed bit does not; the file-bytes hash tells them apart."""
    import json as _json
    import struct

    from safetensors.torch import save_file

    from quadllm.io.checkpoint import file_hash, weights_hash

    t = {"b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3), "a.bias": torch.ones(3, dtype=torch.float16)}
    one, two, three = (tmp_path / n for n in ("one", "two", "three"))
    for d in (one, two, three):
        d.mkdir()
    save_file(t, str(one / "model.safetensors"), metadata={"format": "pt", "quadllm": "1"})
    raw = (one / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = _json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__")
    reordered = _json.dumps({**dict(reversed(list(header.items()))), "__metadata__": dict(reversed(list(meta.items())))},
                            separators=(",", ":"))
    assert len(reordered) <= n
    reordered = reordered.encode().ljust(n)  # same length: the data offsets stay valid
    (two / "model.safetensors").write_bytes(raw[:8] + reordered + raw[8 + n:])
    assert file_hash(one) != file_hash(two)
    assert weights_hash(one) == weights_hash(two)
    t["b.weight"][1, 2] = torch.nextafter(t["b.weight"][1, 2], torch.tensor(10.0))
    save_file(t, str(three / "model.safetensors"), metadata={"format": "pt", "quadllm": "1"})
    assert weights_hash(three) != weights_hash(one)
