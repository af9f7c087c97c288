"""Loading a quadllm checkpoint: the recipe's skeleton of empty quantized modules, then the tensors.

The result runs on the ``fake`` backend on the CPU; :func:`quadllm.backends.place` then puts it
on another backend (device and kernels).
"""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..arch import get_adapter
from ..config import RECORDED_BEFORE_KEYS, ConfigError, QuantConfig
from ..errors import QuadllmError
from ..finetune.adapter_file import apply_adapter
from ..finetune.lora import inject_lora
from ..io.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    CheckpointError,
    read_meta,
    read_state,
    verify_files,
)
from ..io.stock_layout import is_stock_config, mark_tables, marker_keys, original_config, stock_skeleton
from ..nn.modules import QuadLinear, use_quad_attention
from .recipe import LayerRecipe, structure_of

__all__ = ["build_skeleton", "finish_loading", "load"]

#: structure keys checkpoints made before them lack, with the value those checkpoints have (the
#: structure records these configuration keys as they were)
STRUCTURE_BEFORE_KEYS = {**{k: RECORDED_BEFORE_KEYS[k] for k in ("down_rank", "o_rank")}, "learned_transform": False}


def build_skeleton(model: nn.Module, config: QuantConfig, structure: dict, dtype: torch.dtype) -> None:
    """Replace the modules of an (empty-weight) transformers model by the empty quantized modules
    :class:`LayerRecipe` produces for ``config``, ready for ``load_state_dict``. ``structure`` is
    the checkpoint's record of its shapes; one that disagrees with ``config`` is refused.

    A model in the stock layout (:mod:`quadllm.io.stock_layout`) keeps its own norms, embedding
    and head: only the decoder linears (and KV quantizers) are quadllm's."""
    stock = is_stock_config(model.config)
    adapter = get_adapter(original_config(model.config) if stock else model)
    recipe = LayerRecipe(config, adapter)
    expected = structure_of(config, adapter)
    # keys newer than a checkpoint: what it was made with then
    recorded = {**STRUCTURE_BEFORE_KEYS, **structure}
    wrong = {k: (recorded.get(k), v) for k, v in expected.items() if k != "tied_head" and recorded.get(k) != v}
    if wrong:
        raise CheckpointError("the checkpoint's structure disagrees with its configuration: " + ", ".join(
            f"{k} is {got!r}, the configuration gives {want!r}" for k, (got, want) in sorted(wrong.items())))
    pad = int(model.config.hidden_size) - int(structure["expanded_hidden_size"]) if stock else 0
    for index, layer in enumerate(adapter.layers(model)):
        recipe.skeleton(layer, index, dtype, norms=not stock, pad=pad)
    if stock:
        mark_tables(adapter.embedding(model), adapter.head(model))
    else:
        recipe.skeleton_ends(model, dtype, tied=bool(structure["tied_head"]))
    if structure.get("lora"):
        inject_lora(model, structure["lora"])


def finish_loading(model: nn.Module, info: dict, where: str) -> None:
    """What every loader of a quadllm checkpoint does once the tensors are in place (``quadllm.load``,
    and transformers' ``from_pretrained`` through :mod:`quadllm.integrations.hf`): refuse a tensor
    left on the meta device (it was not in the checkpoint), let each quantized linear adopt its
    loaded state, freeze the parameters, route attention through quadllm's (KV quantization), record
    ``info`` as ``model.quadllm_info``, evaluation mode."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.device.type == "meta":
            raise CheckpointError(f"{where}: tensor {name} was not in the checkpoint")
    for m in model.modules():
        if isinstance(m, QuadLinear):
            m.adopt_loaded_state()
    for t in model.parameters():
        t.requires_grad_(False)
    use_quad_attention(model)
    model.quadllm_info = info
    model.eval()


def load(path: str | Path, dtype: torch.dtype = torch.float32, adapter: str | Path | None = None,
         verify: bool | None = None):
    """Load a quadllm checkpoint: ``(model, tokenizer, meta)``; the model is ready to run on the
    ``fake`` backend (:func:`quadllm.backends.place` moves it to another).

    ``adapter``: a fine-tuning adapter file (``quadllm finetune --adapter-only``) to apply; it
    must have been trained on exactly this checkpoint (checked by hash; the base's files are then
    always hashed).
    ``verify``: check the weight files' SHA-256 against the record written with them (True),
    only their sizes and headers (False), or the hashes when the files are small enough
    (None: :data:`quadllm.io.checkpoint.FULL_VERIFY_BYTES`)."""
    p = Path(path).expanduser()
    meta = read_meta(p)
    full = True if adapter is not None else verify  # an adapter trusts its base: hash it
    meta = dict(meta, verified=verify_files(p, meta, full))
    try:
        config = QuantConfig.from_dict(meta["quant_config"])
    except ConfigError as exc:
        raise CheckpointError(f"{p}: its quantization configuration is damaged ({exc})") from exc
    model = _empty_model(p, meta)
    try:
        build_skeleton(model, config, meta["structure"], dtype)
    except QuadllmError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"{p}: its configuration and structure do not describe a model ({exc})") from exc
    state = read_state(p, dtype)
    for key in marker_keys(model):  # the stock layout's markers (nothing to load)
        state.pop(key, None)
    weights = p / (WEIGHTS_FILE if (p / WEIGHTS_FILE).is_file() else WEIGHTS_INDEX)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its configuration: {exc}") from exc
    finish_loading(model, {k: meta[k] for k in ("quant_config", "structure", "timings", "finetune") if k in meta},
                   str(p))
    if adapter is not None:
        meta = dict(meta, adapter=apply_adapter(model, adapter, p))
    try:
        tok = AutoTokenizer.from_pretrained(p)
    except Exception as exc:  # transformers raises many types for missing or damaged tokenizer files
        raise CheckpointError(f"{p}: the tokenizer files are missing or damaged ({str(exc).splitlines()[0]})") from exc
    return model, tok, meta


def _empty_model(p: Path, meta: dict) -> nn.Module:
    """The transformers model ``config.json`` describes, without weights."""
    try:
        hf_config = AutoConfig.from_pretrained(p)
    except Exception as exc:  # OSError, ValueError, KeyError, JSON errors...: all mean a damaged config.json
        raise CheckpointError(f"{p}/config.json is missing or damaged ({str(exc).splitlines()[0]})") from exc
    if hf_config.model_type != meta.get("model_type", hf_config.model_type):
        raise CheckpointError(f"{p}: config.json says {hf_config.model_type!r}, quadllm_config.json "
                              f"{meta.get('model_type')!r}")
    stock = is_stock_config(hf_config)
    if stock != (meta["format_version"] >= 2):
        raise CheckpointError(f"{p}: config.json {'is' if stock else 'is not'} in the stock layout, but "
                              f"{CONFIG_FILE} has format version {meta['format_version']}")
    get_adapter(original_config(hf_config) if stock else hf_config)
    try:
        if stock:
            return stock_skeleton(hf_config)
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as exc:  # values that build no model
        raise CheckpointError(f"{p}/config.json describes no model ({str(exc).splitlines()[0]})") from exc
