"""scripts/layer_error_profile.py: a layer's error with each quantizer alone and all of them, on a tiny model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import float_layers_in_basis, random_ids, tiny_model

from quadllm import QuantConfig
from quadllm.pipelines.recipe import LayerRecipe
from quadllm.steps.layer_fit import float_copy, float_targets
from quadllm.steps.transforms import set_layer_activation_quant

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
lep = pytest.importorskip("layer_error_profile")


def test_the_profile_has_every_quantizer_alone_and_all_and_leaves_the_layer_float():
    cfg = QuantConfig(method="quad", rank=8, calib_samples=8, calib_seqlen=16, calib_batch=2)
    _, adapter, inputs, layers = float_layers_in_basis(tiny_model("llama", torch.float32), cfg, random_ids(8, 16),
                                                       random_ids(2, 12, seed=5))
    _, layer = next(layers)
    set_layer_activation_quant(layer, adapter, cfg, 0)
    targets = float_targets(float_copy(layer), inputs)
    weights_before = {n: layer.get_submodule(n).weight.clone() for n in adapter.all_linears}
    errors = lep.quantized_errors(layer, adapter, LayerRecipe(cfg, adapter), 0, inputs, targets)
    assert list(errors) == ["weights only", *adapter.all_linears, "all"]
    assert 0 < errors["weights only"] < errors["all"]
    assert all(errors["weights only"] <= errors[n] * (1 + 1e-6) for n in adapter.all_linears)
    assert all(torch.equal(layer.get_submodule(n).weight, w) for n, w in weights_before.items())
    data = {"meta": {"model": "tiny", "command": "c", "date": "d", "machine": "m", "version": "v", "describe": "x"},
            "layers": {"0": {"profile": errors, "learned_transform": {"4": errors["all"] / 2}}}}
    md = lep.fmt_md(data)
    assert f"| 0 | {1e3 * errors['weights only']:.3f} |" in md and "| 4 steps |" in md
