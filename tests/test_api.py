"""The public API that users and the scripts rely on stays where the README says it is."""

from __future__ import annotations

import torch
from conftest import random_ids, tiny_model, tiny_tokenizer

import quadllm


def test_the_readme_api_round_trip(tmp_path):
    model = tiny_model("qwen2", torch.float32)
    cfg = quadllm.QuantConfig(method="quad", rank=8, weights="rtn", calib_samples=4, calib_seqlen=16)
    assert quadllm.quantize(model, cfg, random_ids(4, 16), progress=False) is model
    quadllm.save(model, tiny_tokenizer(), tmp_path / "ckpt")
    loaded, tok, meta = quadllm.load(tmp_path / "ckpt")
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
        counts = quadllm.place(loaded, "cpu-int8")
        assert sum(counts.values()) == 2 * 7 and meta["quant_config"]["rank"] == 8
    assert issubclass(quadllm.ConfigError, quadllm.QuadllmError) and issubclass(quadllm.CheckpointError,
                                                                                quadllm.QuadllmError)


def test_the_names_the_readme_and_scripts_use():
    for name in ("QuantConfig", "quantize", "save", "load", "place", "evaluate", "load_model", "calibration_samples",
                 "ModelSource", "__version__"):
        assert hasattr(quadllm, name), name
    from quadllm.cli import main

    assert callable(main)
