"""The checkpoint as a stock architecture: a QUAD model written as the plain Llama / Qwen2 / ... of
hidden size ``d + r`` that it is, so that transformers, lm-eval and vLLM build it with their own
model classes and only the decoder linears need quadllm.

QUAD's expanded model differs from a stock one of width ``d + r`` in three places, each rewritten
exactly here:

- **RMSNorm** divides by the original ``d``: ``x / sqrt(|x|²/d + eps)``. A stock RMSNorm over
  ``d + r`` coordinates with ``eps' = eps·d/(d+r)`` and every gain ``sqrt(d/(d+r))`` computes
  ``sqrt(d/(d+r)) · x / sqrt((d/(d+r))·(|x|²/d + eps))``, the same thing
  (:func:`expanded_norm`; the gains themselves are already fused into the next linears).
- **The embedding** looks up a ``V x d`` table and maps it into the expanded basis; the stock
  table is their ``V x (d+r)`` product.
- **The head** maps back to ``d`` (with the final norm's gain) before the original head or the
  tied table; the stock head is their ``V x (d+r)`` product, untied, since the final gain and the
  basis make it differ from the embedding.

The decoder linears stay :class:`~quadllm.nn.modules.QuadLinear` (packed INT4 codes, scales,
full-precision outlier columns, online transform, per-token activation quantization), with their
own tensor names. Each also gets a zero-size ``weight`` marker in the file: a loader that knows
nothing of quadllm stops on it (a size mismatch against the stock ``[out, in]`` weight) instead of
initializing the linears at random, which is what transformers does with a quantization method it
does not know.

**Padding.** transformers' ``LlamaConfig`` refuses a hidden size that is not a multiple of the
head count (SmolLM2: 576 + 64 = 640 over 9 heads), so the stream is widened by
``p = -(d + r) mod heads`` coordinates that stay exactly zero (:func:`padding`): they sit after the
``r`` outlier coordinates, in the readers' full-precision columns (zero weights), in zero rows of
the writers and zero columns of the tables; a zero coordinate adds nothing to the norm's sum, and
the norm's epsilon and gains are those of the padded width.

The fused tables are stored in FP16, as the tables were (the product rounded once;
:func:`to_stock_modules` rounds the model in memory the same way). The layout is exact in exact
arithmetic, not bit for bit: the stock norms and the fused tables round differently in float, and
per-token INT4 activation rounding turns such differences into other rounding decisions, so a
converted W4A4 model is an equally accurate neighbour of the original rather than a copy
(``scripts/stock_layout_check.py``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from ..arch import ArchAdapter, get_adapter, get_submodule, set_submodule
from ..nn.modules import QuadEmbedding, QuadHead, QuadLinear, QuadRMSNorm
from .storage import STORAGE_DTYPE_ATTR

__all__ = ["MARKER", "QUANT_METHOD", "SHIM_FILE", "auto_map", "expanded_norm", "insert_zeros", "is_stock_config", "mark_tables",
           "marker_keys", "original_config", "pad_layers", "padding", "shim_source", "stock_config", "stock_skeleton",
           "to_stock_modules"]

#: ``quant_method`` of the ``quantization_config`` in a stock checkpoint's ``config.json``
QUANT_METHOD = "quadllm"
#: the name of every quantized linear's zero-size marker tensor (see the module's docstring)
MARKER = "weight"
#: the module the ``auto_map`` of a stock checkpoint names, for ``trust_remote_code=True`` without
#: an explicit ``import quadllm``
SHIM_FILE = "modeling_quadllm.py"


def padding(wide: int, num_heads: int) -> int:
    """How many zero coordinates make ``wide`` a multiple of ``num_heads``."""
    return -wide % num_heads


def expanded_norm(d: int, wide: int, eps: float) -> tuple[float, float]:
    """``(eps', gain)`` of the stock RMSNorm over ``wide`` coordinates that equals
    ``x / sqrt(|x|²/d + eps)``: ``eps' = eps·d/wide`` and every gain ``sqrt(d/wide)``."""
    if not 0 < d <= wide:
        raise ValueError(f"the original width {d} must be positive and at most the expanded width {wide}")
    return eps * d / wide, math.sqrt(d / wide)


def stock_config(hf_config: PretrainedConfig, quadllm: dict[str, Any]) -> PretrainedConfig:
    """The stock configuration of the expanded model: ``hidden_size = d + r + p`` (:func:`padding`), an explicit
    ``head_dim``, the rewritten norm epsilon, an untied head, and ``quantization_config`` carrying
    ``quadllm`` (the quantization configuration and structure the linears need) with the original
    width, epsilon and tying."""
    adapter = get_adapter(hf_config)
    d = adapter.hidden_size
    wide = int(quadllm["structure"]["expanded_hidden_size"])
    wide += padding(wide, adapter.num_heads)
    eps = float(getattr(hf_config, adapter.norm_eps_key))
    cfg = copy.deepcopy(hf_config)
    cfg.head_dim = adapter.head_dim
    cfg.hidden_size = wide
    setattr(cfg, adapter.norm_eps_key, expanded_norm(d, wide, eps)[0])
    cfg.tie_word_embeddings = False
    if hasattr(cfg, "quadllm_tied_head"):
        delattr(cfg, "quadllm_tied_head")
    cfg.quantization_config = {"quant_method": QUANT_METHOD, **quadllm,
                               "original": {"hidden_size": d, adapter.norm_eps_key: eps,
                                            "tie_word_embeddings": adapter.tied}}
    return cfg


def shim_source(hf_config: PretrainedConfig) -> str:
    """The checkpoint's ``auto_map`` module: importing quadllm registers its quantization method with
    transformers; the classes are transformers' own (``architectures[0]`` and the configuration's)."""
    model_class = (hf_config.architectures or [None])[0]
    if not model_class:
        raise ValueError("the configuration names no architecture")
    config_class = type(hf_config).__name__
    # subclasses of the same names: transformers copies this file (not its own) when the model is
    # saved again, and ``architectures`` keeps naming the stock class that vLLM serves. The
    # configuration is mapped too because some loaders (lm-eval's HFLM) parse quantization_config
    # right after loading the configuration, before any model class is imported.
    return (f'"""A quadllm checkpoint: transformers\' own {model_class}, once quadllm (pip install quadllm) has '
            'registered its quantization method."""\n\n'
            'import quadllm  # noqa: F401  (registers quant_method "quadllm" with transformers)\n'
            "import transformers\n\n\n"
            f"class {config_class}(transformers.{config_class}):\n"
            f'    """transformers.{config_class}, read after quadllm is imported."""\n\n\n'
            f"class {model_class}(transformers.{model_class}):\n"
            f'    """transformers.{model_class}; its linears are quadllm\'s (swapped in by the quantizer)."""\n')


def auto_map(hf_config: PretrainedConfig) -> dict[str, str]:
    """``config.json``'s ``auto_map``: the configuration and the model class of :func:`shim_source`."""
    module = SHIM_FILE.removesuffix(".py")
    return {"AutoConfig": f"{module}.{type(hf_config).__name__}",
            "AutoModelForCausalLM": f"{module}.{hf_config.architectures[0]}"}


def is_stock_config(hf_config: PretrainedConfig) -> bool:
    """Whether ``config.json`` describes a quadllm checkpoint in the stock layout."""
    q = _quantization(hf_config)
    return q is not None and q.get("quant_method") == QUANT_METHOD


def _quantization(hf_config: PretrainedConfig) -> dict[str, Any] | None:
    """``quantization_config`` as a dict (transformers holds it as an object once a method is registered)."""
    q = getattr(hf_config, "quantization_config", None)
    q = q.to_dict() if hasattr(q, "to_dict") else q
    return q if isinstance(q, dict) else None


def original_config(hf_config: PretrainedConfig) -> PretrainedConfig:
    """The original model's configuration (width, norm epsilon, tying) from a stock one, without
    its ``quantization_config``: what the architecture adapter and the recipe work with."""
    original = _quantization(hf_config)["original"]
    cfg = copy.deepcopy(hf_config)
    for key, value in original.items():
        setattr(cfg, key, value)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    return cfg


def stock_skeleton(hf_config: PretrainedConfig) -> nn.Module:
    """The stock transformers model a stock configuration describes, with empty weights (its
    decoder linears still ``nn.Linear``; the caller replaces them)."""
    cfg = copy.deepcopy(hf_config)
    quantization = getattr(cfg, "quantization_config", None)
    if quantization is not None:
        delattr(cfg, "quantization_config")  # the linears are quadllm's to build, not a quantizer's
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg)
    if quantization is not None:
        model.config.quantization_config = quantization
    return model


def mark_tables(embedding: nn.Module, head: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """Store the fused tables (and the head's bias) in ``dtype``."""
    for m in (embedding, head):
        setattr(m, STORAGE_DTYPE_ATTR, dtype)


def marker_keys(model: nn.Module) -> list[str]:
    """The state-dict keys of every quantized linear's marker."""
    return [f"{name}.{MARKER}" for name, m in model.named_modules() if isinstance(m, QuadLinear) and m.quantized]


@torch.no_grad()
def to_stock_modules(model: nn.Module, quadllm: dict[str, Any], table_dtype: torch.dtype = torch.float16) -> None:
    """Rewrite a quantized model in place as the stock architecture of :func:`stock_config`: its
    QUAD norms become the stock norm class with :func:`expanded_norm`'s epsilon and gains, its
    embedding and head the fused ``V x (d+r)`` tables (rounded to ``table_dtype``, as stored), and
    ``model.config`` the stock configuration. Decoder linears and KV quantizers stay as they are."""
    original = model.config
    adapter: ArchAdapter = get_adapter(original)
    cfg = stock_config(original, quadllm)
    stock = stock_skeleton(cfg)
    stock_adapter = get_adapter(stock.config)
    d, wide = adapter.hidden_size, cfg.hidden_size
    r = int(quadllm["structure"]["rank"])
    pad = wide - int(quadllm["structure"]["expanded_hidden_size"])
    gain = expanded_norm(d, wide, float(getattr(original, adapter.norm_eps_key)))[1]
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    if pad:
        pad_layers(model, adapter, r, pad)

    def stock_norm(quad_norm: nn.Module, template: nn.Module) -> nn.Module:
        if not isinstance(quad_norm, QuadRMSNorm):
            raise TypeError(f"expected a QuadRMSNorm, found {type(quad_norm).__name__}")
        template.weight = nn.Parameter(torch.full((wide,), gain, dtype=dtype), requires_grad=False)
        return template

    for layer, template in zip(adapter.layers(model), stock_adapter.layers(stock)):
        for group in adapter.reader_groups:
            set_submodule(layer, group.norm, stock_norm(get_submodule(layer, group.norm),
                                                        get_submodule(template, group.norm)))
    adapter.set_final_norm(model, stock_norm(adapter.final_norm(model), stock_adapter.final_norm(stock)))

    emb: QuadEmbedding = adapter.embedding(model)
    table = emb.weight.detach().to(dtype)
    if emb.proj is not None:
        table = F.linear(table, emb.proj.detach().to(dtype))
    new_emb = stock_adapter.embedding(stock)
    table = insert_zeros(table, 1, r, pad)
    new_emb.weight = nn.Parameter(table.to(table_dtype).to(dtype), requires_grad=False)
    head: QuadHead = adapter.head(model)
    w = head.table().detach().to(dtype)
    if head.proj is not None:
        w = w @ head.proj.detach().to(dtype)
    new_head = stock_adapter.head(stock)
    w = insert_zeros(w, 1, r, pad)
    new_head.weight = nn.Parameter(w.to(table_dtype).to(dtype), requires_grad=False)
    if head.bias is not None:
        new_head.bias = nn.Parameter(head.bias.detach().to(table_dtype).to(dtype), requires_grad=False)
    elif getattr(new_head, "bias", None) is not None:
        new_head.bias = None
    mark_tables(new_emb, new_head, table_dtype)
    adapter.set_embedding(model, new_emb)
    adapter.set_head(model, new_head)
    cfg.architectures = list(original.architectures or [type(model).__name__])
    cfg.auto_map = auto_map(cfg)
    model.config = cfg
    for m in model.modules():  # the decoder layers keep the configuration they were built with
        if getattr(m, "config", None) is original:
            m.config = cfg


def insert_zeros(t: torch.Tensor, dim: int, at: int, n: int, value: float = 0.0) -> torch.Tensor:
    """``t`` with ``n`` slices of ``value`` inserted before index ``at`` of ``dim``."""
    if not n:
        return t
    shape = list(t.shape)
    shape[dim] = n
    head, tail = t.narrow(dim, 0, at), t.narrow(dim, at, t.shape[dim] - at)
    return torch.cat([head, torch.full(shape, value, dtype=t.dtype, device=t.device), tail], dim=dim)


@torch.no_grad()
def pad_layers(model: nn.Module, adapter: ArchAdapter, rank: int, pad: int) -> None:
    """Widen every decoder layer's residual side by ``pad`` zero coordinates after the ``rank``
    outlier coordinates (:func:`padding`): the readers get ``pad`` more full-precision input
    columns of zero weight, the writers ``pad`` more output rows of zero (codes 0, scale 1, zero
    outlier weights and bias)."""
    for layer in adapter.layers(model):
        for group in adapter.reader_groups:
            for name in group.linears:
                lin: QuadLinear = get_submodule(layer, name)
                if lin.quantized:
                    lin.w_outlier = nn.Parameter(insert_zeros(lin.w_outlier.detach(), 1, rank, pad),
                                                 requires_grad=False)
                else:  # a linear an override keeps in full precision
                    lin.weight = nn.Parameter(insert_zeros(lin.weight.detach(), 1, rank, pad), requires_grad=False)
                lin.in_features += pad
                lin.rank += pad
                if lin.transform is not None:  # a learned transform of the quantized columns only
                    lin.transform.keep += pad
        for name in adapter.writers:
            lin = get_submodule(layer, name)
            if lin.quantized:
                lin.qweight = insert_zeros(lin.qweight, 0, rank, pad)
                lin.scales = insert_zeros(lin.scales, 0, rank, pad, 1.0)
                lin.w_outlier = nn.Parameter(insert_zeros(lin.w_outlier.detach(), 0, rank, pad), requires_grad=False)
            else:
                lin.weight = nn.Parameter(insert_zeros(lin.weight.detach(), 0, rank, pad), requires_grad=False)
            if lin.bias is not None:
                lin.bias = nn.Parameter(insert_zeros(lin.bias.detach(), 0, rank, pad), requires_grad=False)
            lin.out_features += pad
            lin.drop_dequantized()
