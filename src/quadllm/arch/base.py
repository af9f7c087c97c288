"""What quadllm needs to know about a model family: where its pieces are.

An adapter names the embedding, the decoder layers, the norms, the linears that read the
residual stream (after which norm), the linears that write it, the attention geometry and the
head. Everything else in quadllm works through these names, so a new family is one small file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn


@dataclass(frozen=True)
class ReaderGroup:
    """Linears reading the output of one norm (they share one input)."""

    norm: str  # attribute path of the norm inside a decoder layer
    linears: tuple[str, ...]  # attribute paths inside a decoder layer


class ArchAdapter:
    """Base adapter for decoder-only models laid out like Llama (pre-norm, RMSNorm,
    separate q/k/v projections, gated MLP). Subclasses set ``model_types`` and may override."""

    model_types: ClassVar[tuple[str, ...]] = ()
    notes: ClassVar[str] = ""

    attn_readers: ClassVar[ReaderGroup] = ReaderGroup(
        "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
    mlp_readers: ClassVar[ReaderGroup] = ReaderGroup(
        "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))
    v_proj: ClassVar[str] = "self_attn.v_proj"
    #: the MLP's linear factor: down_proj reads act(gate_proj(x)) * up_proj(x)
    up_proj: ClassVar[str] = "mlp.up_proj"
    o_proj: ClassVar[str] = "self_attn.o_proj"
    down_proj: ClassVar[str] = "mlp.down_proj"
    attention: ClassVar[str] = "self_attn"
    #: the configuration key of the RMSNorms' epsilon
    norm_eps_key: ClassVar[str] = "rms_norm_eps"

    def __init__(self, config) -> None:
        self.config = config

    # --- geometry -------------------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def intermediate_size(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def tied(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    # --- modules --------------------------------------------------------------------------
    def backbone(self, model: nn.Module) -> nn.Module:
        return model.model

    def embedding(self, model: nn.Module) -> nn.Module:
        return self.backbone(model).embed_tokens

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.backbone(model).layers

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.backbone(model).norm

    def head(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    def set_embedding(self, model: nn.Module, module: nn.Module) -> None:
        self.backbone(model).embed_tokens = module

    def set_final_norm(self, model: nn.Module, module: nn.Module) -> None:
        self.backbone(model).norm = module

    def set_head(self, model: nn.Module, module: nn.Module) -> None:
        model.lm_head = module

    @property
    def reader_groups(self) -> tuple[ReaderGroup, ...]:
        return (self.attn_readers, self.mlp_readers)

    @property
    def writers(self) -> tuple[str, ...]:
        return (self.o_proj, self.down_proj)

    @property
    def all_linears(self) -> tuple[str, ...]:
        return (*self.attn_readers.linears, self.o_proj, *self.mlp_readers.linears, self.down_proj)

    @property
    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears quantized together by GPTQ, in forward order."""
        return (self.attn_readers.linears, (self.o_proj,), self.mlp_readers.linears, (self.down_proj,))

    def role(self, name: str) -> str:
        if name == self.o_proj:
            return "o_proj"
        if name == self.down_proj:
            return "down_proj"
        return "reader"

    def check(self, model: nn.Module) -> None:
        """Fail early, with the reason, when a model does not look like this family."""
        act = getattr(self.config, "hidden_act", "silu")
        if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
            raise NotImplementedError(f"{type(self).__name__}: unsupported hidden_act {act!r}")
        layer = self.layers(model)[0]
        for group in self.reader_groups:
            norm = get_submodule(layer, group.norm)
            if getattr(norm, "bias", None) is not None:
                raise NotImplementedError("LayerNorm with bias is not supported (RMSNorm models only)")
        for name in self.all_linears:
            if not isinstance(get_submodule(layer, name), nn.Linear):
                raise NotImplementedError(f"expected {name} to be nn.Linear")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
