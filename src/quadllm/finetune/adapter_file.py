"""Adapter files: only the tensors a fine-tune trained, tied to the exact base checkpoint.

An adapter is one ``.safetensors`` file holding the trained tensors under their model names
(outlier columns ``*.w_outlier`` and weight ``*.scales`` in FP16, as the checkpoint stores them,
or LoRA's ``*.lora_A.*`` / ``*.lora_B.*``) and, in its metadata, the SHA-256 of the base
checkpoint's weights file, the base's path when it was trained, the LoRA shape (if any) and the
fine-tuning record. Applying it to any other base is an error, never a silent mismatch.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from ..errors import QuadllmError
from ..io.checkpoint import file_hash, weights_hash, write_tensors
from ..io.files import atomic_write
from .lora import has_lora, inject_lora

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "quadllm-adapter"
ADAPTER_VERSION = 1

__all__ = ["AdapterError", "save_adapter", "read_adapter_meta", "apply_adapter", "is_adapter_file"]


class AdapterError(QuadllmError, ValueError):
    """An adapter that cannot be written, read or applied, with the reason."""


def _storage(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if name.endswith(".w_outlier") or name.endswith(".scales"):
        t = t.to(torch.float16)
    return t.contiguous()


def save_adapter(model: nn.Module, names: list[str], path: str | Path, base_dir: str | Path,
                 lora: dict[str, Any] | None, record: dict[str, Any]) -> Path:
    """Write the tensors ``names`` of ``model`` to ``path`` (atomically)."""
    path = Path(path).expanduser().resolve()
    if path.suffix != ".safetensors":
        raise AdapterError(f"an adapter file must end in .safetensors, got {path.name}")
    if path.is_dir():
        raise AdapterError(f"{path} is a directory; pass a file name ending in .safetensors")
    if path.exists() and not is_adapter_file(path):
        raise AdapterError(f"{path} exists and is not a quadllm adapter; refusing to overwrite it")
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    missing = [n for n in names if n not in tensors]
    if missing:
        raise AdapterError(f"the model has no tensors {missing[:3]}")
    state = {n: _storage(n, tensors[n]) for n in names}
    base_dir = Path(base_dir).expanduser().resolve()
    meta = {"format": ADAPTER_FORMAT, "format_version": str(ADAPTER_VERSION),
            "base_hash": weights_hash(base_dir), "base_path": str(base_dir),
            "lora": json.dumps(lora) if lora else "", "finetune": json.dumps(record, default=str)}
    meta["content_hash"] = content_hash(state, meta)
    atomic_write(path, writer=lambda tmp: write_tensors(state, Path(tmp), meta))
    log.info("saved adapter %s (%d tensors, %.2f MB) for base %s", path, len(state), path.stat().st_size / 1e6,
             base_dir)
    return path


def content_hash(state: dict[str, torch.Tensor], meta: dict[str, str]) -> str:
    """SHA-256 of an adapter's tensors (name, dtype, shape, bytes, in name order) and of the
    metadata that says how to apply them: recorded in the file, so any damage is caught."""
    h = hashlib.sha256()
    h.update(json.dumps({k: meta.get(k) for k in ("base_hash", "lora", "finetune")}, sort_keys=True).encode())
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def is_adapter_file(path: str | Path) -> bool:
    try:
        return read_adapter_meta(path).get("format") == ADAPTER_FORMAT
    except AdapterError:
        return False


def read_adapter_meta(path: str | Path) -> dict[str, Any]:
    """The adapter's metadata, with ``lora`` and ``finetune`` decoded."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise AdapterError(f"adapter file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{p} is corrupt or not a safetensors file: {exc}") from exc
    if meta.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{p} is not a quadllm adapter (create one with `quadllm finetune --adapter-only`)")
    if meta.get("format_version") != str(ADAPTER_VERSION):
        raise AdapterError(f"{p} has adapter format version {meta.get('format_version')}; this quadllm reads "
                           f"version {ADAPTER_VERSION}")
    for key in ("base_hash", "base_path"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise AdapterError(f"{p} is damaged: its metadata has no {key}")
    meta["raw_metadata"] = dict(meta)
    try:
        meta["lora"] = json.loads(meta["lora"]) if meta.get("lora") else None
        meta["finetune"] = json.loads(meta.get("finetune") or "{}")
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{p}: corrupt metadata ({exc})") from exc
    return meta


def apply_adapter(model: nn.Module, path: str | Path, base_dir: str | Path) -> dict[str, Any]:
    """Load adapter ``path`` into ``model`` (loaded from ``base_dir``) in place; returns its metadata."""
    meta = read_adapter_meta(path)
    actual = weights_hash(base_dir)
    if meta["base_hash"] != actual and meta["base_hash"] != file_hash(base_dir):  # file_hash: see its docstring
        raise AdapterError(
            f"adapter {path} was trained on a different base checkpoint ({meta.get('base_path')}, weights "
            f"sha256 {meta['base_hash'][:12]}...) than {base_dir} (sha256 {actual[:12]}...); load it on its own base")
    try:
        state = load_file(str(Path(path).expanduser()))
    except Exception as exc:  # safetensors raises its own error types
        raise AdapterError(f"adapter {path} is damaged: its tensors do not read ({exc})") from exc
    if "content_hash" in meta and content_hash(state, meta["raw_metadata"]) != meta["content_hash"]:
        raise AdapterError(f"adapter {path} is damaged: its tensors or settings differ from those it was written with")
    if meta["lora"]:
        if has_lora(model):
            raise AdapterError("the base model already carries LoRA adapters")
        inject_lora(model, meta["lora"])
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name, t in state.items():
            if name not in tensors:
                raise AdapterError(f"adapter {path} holds {name}, which the base model does not have")
            dst = tensors[name]
            if dst.shape != t.shape:
                raise AdapterError(f"adapter tensor {name} has shape {tuple(t.shape)}, the model {tuple(dst.shape)}")
            dst.copy_(t.to(dst.dtype))
    for p in model.parameters():
        p.requires_grad_(False)
    info = getattr(model, "quadllm_info", None)
    if info is not None:
        info["finetune"] = meta["finetune"]
        if meta["lora"]:
            info["structure"] = dict(info["structure"], lora=meta["lora"])
    log.info("applied adapter %s (%d tensors)", path, len(state))
    return {"path": str(Path(path).expanduser().resolve()), "base_hash": meta["base_hash"],
            "lora": meta["lora"], "finetune": meta["finetune"]}
