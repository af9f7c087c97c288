"""Adapter files and fine-tuning state files damaged in many seeded ways: each ends in a clear
error or gives exactly what was written; never a traceback, never silently other numbers."""

from __future__ import annotations

import random
import shutil

import pytest
import torch
from conftest import quantize_tiny, random_ids, tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import save_file

from quadllm import QuadllmError, load, save
from quadllm.finetune.adapter_file import apply_adapter, save_adapter
from quadllm.finetune.loop import load_state, save_state


@pytest.fixture(scope="module")
def adapter_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    save(quantize_tiny("llama", method="quad", rank=8, weights="rtn"), tiny_tokenizer(), root / "base")
    model = load(root / "base")[0]
    names = sorted(n for n, _ in model.named_parameters() if n.endswith("w_outlier"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in names:
                p.mul_(1.5)
    save_adapter(model, names, root / "ft.safetensors", root / "base", None, {"steps": 1})
    ids = random_ids(2, 10, seed=6)
    tuned = load(root / "base", adapter=root / "ft.safetensors")[0]
    with torch.no_grad():
        logits = tuned(ids).logits
    return root, ids, logits


def _damage_safetensors(f, rng, kind):
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    if kind == "truncate":
        f.write_bytes(bytes(data[:rng.randrange(len(data))]))
    elif kind == "flip-header":
        data[rng.randrange(header)] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
    elif kind == "flip-data":
        data[rng.randrange(header, len(data))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
    else:  # edit one metadata value
        with safe_open(str(f), framework="pt") as h:
            meta = dict(h.metadata())
            state = {k: h.get_tensor(k) for k in h.keys()}
        key = rng.choice(sorted(meta))
        meta[key] = rng.choice(["", "x", "1", "{}", meta[key][::-1]])
        save_file(state, str(f), metadata=meta)


KINDS = ["truncate", "flip-header", "flip-data", "edit-metadata"]
CASES = [(k, i) for k in KINDS for i in range(8)]


@pytest.mark.parametrize("kind,i", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_a_damaged_adapter_is_an_error_or_applies_exactly(tmp_path, adapter_case, kind, i):
    root, ids, logits = adapter_case
    f = tmp_path / "ft.safetensors"
    shutil.copy(root / "ft.safetensors", f)
    _damage_safetensors(f, random.Random(f"adapter-{kind}-{i}"), kind)
    model = load(root / "base")[0]
    try:
        apply_adapter(model, f, root / "base")
    except QuadllmError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


@pytest.mark.parametrize("kind,i", [(k, i) for k in ("truncate", "flip") for i in range(10)])
def test_a_damaged_training_state_is_an_error_or_reads_exactly(tmp_path, kind, i):
    state = {"step": 3, "trainable": {"a.w_outlier": torch.randn(4, 3)}, "history": [{"step": 1, "loss": 0.5}]}
    f = tmp_path / "run.finetune-state.pt"
    save_state(f, state)
    rng = random.Random(f"state-{kind}-{i}")
    data = bytearray(f.read_bytes())
    if kind == "truncate":
        f.write_bytes(bytes(data[:rng.randrange(len(data))]))
    else:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        f.write_bytes(bytes(data))
    try:
        got = load_state(f)
    except QuadllmError as exc:
        assert "damaged" in str(exc)
        return
    assert got["step"] == 3 and torch.equal(got["trainable"]["a.w_outlier"], state["trainable"]["a.w_outlier"])
