"""A small checkpoint damaged in many seeded ways: every load ends in a clear error (a
QuadllmError, one line) or loads a model whose logits equal the undamaged one's; never a traceback,
never silently wrong numbers."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from conftest import quantize_tiny, random_ids, tiny_tokenizer

from quadllm import QuadllmError, load, save

SEED = 0


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "ckpt"
    model = quantize_tiny("qwen2", method="quad", rank=8, weights="rtn", kv_bits=4)
    save(model, tiny_tokenizer(), d)
    ids = random_ids(2, 12, seed=4)
    with torch.no_grad():
        logits = load(d)[0](ids).logits
    return d, ids, logits


def _truncate(d, rng):
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:rng.randrange(len(data))])


def _flip(d, rng, region):
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    pos = rng.randrange(0, header) if region == "header" else rng.randrange(header, len(data))
    data[pos] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))


def _edit_json(d, rng, name):
    f = d / name
    meta = json.loads(f.read_text())
    paths = []

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                paths.append(path + [k])
                walk(v, path + [k])

    walk(meta, [])
    path = rng.choice(paths)
    parent = meta
    for k in path[:-1]:
        parent = parent[k]
    choice = rng.randrange(6)
    if choice == 0:
        del parent[path[-1]]
    elif choice == 1:
        parent[path[-1]] = rng.choice([-1, 0, 3, 10**6, 2.5])
    elif choice == 2:
        parent[path[-1]] = rng.choice(["x", None, [], {}, True])
    elif choice == 3:
        parent["unknown_" + str(rng.randrange(100))] = 1
    elif choice == 4:
        parent[path[-1]] = str(parent[path[-1]])
    else:
        f.write_text(f.read_text()[: rng.randrange(len(f.read_text()))])
        return
    f.write_text(json.dumps(meta))


def _files(d, rng, action):
    victim = rng.choice(sorted(p for p in d.iterdir() if p.is_file()))
    if action == "delete":
        victim.unlink()
    else:
        victim.rename(victim.with_name(victim.name + ".bak"))


CASES = ([("truncate", i) for i in range(8)] + [("flip-header", i) for i in range(8)]
         + [("flip-data", i) for i in range(8)] + [("delete", i) for i in range(6)] + [("rename", i) for i in range(6)]
         + [("edit-quadllm", i) for i in range(24)] + [("edit-config", i) for i in range(12)])


@pytest.mark.parametrize("kind,i", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_a_damaged_checkpoint_is_an_error_or_loads_exactly(tmp_path, pristine, kind, i):
    src, ids, logits = pristine
    d = tmp_path / "ckpt"
    shutil.copytree(src, d)
    rng = random.Random(f"{SEED}-{kind}-{i}")
    if kind == "truncate":
        _truncate(d, rng)
    elif kind.startswith("flip"):
        _flip(d, rng, kind.split("-")[1])
    elif kind in ("delete", "rename"):
        _files(d, rng, kind)
    else:
        _edit_json(d, rng, "quadllm_config.json" if kind == "edit-quadllm" else "config.json")
    try:
        model = load(d)[0]
    except QuadllmError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        return
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits), "a damaged checkpoint loaded with other numbers"
