"""``down_rank``: each down_proj input's top principal coordinates kept in full precision. The split
is exact on the float model; quantized, it lowers the error; the checkpoint carries it in memory and
streaming alike, with the clip search on it (the backends and fine-tuning: their own tests)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer

from quadllm import QuantConfig, load, quantize, save
from quadllm.arch import get_adapter
from quadllm.core.decompose import SubspaceSplit
from quadllm.pipelines.in_memory import transform
from quadllm.pipelines.streaming import quantize_streaming
from quadllm.steps.calibration import capture_layer_inputs, run_layer
from quadllm.steps.decompose import decompose_down_proj
from quadllm.steps.transforms import set_act_enabled


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_the_split_of_down_proj_is_exact_on_the_float_model(arch):
    model = tiny_model(arch, torch.float64, seed=0)
    samples = random_ids(4, 16)
    cfg = QuantConfig(method="quad", rank=8, weights="rtn", calib_samples=4, calib_seqlen=16)
    transform(model, cfg, samples, progress=False)
    set_act_enabled(model, False)
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter, samples, 2)
    energies = []
    for i, layer in enumerate(adapter.layers(model)):
        energies.append(decompose_down_proj(layer, adapter, inputs, 5, i))
        inputs.hidden = [run_layer(layer, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]
        down = layer.get_submodule(adapter.down_proj)
        assert isinstance(down.transform, SubspaceSplit) and down.rank == 5
        assert down.in_features == adapter.intermediate_size + 5 == down.weight.shape[1]
    assert all(5 / adapter.intermediate_size < e < 1 for e in energies), energies  # better than any 5 axes on average
    with torch.no_grad():
        out = model(ids).logits
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-9)


def _kl(ref, out):
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def test_keeping_down_proj_coordinates_lowers_the_error():
    samples = random_ids(8, 16)
    ids = random_ids(3, 16, seed=7)  # held out
    fp = tiny_model("llama", torch.float32, seed=0, intermediate_size=128)
    with torch.no_grad():
        ref = torch.log_softmax(fp(ids).logits, -1)
    errs = {}
    for k in (0, 16):
        model = copy.deepcopy(fp)
        quantize(model, QuantConfig(method="quad", rank=8, weights="gptq", down_rank=k, calib_samples=8,
                                    calib_seqlen=16), samples, progress=False)
        with torch.no_grad():
            errs[k] = _kl(ref, torch.log_softmax(model(ids).logits, -1))
    assert errs[16] < errs[0], errs


def test_the_checkpoint_carries_the_split_in_memory_and_streaming(tmp_path):
    model = tiny_model("qwen2", torch.float32, seed=0)
    d = tmp_path / "orig"
    model.save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    cfg = QuantConfig(method="quad", rank=8, weights="gptq", down_rank=6, a_clip_search=True, calib_samples=4,
                      calib_seqlen=16, calib_batch=2)
    samples = random_ids(4, 16, seed=3)
    quantize(model, cfg, samples, progress=False)
    save(model, tiny_tokenizer(), tmp_path / "mem")
    quantize_streaming(d, cfg, samples, tmp_path / "stream", tiny_tokenizer(), progress=False)
    a, _, meta = load(tmp_path / "mem")
    b, _, _ = load(tmp_path / "stream")
    assert meta["quant_config"]["down_rank"] == 6 and meta["structure"]["down_rank"] == 6
    ids = random_ids(2, 12, seed=8)
    with torch.no_grad():
        ref = model(ids).logits
        assert torch.equal(a(ids).logits, ref)
        assert torch.allclose(b(ids).logits, ref, rtol=1e-4, atol=1e-4)
    for m in (a, b):
        downs = [layer.mlp.down_proj for layer in m.model.layers]
        assert all(isinstance(x.transform, SubspaceSplit) and x.rank == 6 and x.act.enabled for x in downs)
        assert all(x.act_enabled and x.act.clip_ratio == float(x.act_clip) for x in downs)
