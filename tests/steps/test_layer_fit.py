"""The learned steps (clip, transform) train against the quantized layer's output: every activation
quantizer on while they run, as the caller left them afterwards, even though the pipelines
calibrate with activation quantization off (``set_act_enabled(model, False)``)."""

from __future__ import annotations

import pytest
import torch
from conftest import first_float_layer

from quadllm import QuantConfig
from quadllm.nn.modules import QuadLinear
from quadllm.steps.layer_fit import act_quantizers_on, float_copy
from quadllm.steps.learned_clip import learn_layer_act_clips
from quadllm.steps.learned_transform import learn_layer_transforms
from quadllm.steps.weights import rtn_layer


def test_act_quantizers_on_switches_them_on_and_back_even_on_error():
    lins = [QuadLinear(4, 4), QuadLinear(4, 4)]
    lins[0].act_enabled, lins[1].act_enabled = False, True
    with pytest.raises(RuntimeError), act_quantizers_on(lins):
        assert all(lin.act_enabled for lin in lins)
        raise RuntimeError
    assert [lin.act_enabled for lin in lins] == [False, True]


@pytest.mark.parametrize("step", ["transform", "clip"])
def test_learned_steps_train_with_activation_quantization_on_when_the_pipeline_left_it_off(step):
    cfg = QuantConfig(method="quad", rank=8, weights="rtn", calib_samples=8, calib_seqlen=16, calib_batch=2,
                      learn_transform=3, a_clip_learn=3)
    layer, adapter, inputs = first_float_layer("llama", cfg)
    lins = [m for m in layer.modules() if isinstance(m, QuadLinear)]
    reference = float_copy(layer)
    seen: list[bool] = []
    # the float copies the steps make carry the hooks too: only the layer's own linears count
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append(m.act_enabled) if any(m is x for x in lins)
                                         else None) for m in lins]
    if step == "clip":
        rtn_layer(layer, adapter, cfg, 0)
    for m in lins:
        m.act_enabled = False  # as set_act_enabled(model, False) leaves them during calibration
    with torch.no_grad():
        if step == "transform":
            learn_layer_transforms(layer, adapter, inputs, cfg, 0)
        else:
            learn_layer_act_clips(layer, adapter, inputs, reference, 3, 0)
    for h in hooks:
        h.remove()
    assert seen and all(seen)  # every forward pass of the training and of the error before and after
    assert not any(m.act_enabled for m in lins)
