"""Rewriting a checkpoint of format 1 (quadllm's own modules) in the stock layout of format 2
(:mod:`quadllm.io.stock_layout`), which transformers, lm-eval and vLLM load."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ..io.checkpoint import CheckpointError, check_output_dir, read_meta, save
from ..io.stock_layout import to_stock_modules
from ..io.storage import round_to_storage
from .loading import load

log = logging.getLogger(__name__)

__all__ = ["convert"]


def convert(old: str | Path, new: str | Path) -> dict[str, Any]:
    """Write the checkpoint ``old`` (format 1, intact: every file hashed) to ``new`` in the stock
    layout; ``old`` is left as it was. Returns what was written. Refused before any work: ``old``
    already in the stock layout, ``new`` the same directory, or a ``new`` that holds something
    other than a checkpoint."""
    src, dst = Path(old).expanduser().resolve(), Path(new).expanduser().resolve()
    meta = read_meta(src)
    if meta["format_version"] >= 2:
        raise CheckpointError(f"{src} is already in the stock layout (format version {meta['format_version']})")
    if src == dst:
        raise CheckpointError("the converted checkpoint needs a directory of its own (OLD and NEW are the same)")
    check_output_dir(dst)
    model, tok, meta = load(src, dtype=torch.float32, verify=True)
    if meta.get("adapter") is not None or (meta["structure"].get("lora")):
        raise CheckpointError(f"{src} holds LoRA adapters, which the stock layout has no place for; it keeps "
                              "loading with quadllm.load as it is")
    to_stock_modules(model, {k: meta[k] for k in ("quant_config", "structure")})
    round_to_storage(model)
    extra = {"converted_from": {"path": str(src), "format_version": meta["format_version"],
                               "created": meta.get("created"), "library_version": meta.get("library_version")}}
    out = save(model, tok, dst, original=meta.get("original_model"), extra=extra)
    log.info("converted %s -> %s (stock layout, hidden size %d)", src, out, model.config.hidden_size)
    return {"checkpoint": str(out), "hidden_size": int(model.config.hidden_size),
            "from": str(src), "format_version": 2}
