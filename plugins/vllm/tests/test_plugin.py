"""The quadllm method inside vLLM (run in the vLLM environment: plugins/vllm/setup_venv.sh).

A tiny random model quantized by quadllm in the stock layout is served by vLLM's own Llama / Qwen2
class: its prompt log-probabilities equal quadllm.load's, and greedy decoding gives quadllm's tokens;
what vLLM cannot run (KV-cache quantization, tensor parallelism, a checkpoint without quadllm's
record) is refused with the reason."""

from __future__ import annotations

import sys

import pytest
import torch

import quadllm
from quadllm_vllm.method import QWEN2_OVERRIDES, QuadllmLinearMethod, QuadllmVllmConfig

#: per-module settings (quantize --override): a full-precision q_proj beside quantized k/v (one fused
#: vLLM layer), INT8 inputs to down_proj, a weight-only up_proj beside a W4A4 gate_proj, no o_proj
#: rank in layer 1 (2 per head in layer 0)
MIXED = ["layers.0.self_attn.q_proj=skip", "*.down_proj=a8", "layers.1.mlp.up_proj=w4a16",
         "layers.1.self_attn.o_proj=rank0"]


@pytest.fixture(scope="module", params=["llama", "qwen2", "llama-mixed"])
def served(request, tmp_path_factory, helpers):
    """(checkpoint, vLLM engine) for a tiny stock checkpoint of each family vLLM serves, and one
    with per-module precisions."""
    from vllm import LLM

    h = helpers
    arch = request.param.removesuffix("-mixed")
    # vLLM's CPU attention has kernels for head sizes of 32 and more
    ckpt = h.stock_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", arch,
                              model_kwargs={"num_attention_heads": 2, "head_dim": 32}, o_rank=2,
                              **({"overrides": MIXED} if request.param.endswith("-mixed") else {}))
    overrides = QWEN2_OVERRIDES if arch == "qwen2" else None
    llm = LLM(model=str(ckpt), dtype="float32", max_model_len=64, enforce_eager=True, gpu_memory_utilization=0.05,
              seed=0, hf_overrides=overrides)
    yield ckpt, llm
    del llm


def test_vllm_computes_quadllm_loads_log_probabilities(served):
    from vllm import SamplingParams, TokensPrompt

    ckpt, llm = served
    ids = [[1, 40, 41, 42, 43, 44, 45, 46, 47, 48], [1, 60, 61, 70, 71, 80, 81]]
    outs = llm.generate([TokensPrompt(prompt_token_ids=i) for i in ids],
                        SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0))
    ref, _, _ = quadllm.load(ckpt)
    for seq, out in zip(ids, outs):
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([seq])).logits[0].double(), -1)
        want = [float(logp[i - 1, tok]) for i, tok in enumerate(seq) if i]
        got = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
        assert got == pytest.approx(want, abs=2e-3)


def test_greedy_tokens_equal_quadllm_generate(served):
    from vllm import SamplingParams, TokensPrompt

    ckpt, llm = served
    prompt = [1, 50, 51, 52, 53]
    out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], SamplingParams(max_tokens=8, temperature=0,
                                                                               ignore_eos=True))
    ref, _, _ = quadllm.load(ckpt)
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, len(prompt):]
    assert list(out[0].outputs[0].token_ids) == want.tolist()


def test_kv_cache_quantization_and_foreign_configs_are_refused():
    cfg = quadllm.QuantConfig(method="quad", rank=8, kv_bits=4).to_dict()
    with pytest.raises(ValueError, match="KV cache to 4 bits"):
        QuadllmVllmConfig.from_config({"quant_method": "quadllm", "quant_config": cfg, "structure": {}, "original": {}})
    with pytest.raises(ValueError, match="quadllm convert"):
        QuadllmVllmConfig.from_config({"quant_method": "quadllm"})
    lora = quadllm.QuantConfig(method="quad", rank=8).to_dict()
    with pytest.raises(ValueError, match="LoRA"):
        QuadllmVllmConfig.from_config({"quant_method": "quadllm", "quant_config": lora, "original": {},
                                       "structure": {"lora": {"rank": 4}}})


def test_a_qwen2_checkpoint_without_the_override_is_refused_with_it():
    from transformers import Qwen2Config

    cfg = QuadllmVllmConfig.from_config({"quant_method": "quadllm", "structure": {}, "original": {},
                                         "quant_config": quadllm.QuantConfig(method="quad", rank=8).to_dict()})
    stock = Qwen2Config(hidden_size=72, num_attention_heads=2, head_dim=32, architectures=["Qwen2ForCausalLM"])
    with pytest.raises(ValueError, match="--hf-overrides"):
        cfg.maybe_update_config("ckpt", hf_config=stock)


def test_tensor_parallelism_is_refused_with_the_reason():
    from quadllm.nn.modules import QuadLinear

    method = QuadllmLinearMethod([QuadLinear(8, 4)])
    with pytest.raises(ValueError, match="tensor parallelism 1"):
        method.create_weights(torch.nn.Module(), input_size_per_partition=4, output_partition_sizes=[4], input_size=8,
                              output_size=4, params_dtype=torch.float32)


def test_the_command_line_starts_where_the_wheels_own_script_cannot():
    import subprocess

    from quadllm_vllm.cli import installed

    _, version = installed()
    run = subprocess.run([sys.executable, "-m", "quadllm_vllm.cli", "--version"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == version
