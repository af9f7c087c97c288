"""The ``quadllm`` quantization method inside vLLM.

vLLM builds its own Llama / Qwen2 model from a stock-layout checkpoint's ``config.json`` (hidden
size d+r+p, stock norms and tables) and asks this config for the method of every linear layer. For
a decoder linear, the method computes with quadllm's own :class:`~quadllm.nn.modules.QuadLinear`
(built by the same skeleton :func:`quadllm.load` uses, so every recipe option loads the same way):
the online transform, the per-token activation quantization, the INT4 GEMM and the full-precision
outlier columns. vLLM fuses q/k/v and gate/up into one layer; the method keeps one QuadLinear per
original projection (each has its own activation clip) and concatenates their outputs.

What vLLM cannot express is refused when the engine starts, with the reason: KV-cache quantization
(vLLM's attention would silently run unquantized keys and values), tensor parallelism (the online
transforms and per-token scales cross shards; see the README's design), and checkpoints not in the
stock layout. ``QUADLLM_VLLM_BACKEND`` picks quadllm's kernel (``fake``, the default, computes as
``quadllm generate``; ``cpu-int8`` runs INT8 GEMMs).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import LinearBase, LinearMethodBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from quadllm.backends import place
from quadllm.config import QuantConfig
from quadllm.io.stock_layout import MARKER, QUANT_METHOD, stock_skeleton
from quadllm.nn.modules import QuadLinear
from quadllm.pipelines.loading import build_skeleton

log = logging.getLogger(__name__)

__all__ = ["BACKEND_ENV", "QWEN2_OVERRIDES", "QuadllmLinearMethod", "QuadllmVllmConfig"]

#: environment variable naming quadllm's backend for the decoder linears
BACKEND_ENV = "QUADLLM_VLLM_BACKEND"

#: vLLM's fused linears and the checkpoint's projections they hold, in vLLM's shard order
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

#: vLLM's shard ids of the fused q/k/v layer (gate/up uses 0 and 1)
QKV_SHARDS = {"q": 0, "k": 1, "v": 2}

#: ``--hf-overrides`` that serve a Qwen2 checkpoint with vLLM's Llama class: vLLM's Qwen2 class
#: takes the head size as hidden_size / heads, which the stock layout's wider stream breaks; its
#: Llama class reads ``head_dim``, and ``qkv_bias`` gives q/k/v (not o_proj) biases, as Qwen2 has
QWEN2_OVERRIDES = {"architectures": ["LlamaForCausalLM"], "qkv_bias": True}


@register_quantization_config(QUANT_METHOD)
class QuadllmVllmConfig(QuantizationConfig):
    """A stock-layout quadllm checkpoint's ``quantization_config``, as vLLM sees it."""

    def __init__(self, quantization: dict[str, Any]) -> None:
        super().__init__()
        for key in ("quant_config", "structure", "original"):
            if key not in quantization:
                raise ValueError(f"quantization_config has no {key!r}: not a quadllm checkpoint in the stock layout "
                                 "(rewrite it with `quadllm convert OLD NEW`)")
        self.quantization = quantization
        self.config = QuantConfig.from_dict(quantization["quant_config"])
        if self.config.kv_bits < 16:
            raise ValueError(f"this checkpoint quantizes the KV cache to {self.config.kv_bits} bits, which quadllm "
                             "does inside its own attention; vLLM's attention would run it unquantized: serve it with "
                             "quadllm, or quantize without --kv-bits for vLLM")
        if quantization["structure"].get("lora"):
            raise ValueError("this checkpoint holds LoRA adapters (quadllm finetune --method lora), which the plugin "
                             "does not build; serve the outlier fine-tune instead, or run it with quadllm")
        self.hf_config = None
        self._linears: dict[str, QuadLinear] | None = None

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float32, torch.bfloat16]

    @classmethod
    def get_min_capability(cls) -> int:
        return 0

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> QuadllmVllmConfig:
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        self.hf_config = hf_config
        if hf_config is None:
            return
        heads, head_dim = hf_config.num_attention_heads, getattr(hf_config, "head_dim", None)
        if "Qwen2ForCausalLM" in (hf_config.architectures or []) and head_dim and hf_config.hidden_size // heads != head_dim:
            raise ValueError("vLLM's Qwen2 class takes the head size as hidden_size / heads, which a quadllm checkpoint's "
                             "wider stream changes; serve it with vLLM's Llama class: --hf-overrides "
                             f"'{json.dumps(QWEN2_OVERRIDES)}'")

    def get_quant_method(self, layer: nn.Module, prefix: str):
        if not isinstance(layer, LinearBase):
            return None  # embeddings and the head are stock tables
        parts = self.parts(prefix)
        return QuadllmLinearMethod(parts) if parts else UnquantizedLinearMethod()

    def parts(self, prefix: str) -> list[QuadLinear]:
        """quadllm's linears behind the vLLM layer ``prefix`` (one, or the projections vLLM fused)."""
        linears = self._quad_linears()
        base, _, name = prefix.rpartition(".")
        if name in PACKED:
            return [linears[f"{base}.{n}"] for n in PACKED[name] if f"{base}.{n}" in linears]
        return [linears[prefix]] if prefix in linears else []

    def _quad_linears(self) -> dict[str, QuadLinear]:
        """Every decoder linear of the checkpoint, empty, built once per process from the config."""
        if self._linears is None:
            if self.hf_config is None:
                from vllm.config import get_current_vllm_config

                self.hf_config = get_current_vllm_config().model_config.hf_config
            model = stock_skeleton(self.hf_config)
            build_skeleton(model, self.config, self.quantization["structure"], torch.float32)
            self._linears = {name: m for name, m in model.named_modules() if isinstance(m, QuadLinear)}
            log.info("quadllm: %d quantized linears (%s)", len(self._linears), self.config.describe())
        return self._linears


class QuadllmLinearMethod(LinearMethodBase):
    """One vLLM linear layer computed by quadllm's linears ``parts``."""

    def __init__(self, parts: list[QuadLinear]) -> None:
        self.parts = parts

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        if input_size_per_partition != input_size or sum(output_partition_sizes) != output_size:
            raise ValueError("quadllm checkpoints serve with tensor parallelism 1: the online transforms and the "
                             "per-token activation scales cross shards (the README's tensor-parallel design)")
        if [p.out_features for p in self.parts] != list(output_partition_sizes):
            raise ValueError(f"{getattr(layer, 'prefix', 'a layer')}: vLLM expects outputs {output_partition_sizes}, "
                             f"the checkpoint's projections give {[p.out_features for p in self.parts]}")
        for p in self.parts:
            p.bias = None  # vLLM holds and adds the layer's bias
        # each part's tensors by checkpoint key, once: the loaders copy into them (its bias is vLLM's)
        states = [{k: t for k, t in p.state_dict(keep_vars=True).items() if k != "bias"} for p in self.parts]
        # the union: fused projections may differ (a full-precision q_proj beside quantized k/v)
        for key in dict.fromkeys([*(k for state in states for k in state), MARKER]):
            _dummy_param(layer, key, _loader(states, key))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        backend = os.environ.get(BACKEND_ENV, "fake")
        for p in self.parts:
            p.adopt_loaded_state()
            for t in p.parameters():
                t.requires_grad_(False)
            place(p, backend)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        xf = x.float()
        with torch.no_grad():
            y = torch.cat([p(xf) for p in self.parts], -1) if len(self.parts) > 1 else self.parts[0](xf)
        if bias is not None:
            y = y + bias
        return y.to(x.dtype)


def _dummy_param(layer: nn.Module, key: str, loader) -> None:
    """An empty parameter at ``key`` (dotted: submodules are created) whose weight loader puts the
    checkpoint's tensor into quadllm's linears: vLLM loads by its module tree's names."""
    *path, leaf = key.split(".")
    module = layer
    for name in path:
        if not hasattr(module, name):
            module.add_module(name, nn.Module())
        module = getattr(module, name)
    param = nn.Parameter(torch.empty(0), requires_grad=False)
    param.weight_loader = loader
    module.register_parameter(leaf, param)


def _loader(states: list[dict[str, torch.Tensor]], key: str):
    """The weight loader of ``key``: vLLM's shard id (q/k/v, 0/1) picks which projection's tensor."""
    def load(param: nn.Parameter, data: torch.Tensor, shard_id=None) -> None:
        shard = shard_id if shard_id is not None else getattr(data, "shard_id", None)
        index = 0 if shard is None else QKV_SHARDS.get(shard, shard)
        if shard is None and len(states) > 1:
            raise ValueError(f"{key}: a fused tensor for {len(states)} projections; quadllm stores them apart")
        target = states[int(index)].get(key)
        if key == MARKER and target is None:  # a quantized projection (a full-precision one has a weight)
            if data.numel():
                raise ValueError(f"{key}: a weight where quadllm writes an empty marker: not a quadllm checkpoint")
            return
        if target is None:
            raise ValueError(f"{key}: the checkpoint gives it to projection {shard}, which the configuration "
                             "builds without it (its precision per module disagrees)")
        if tuple(target.shape) != tuple(data.shape):
            raise ValueError(f"{key}: the checkpoint holds {tuple(data.shape)}, the configuration gives "
                             f"{tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(data)
    return load
