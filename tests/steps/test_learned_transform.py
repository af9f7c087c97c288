"""``learn_transform``: an affine transform of every quantized input per layer, trained against the
float layer's output (FlatQuant-style). The fused layer computes exactly what the float layer did;
training lowers the quantized layer's error; transforms that do not are replaced by identities; the
readers of one tensor share theirs; checkpoints made in memory and by streaming carry them."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    config_recorded_before,
    first_float_layer,
    quantize_tiny,
    quantized_in_memory_and_streaming,
    random_ids,
)

from quadllm import QuantConfig
from quadllm.arch import get_adapter
from quadllm.config import ConfigError
from quadllm.core.affine import AffineTail
from quadllm.nn.modules import QuadLinear
from quadllm.steps import learned_transform
from quadllm.steps.calibration import run_layer
from quadllm.steps.layer_fit import float_copy
from quadllm.steps.learned_transform import learn_layer_transforms
from quadllm.steps.transforms import set_layer_activation_quant
from quadllm.steps.weights import rtn_layer


def _config(**kw) -> QuantConfig:
    return QuantConfig(method="quad", rank=8, weights="rtn", calib_samples=8, calib_seqlen=16, calib_batch=2,
                       learn_transform=30, **kw)


def _outputs(layer, inputs, quantized: bool) -> list[torch.Tensor]:
    lins = [m for m in layer.modules() if isinstance(m, QuadLinear)]
    for m in lins:
        m.act_enabled = quantized
    with torch.no_grad():
        out = [run_layer(layer, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
    for m in lins:
        m.act_enabled = False
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_the_fused_layer_computes_what_the_float_layer_did(arch):
    cfg = _config(o_rank=4, down_rank=4)  # the transforms sit after o_proj's and down_proj's own
    layer, adapter, inputs = first_float_layer(arch, cfg, torch.float64)
    from quadllm.steps.decompose import decompose_down_proj, decompose_o_proj

    decompose_o_proj(layer, adapter, inputs, 4, 0)
    decompose_down_proj(layer, adapter, inputs, 4, 0)
    before = _outputs(layer, inputs, quantized=False)
    assert learn_layer_transforms(layer, adapter, inputs, cfg, 0)
    for a, b in zip(before, _outputs(layer, inputs, quantized=False)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    tails = {n: layer.get_submodule(n).transform for n in adapter.all_linears}
    assert all(isinstance(t, AffineTail) for t in tails.values())
    assert all(t.keep == layer.get_submodule(n).rank for n, t in tails.items())
    for group in adapter.reader_groups:  # readers of one tensor share one transform
        first = tails[group.linears[0]]
        assert all(torch.equal(tails[n].matrix(), first.matrix()) for n in group.linears)
    eye = torch.eye(tails[adapter.down_proj].n, dtype=torch.float64)
    assert not torch.allclose(tails[adapter.down_proj].matrix(), eye)  # trained away from the identity


def _quantized_error(layer, reference, adapter, inputs, cfg) -> float:
    rtn_layer(layer, adapter, cfg, 0)
    out = _outputs(layer, inputs, quantized=True)
    target = _outputs(reference, inputs, quantized=False)
    return sum(float((a - b).pow(2).sum()) for a, b in zip(out, target))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_training_lowers_the_quantized_layers_output_error(arch):
    cfg = _config()
    layer, adapter, inputs = first_float_layer(arch, cfg)
    reference = float_copy(layer)
    plain = float_copy(layer)
    set_layer_activation_quant(plain, adapter, cfg, 0)
    assert learn_layer_transforms(layer, adapter, inputs, cfg, 0)
    with_transform = _quantized_error(layer, reference, adapter, inputs, cfg)
    without = _quantized_error(plain, reference, adapter, inputs, cfg)
    assert with_transform < 0.95 * without, (with_transform, without)


def test_transforms_that_do_not_lower_the_error_become_identities(monkeypatch):
    cfg = _config()
    layer, adapter, inputs = first_float_layer("llama", cfg, torch.float64)
    before = _outputs(layer, inputs, quantized=True)
    monkeypatch.setattr(learned_transform, "TRANSFORM_LR", 50.0)  # training that diverges
    assert not learn_layer_transforms(layer, adapter, inputs, cfg, 0)
    for name in adapter.all_linears:
        t = layer.get_submodule(name).transform
        assert isinstance(t, AffineTail) and torch.equal(t.matrix(), torch.eye(t.n, dtype=torch.float64))
        assert not torch.nn.utils.parametrize.is_parametrized(layer.get_submodule(name))
    for a, b in zip(before, _outputs(layer, inputs, quantized=True)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_every_quantized_input_gets_one_and_w4a16_none():
    model = quantize_tiny("llama", method="quad", rank=8, weights="gptq", learn_transform=4)
    adapter = get_adapter(model)
    tails = [m for m in model.modules() if isinstance(m, AffineTail)]
    assert len(tails) == len(adapter.layers(model)) * len(adapter.all_linears)
    assert model.quadllm_info["timings"]["learned_transforms_kept"].endswith(f"of {len(adapter.layers(model))} layers")
    w4a16 = quantize_tiny("llama", method="quad", rank=8, weights="rtn", mode="w4a16", learn_transform=4)
    assert not any(isinstance(m, AffineTail) for m in w4a16.modules())
    assert QuantConfig(method="quarot", weights="rtn", learn_transform=4).needs_calibration
    assert not QuantConfig(method="quarot", weights="rtn", learn_transform=4, mode="w4a16").needs_calibration
    assert "learned transforms (4 steps" in QuantConfig(learn_transform=4).describe()
    with pytest.raises(ConfigError, match="learn_transform"):
        QuantConfig(learn_transform=-1)
    assert config_recorded_before("learn_transform").learn_transform == 0


def test_the_checkpoint_carries_the_transforms_in_memory_and_streaming(tmp_path):
    cfg = QuantConfig(method="quad", rank=8, weights="gptq", learn_transform=4, o_rank=2, calib_samples=4,
                      calib_seqlen=16, calib_batch=2)
    model, a, b, meta = quantized_in_memory_and_streaming(tmp_path, "qwen2", cfg, random_ids(4, 16, seed=3))
    assert meta["quant_config"]["learn_transform"] == 4 and meta["structure"]["learned_transform"]

    def mats(m):
        return [t.matrix() for t in m.modules() if isinstance(t, AffineTail)]

    assert len(mats(a)) == len(mats(model)) == len(mats(b)) > 0
    for x, y, z in zip(mats(model), mats(a), mats(b)):
        assert torch.equal(x, y) and torch.equal(x, z)
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, model(ids).logits)
        torch.testing.assert_close(b(ids).logits, model(ids).logits)
