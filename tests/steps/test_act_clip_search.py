"""``a_clip_search``: every activation-quantized linear gets its own clip ratio, chosen on the
calibration data; readers of one tensor share it; the checkpoint carries it, in memory and
streaming alike; on a tiny model the searched clips beat no clipping."""

from __future__ import annotations

import pytest
import torch
from conftest import mean_kl, quantize_tiny, quantized_in_memory_and_streaming, random_ids, tiny_model

from quadllm import QuantConfig, quantize
from quadllm.arch import get_adapter
from quadllm.core.clipping import CLIP_STEP, MIN_CLIP
from quadllm.nn.modules import QuadLinear
from quadllm.steps.transforms import set_act_enabled


def _clips(model):
    return {n: float(m.act_clip) for n, m in model.named_modules() if isinstance(m, QuadLinear) and
            "act_clip" in m._buffers}


@pytest.mark.parametrize("arch, weights, sym", [("llama", "gptq", True), ("qwen2", "gptq", True),
                                               ("llama", "rtn", True), ("qwen2", "rtn", False)])
def test_every_quantized_input_gets_a_searched_clip_shared_by_its_readers(arch, weights, sym):
    model = quantize_tiny(arch, method="quad", rank=8, weights=weights, a_clip_search=True, act_sym=sym)
    adapter = get_adapter(model)
    clips = _clips(model)
    assert len(clips) == len(adapter.layers(model)) * len(adapter.all_linears)
    for name, c in clips.items():
        assert MIN_CLIP <= c <= 1.0 and abs(c / CLIP_STEP - round(c / CLIP_STEP)) < 1e-9, (name, c)
        lin = model.get_submodule(name)
        assert lin.act.clip_ratio == c  # the quantizer uses it
    for i, layer in enumerate(adapter.layers(model)):
        for group in adapter.reader_groups:
            prefix = f"model.layers.{i}."
            assert len({clips[prefix + n] for n in group.linears}) == 1
    assert len(set(clips.values())) > 1  # chosen per input, not one global value


def test_w4a16_has_nothing_to_search_and_only_quad_at_w4a4_searches_by_default():
    assert not _clips(quantize_tiny("llama", method="quad", rank=8, weights="rtn", mode="w4a16", a_clip_search=True))
    assert _clips(quantize_tiny("llama", method="quad", rank=8, weights="rtn"))
    assert not _clips(quantize_tiny("llama", method="quad", rank=8, weights="rtn", a_clip_search=False))
    assert not _clips(quantize_tiny("llama", method="quarot", weights="rtn"))
    assert QuantConfig(a_clip_search=True, mode="w4a16").needs_calibration is (QuantConfig(mode="w4a16").rank > 0)
    assert QuantConfig(method="quarot", weights="rtn", a_clip_search=True).needs_calibration
    assert not QuantConfig(method="quarot", weights="rtn").needs_calibration


def test_searched_clips_bring_the_logits_closer_to_fp_than_no_clipping():
    samples = random_ids(4, 16)
    ids = random_ids(3, 16, seed=7)  # held out
    fp = tiny_model("llama", torch.float32, seed=0)
    with torch.no_grad():
        ref = torch.log_softmax(fp(ids).logits, -1)
    errs = {}
    for label, extra in (("fixed 1.0", dict(a_clip=1.0, a_clip_search=False)), ("searched", dict(a_clip_search=True))):
        model = tiny_model("llama", torch.float32, seed=0)
        quantize(model, QuantConfig(method="quad", rank=8, weights="gptq", calib_samples=4, calib_seqlen=16, o_rank=0,
                                    down_smooth=0.0, **extra),
                 samples, progress=False)
        set_act_enabled(model, True)
        with torch.no_grad():
            out = torch.log_softmax(model(ids).logits, -1)
        errs[label] = mean_kl(ref, out)  # KL(FP || quantized) per token
    assert errs["searched"] < errs["fixed 1.0"], errs


def test_the_checkpoint_carries_the_clips_in_memory_and_streaming(tmp_path):
    cfg = QuantConfig(method="quad", rank=8, weights="gptq", a_clip_search=True, calib_samples=4, calib_seqlen=16,
                      calib_batch=2)
    model, a, b, meta = quantized_in_memory_and_streaming(tmp_path, "qwen2", cfg, random_ids(4, 16, seed=3))
    assert meta["quant_config"]["a_clip_search"] is True
    assert _clips(a) == _clips(model) == _clips(b) and _clips(a)
    for m in (a, b):
        assert all(m.get_submodule(n).act.clip_ratio == c for n, c in _clips(model).items())
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        assert torch.equal(a(ids).logits, model(ids).logits)
        assert torch.equal(b(ids).logits, model(ids).logits)
