"""``a_clip_learn``: every layer's clip ratios trained jointly against the float layer's output.
The gradient a tensor clip ratio gets is LSQ's (checked against its definition); training from a
poor start lowers the layer's output error; the ratios are stored on their grid, shared by the
readers of one tensor, carried by the checkpoint in memory and streaming alike, and kept only
where they lower the error."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    first_float_layer,
    quantize_tiny,
    quantized_in_memory_and_streaming,
    random_ids,
)

from quadllm import QuantConfig
from quadllm.arch import get_adapter
from quadllm.config import ConfigError
from quadllm.core.clipping import LEARNED_CLIP_MIN, LEARNED_CLIP_STEP, block_error, round_learned_clip
from quadllm.core.quantizers import fake_quant_act, qrange
from quadllm.nn.modules import QuadLinear
from quadllm.steps import learned_clip
from quadllm.steps.calibration import run_layer
from quadllm.steps.layer_fit import float_copy
from quadllm.steps.learned_clip import learn_layer_act_clips
from quadllm.steps.weights import rtn_layer


def _clips(model):
    return {n: float(m.act_clip) for n, m in model.named_modules() if isinstance(m, QuadLinear) and
            "act_clip" in m._buffers}


def test_round_learned_clip_clamps_and_rounds_to_a_grid_exact_in_half_precision():
    assert round_learned_clip(1.3) == 1.0 and round_learned_clip(0.01) == LEARNED_CLIP_MIN
    assert round_learned_clip(0.8012) == 205 / 256
    for c in (0.5, 0.73, 0.9, 0.999):
        r = round_learned_clip(c)
        assert abs(r - c) <= LEARNED_CLIP_STEP / 2
        for dtype in (torch.float16, torch.bfloat16):
            assert float(torch.tensor(r, dtype=dtype)) == r


def test_block_error_is_the_mean_squared_error_or_each_tokens_relative_error():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    target[0, 0] *= 100  # one token with a huge hidden state
    out = target + 0.1 * torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    d = out - target
    assert float(block_error(out, target, "mse")) == pytest.approx(float((d * d).sum()) / d.numel())
    rel = [float((d[b, t] ** 2).sum() / (target[b, t] ** 2).sum()) for b in range(2) for t in range(3)]
    assert float(block_error(out, target, "token")) == pytest.approx(sum(rel) / 6)
    with pytest.raises(ValueError, match="token"):
        block_error(out, target, "l1")
    with pytest.raises(ConfigError, match="a_clip_learn_loss"):
        QuantConfig(a_clip_learn_loss="l1")


def test_a_tensor_clip_ratio_gets_lsqs_gradient():
    # d/dc sum(g * Q_c(x)) with Q_c(x) = clamp(round(x/s), qmin, qmax) * s, s = c * max|x| / qmax:
    # dQ/ds = round(x/s) - x/s inside the range, the clamped code outside it (LSQ's estimator)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 40, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 40, dtype=torch.float64)
    w = torch.randn(6, 40, generator=g, dtype=torch.float64)
    qmin, qmax = qrange(4)
    c = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    out = fake_quant_act(x, 4, c)
    (out * w).sum().backward()
    m = x.abs().amax(-1, keepdim=True)
    s = 0.7 * m / qmax
    q = x / s
    inside = (q.round() >= qmin) & (q.round() <= qmax)
    dq_ds = torch.where(inside, q.round() - q, q.round().clamp(qmin, qmax))
    ref = float((w * dq_ds * m / qmax).sum())
    assert float(c.grad) == pytest.approx(ref, rel=1e-9)
    with torch.no_grad():  # the same values as a float ratio
        assert torch.equal(out, fake_quant_act(x, 4, 0.7))


def _layer_with_quantized_weights(arch: str):
    """Layer 0 of a tiny model in the QUAD basis with RTN weights and INT4 activation quantizers,
    its float copy and its calibration inputs."""
    cfg = QuantConfig(method="quad", rank=8, weights="rtn", calib_samples=8, calib_seqlen=16, calib_batch=2,
                      o_rank=0, down_smooth=0.0, a_clip_search=False)
    layer, adapter, inputs = first_float_layer(arch, cfg)
    reference = float_copy(layer)
    rtn_layer(layer, adapter, cfg, 0)
    return layer, reference, adapter, inputs


def _output_error(layer, reference, adapter, inputs) -> float:
    lins = [m for m in layer.modules() if isinstance(m, QuadLinear)]
    for m in lins:
        m.act_enabled = True
    with torch.no_grad():
        err = sum(float((run_layer(layer, h, kw) - run_layer(reference, h, kw)).pow(2).sum())
                  for h, kw in zip(inputs.hidden, inputs.kwargs))
    for m in lins:
        m.act_enabled = False
    return err


@pytest.mark.parametrize("arch, loss", [("llama", "token"), ("qwen2", "mse")])
def test_learning_from_a_poor_start_lowers_the_layers_output_error(arch, loss):
    layer, reference, adapter, inputs = _layer_with_quantized_weights(arch)
    lins = {n: layer.get_submodule(n) for n in adapter.all_linears}
    for lin in lins.values():
        lin.set_act_clip(LEARNED_CLIP_MIN)  # far too much clipping
    before = _output_error(layer, reference, adapter, inputs)
    chosen = learn_layer_act_clips(layer, adapter, inputs, reference, 40, 0, loss)
    after = _output_error(layer, reference, adapter, inputs)
    assert after < 0.9 * before, (before, after)
    assert set(chosen) == set(adapter.all_linears)
    for name, c in chosen.items():
        assert c > LEARNED_CLIP_MIN and c == round_learned_clip(c) and lins[name].act.clip_ratio == c
        assert float(lins[name].act_clip) == c and lins[name].clip_param is None
        assert not lins[name].act_enabled  # restored as it was (off while calibrating)
    for group in adapter.reader_groups:
        assert len({chosen[n] for n in group.linears}) == 1  # readers of one tensor share it


def test_ratios_that_do_not_lower_the_error_are_discarded(monkeypatch):
    layer, reference, adapter, inputs = _layer_with_quantized_weights("llama")
    for n in adapter.all_linears:
        layer.get_submodule(n).set_act_clip(0.875)
    before = _output_error(layer, reference, adapter, inputs)
    # training that ends at far too much clipping (the poor start of the test above)
    monkeypatch.setattr(learned_clip, "round_learned_clip", lambda c: LEARNED_CLIP_MIN)
    chosen = learn_layer_act_clips(layer, adapter, inputs, reference, 4, 0)
    assert set(chosen.values()) == {0.875}
    assert _output_error(layer, reference, adapter, inputs) == before


def test_every_quantized_input_gets_a_learned_clip_and_w4a16_none():
    model = quantize_tiny("llama", method="quad", rank=8, weights="gptq", a_clip_learn=30, a_clip_search=False,
                          a_clip=0.5, o_rank=0, down_smooth=0.0)  # a start with too much clipping
    adapter = get_adapter(model)
    clips = _clips(model)
    assert len(clips) == len(adapter.layers(model)) * len(adapter.all_linears)
    assert all(c == round_learned_clip(c) for c in clips.values())
    assert sum(c > 0.5 for c in clips.values()) > len(clips) // 2  # trained away from --a-clip
    assert not _clips(quantize_tiny("llama", method="quad", rank=8, weights="rtn", mode="w4a16", a_clip_learn=4))
    assert QuantConfig(method="quarot", weights="rtn", a_clip_learn=4).needs_calibration
    assert not QuantConfig(method="quarot", weights="rtn", a_clip_learn=4, mode="w4a16").needs_calibration
    with pytest.raises(ConfigError, match="a_clip_learn"):
        QuantConfig(a_clip_learn=-1)
    old = QuantConfig.from_dict({k: v for k, v in QuantConfig().to_dict().items()
                                 if k not in ("a_clip_learn", "a_clip_learn_loss")})  # recorded before the keys
    assert old.a_clip_learn == 0 and old.a_clip_learn_loss == "mse" and QuantConfig().a_clip_learn_loss == "token"


def test_the_checkpoint_carries_the_learned_clips_in_memory_and_streaming(tmp_path):
    cfg = QuantConfig(method="quad", rank=8, weights="gptq", a_clip_learn=4, calib_samples=4, calib_seqlen=16,
                      calib_batch=2)
    model, a, b, meta = quantized_in_memory_and_streaming(tmp_path, "qwen2", cfg, random_ids(4, 16, seed=3))
    assert meta["quant_config"]["a_clip_learn"] == 4
    assert _clips(a) == _clips(model) == _clips(b) and _clips(a)
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, model(ids).logits)
