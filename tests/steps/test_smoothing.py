"""``down_smooth``: SmoothQuant scales of down_proj's input channels, fused into up_proj and
down_proj. The scales are the definition's; the change is exact on the float model and flattens
the channels' ranges; it reaches the checkpoint through the weights alone."""

from __future__ import annotations

import pytest
import torch
from conftest import float_layers_in_basis, random_ids, tiny_model

from quadllm import QuantConfig
from quadllm.config import ConfigError
from quadllm.steps.calibration import capture_group
from quadllm.steps.smoothing import smooth_down_proj, smoothing_scales


def test_smoothing_scales_are_smoothquants_normalized():
    a = torch.tensor([4.0, 1.0, 0.0, 9.0], dtype=torch.float64)
    w = torch.tensor([1.0, 4.0, 2.0, 1.0], dtype=torch.float64)
    s = smoothing_scales(a, w, 0.5)
    raw = torch.tensor([2.0, 1.0, 3.0]) / torch.tensor([1.0, 2.0, 1.0])  # sqrt(a) / sqrt(w)
    ref = raw / torch.exp(torch.log(raw.double()).mean())
    assert torch.allclose(s[[0, 1, 3]], ref.double()) and s[2] == 1.0
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(a, w, 1.0)
    with pytest.raises(ConfigError, match="down_smooth"):
        QuantConfig(down_smooth=1.5)


def _channel_spread(layer, adapter, inputs):
    """max over channels / median over channels of each down_proj input channel's max (untransformed)."""
    down = layer.get_submodule(adapter.down_proj)
    T = down.transform.dense().double()
    maxes = []
    capture_group(layer, adapter, [adapter.down_proj], inputs,
                  lambda _o, z: maxes.append((z.double().reshape(-1, z.shape[-1]) @ T).abs().amax(0)))
    m = torch.stack(maxes).amax(0)
    return float(m.max() / m.median())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_smoothing_is_exact_on_the_float_model_and_flattens_the_channels(arch):
    model = tiny_model(arch, torch.float64, seed=0)
    with torch.no_grad():  # a few hot intermediate channels, as real MLPs have
        for layer in model.model.layers:
            layer.mlp.up_proj.weight[:3] *= 25
    cfg = QuantConfig(method="quad", rank=8, weights="rtn", calib_samples=4, calib_seqlen=16)
    ids = random_ids(2, 12, seed=5)
    ref, adapter, inputs, layers = float_layers_in_basis(model, cfg, random_ids(4, 16), ids)
    for i, layer in layers:
        before = _channel_spread(layer, adapter, inputs)
        s = smooth_down_proj(layer, adapter, inputs, 0.5, i)
        assert s.shape == (adapter.intermediate_size,) and float(s.max()) > 2 * float(s.min())
        assert _channel_spread(layer, adapter, inputs) < 0.5 * before
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref, rtol=1e-9, atol=1e-9)
