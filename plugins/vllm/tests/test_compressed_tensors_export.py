"""``quadllm export --format compressed-tensors`` read by vLLM itself (no quadllm plugin involved): vLLM's
compressed-tensors configuration maps every decoder linear of a W4A4 export to its INT4-activation
scheme and the online transforms to o_proj and down_proj; and a weight-only export without online
transforms, which vLLM's CPU kernels can run, is served with compressed-tensors' own log-probabilities.

(A W4A4 export runs on GPUs only: on CPU, vLLM 0.32 runs that scheme through its weight-only kernel and
its dense online transforms fail; see the README.)"""

from __future__ import annotations

import json

import pytest
import torch

import quadllm
from quadllm.integrations.compressed_tensors import load_exported
from quadllm.io.compressed_tensors import equivalent_clip
from quadllm.pipelines.export import export_compressed_tensors

def _export(h, tmp_path, arch: str, **config):
    model = h.quantize_tiny(arch, model_kwargs={"hidden_size": 64, "num_attention_heads": 2, "head_dim": 32,
                                                "intermediate_size": 128}, **config)
    ckpt = quadllm.save(model, h.tiny_tokenizer(), tmp_path / "ckpt")
    export_compressed_tensors(ckpt, tmp_path / "ct")
    return tmp_path / "ct"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_vllm_reads_a_w4a4_export_as_int4_activations_with_the_online_transforms(tmp_path, arch, helpers):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA4Int
    from vllm.model_executor.layers.quantization.compressed_tensors.transform.linear import (
        get_linear_transform_schemes,
    )

    out = _export(helpers, tmp_path, arch, method="quarot", weights="rtn", a_clip=equivalent_clip(4))
    cfg = CompressedTensorsConfig.from_config(json.loads((out / "config.json").read_text())["quantization_config"])
    packed = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    cfg.packed_modules_mapping = packed  # what vLLM's model class sets: its fused linears' parts
    transforms = {}
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        prefix, layer = f"model.layers.1.{name}", torch.nn.Linear(4, 4)
        parts = cfg.get_scheme_dict(layer, prefix)
        scheme = cfg._get_scheme_from_parts(weight_quant=parts["weights"], input_quant=parts["input_activations"],
                                            output_quant=parts.get("output_activations"), format=parts.get("format"),
                                            layer_name=prefix)
        assert isinstance(scheme, CompressedTensorsWNA4Int), name
        assert parts["input_activations"].num_bits == 4 and parts["input_activations"].strategy == "token"
        inputs, outputs = get_linear_transform_schemes(layer, prefix, cfg.transform_config, packed)
        assert not outputs
        transforms[name] = {t.scheme_name for t in inputs.values()}
    assert transforms == {"self_attn.qkv_proj": set(), "mlp.gate_up_proj": set(),
                          "self_attn.o_proj": {"quadllm_self_attn_o_proj"}, "mlp.down_proj": {"quadllm_mlp_down_proj"}}
    assert cfg.get_scheme_dict(torch.nn.Linear(4, 4), "lm_head") is None


def test_vllm_serves_a_weight_only_export_with_compressed_tensors_log_probabilities(tmp_path, helpers):
    from vllm import LLM, SamplingParams, TokensPrompt

    out = _export(helpers, tmp_path, "llama", method="rtn", mode="w4a16", weights="rtn")
    # vLLM's CPU kernel for packed INT4 weights runs in bfloat16
    llm = LLM(model=str(out), dtype="bfloat16", max_model_len=64, enforce_eager=True, gpu_memory_utilization=0.05,
              seed=0)
    ids = [1, 40, 41, 42, 43, 50, 60, 70]
    result = llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                                              temperature=0))
    got = [next(iter(d.values())).logprob for d in result[0].prompt_logprobs[1:]]
    del llm
    ref = load_exported(out, dtype=torch.bfloat16)
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].double(), -1)
    want = [float(logp[i - 1, tok]) for i, tok in enumerate(ids) if i]
    assert got == pytest.approx(want, abs=1e-2)
