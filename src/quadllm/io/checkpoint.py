"""quadllm checkpoints: a directory with packed INT4 weights and everything to rebuild the model.

Layout of ``DIR``:

- ``model.safetensors`` (or, from streaming quantization, one shard per decoder layer plus
  ``model.safetensors.index.json`` in the Hugging Face layout): packed INT4 codes (``qweight``, uint8, two per byte), FP16 scales,
  FP16 outlier columns ``w_outlier`` and biases, the FP16 embedding (once, also for tied heads)
  and head, the FP32 maps into and out of the expanded basis, the online transforms' factors.
- ``quadllm_config.json``: the format version, the :class:`~quadllm.config.QuantConfig`, the
  structure, the original model, calibration facts, timings, sizes, library versions.
- ``config.json`` (the original transformers config) and the tokenizer files.

Writing is atomic: everything goes to a temporary sibling directory that is renamed into place
at the end; an existing checkpoint is replaced only after the new one is complete, and a
directory that is not a quadllm checkpoint is never overwritten.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import QuadllmError
from ..version import __version__
from . import files
from .stock_layout import SHIM_FILE, is_stock_config, marker_keys, shim_source
from .storage import storage_state_dict, tensor_bytes

log = logging.getLogger(__name__)

FORMAT = "quadllm"
#: 1: quadllm's own modules (``config.json`` the original model's); 2: the stock layout
#: (:mod:`quadllm.io.stock_layout`: ``config.json`` the expanded stock model's)
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_FILE = "quadllm_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded checkpoints (streaming quantization)


class CheckpointError(QuadllmError, ValueError):
    """A checkpoint that cannot be written or read, with the reason."""


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def check_output_dir(out_dir: str | Path) -> Path:
    """The resolved output path; refuses a path that holds something other than a checkpoint."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not (out.is_dir() and (is_checkpoint(out) or not any(out.iterdir()))):
        raise CheckpointError(f"{out} exists and is not a quadllm checkpoint; refusing to overwrite it")
    return out


@contextlib.contextmanager
def atomic_checkpoint_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir`` that replaces it on success
    (:func:`quadllm.io.files.atomic_dir`); refuses an ``out_dir`` that holds something other
    than a checkpoint before anything is written."""
    with files.atomic_dir(check_output_dir(out_dir)) as tmp:
        yield tmp


def write_tensors(state: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """One safetensors file (of a checkpoint, unless ``metadata`` says otherwise)."""
    try:
        save_file(state, str(path), metadata=metadata or {"format": "pt", "quadllm": "1"})
    except SafetensorError as exc:  # safetensors reports I/O failures (a full disk) as its own error
        raise OSError(str(exc).removeprefix("Error while serializing: ")) from exc


def write_index(tmp: Path, weight_map: dict[str, str]) -> int:
    """The Hugging Face index of a sharded checkpoint; returns the shards' total size in bytes."""
    total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
    (tmp / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total, "format": "quadllm"},
                                                "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    return total


def write_metadata(tmp: Path, hf_config, tokenizer, info: dict[str, Any], original: Any,
                   sizes: dict[str, Any], extra: dict[str, Any] | None = None,
                   extra_files: dict[str, bytes] | None = None) -> None:
    """Everything of a checkpoint but its tensors: ``config.json``, the tokenizer, extra files
    and ``quadllm_config.json`` (written last, fsynced)."""
    hf = hf_config.to_dict()
    hf.pop("_attn_implementation_internal", None)
    if is_stock_config(hf_config):  # what transformers and vLLM read: the same settings and shapes as ours
        hf["quantization_config"] = {**hf["quantization_config"],
                                     **{k: info[k] for k in ("quant_config", "structure") if k in info}}
    with open(tmp / "config.json", "w") as f:
        json.dump(hf, f, indent=2, default=str)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if is_stock_config(hf_config):
        (tmp / SHIM_FILE).write_text(shim_source(hf_config))
    for name, data in (extra_files or {}).items():
        if Path(name).name != name or name in (WEIGHTS_FILE, WEIGHTS_INDEX, CONFIG_FILE, "config.json", SHIM_FILE):
            raise CheckpointError(f"invalid extra file name {name!r}")
        (tmp / name).write_bytes(data)
    if hasattr(original, "to_dict"):
        original = original.to_dict()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if is_stock_config(hf_config) else 1,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_type": hf_config.model_type,
        "original_model": original,
        **{k: v for k, v in info.items() if k != "library_version"},
        "sizes": sizes,
        "files": file_record(tmp),
        **(extra or {}),
    }
    meta["integrity"] = settings_hash(meta)
    with open(tmp / CONFIG_FILE, "w") as f:
        json.dump(meta, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def save(model: nn.Module, tokenizer, out_dir: str | Path, original: Any = None,
         extra: dict[str, Any] | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` (quantized by :func:`quadllm.quantize`) to ``out_dir`` atomically.

    ``extra`` goes into ``quadllm_config.json``; ``extra_files`` (name -> bytes) are written
    into the directory too (a fine-tune's loss curve, for example)."""
    info = getattr(model, "quadllm_info", None)
    if info is None:
        raise CheckpointError("this model has not been quantized by quadllm (no quadllm_info)")
    with atomic_checkpoint_dir(out_dir) as tmp:
        write_tensors(stored_state_dict(model), tmp / WEIGHTS_FILE)
        sizes = {"weights_file_bytes": (tmp / WEIGHTS_FILE).stat().st_size, "tensor_bytes": tensor_bytes(model)}
        write_metadata(tmp, model.config, tokenizer, info, original, sizes, extra, extra_files)
    out = check_output_dir(out_dir)
    log.info("saved %s (%.1f MB)", out, dir_size(out) / 1e6)
    return out


def stored_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors as stored, with the stock layout's markers when ``model`` is in it."""
    state = storage_state_dict(model)
    if is_stock_config(model.config):
        state.update({key: torch.zeros(0, dtype=torch.uint8) for key in marker_keys(model)})
    return state


def dir_size(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_dir() or not (p / CONFIG_FILE).is_file():
        raise CheckpointError(f"{p} is not a quadllm checkpoint (no {CONFIG_FILE}); "
                              "create one with `quadllm quantize --out DIR`")
    try:
        meta = json.loads((p / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{p / CONFIG_FILE} is corrupt: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{p / CONFIG_FILE} is not a quadllm configuration")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CheckpointError(f"{p} has format version {meta.get('format_version')}; this quadllm "
                              f"({__version__}) reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    for key in ("quant_config", "structure"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{p / CONFIG_FILE} is damaged: {key!r} is missing or not an object")
    if "integrity" in meta and meta["integrity"] != settings_hash(meta):
        raise CheckpointError(f"{p / CONFIG_FILE} is damaged: its quantization settings differ from those recorded "
                              "when it was written")
    return meta


def settings_hash(meta: dict[str, Any]) -> str:
    """SHA-256 of what decides the model's numbers in ``quadllm_config.json`` (the configuration and
    the structure), recorded beside them so an edit is caught."""
    text = json.dumps({k: meta.get(k) for k in ("quant_config", "structure")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_hash(path: str | Path) -> str:
    """SHA-256 of a checkpoint's tensors (name, dtype, shape and bytes of each, in name order):
    identifies the exact base an adapter belongs to.

    The header's metadata and key order do not count: safetensors writes them in a different
    order from one run to the next, so two saves of the same tensors have the same hash, though
    not always the same file bytes."""
    h = hashlib.sha256()
    try:
        handles = {f: safe_open(str(f), framework="pt") for f in weight_files(path)}
        for key, f in sorted((k, f) for f, handle in handles.items() for k in handle.keys()):
            part = handles[f].get_slice(key)
            h.update(json.dumps([key, part.get_dtype(), part.get_shape()]).encode())
            h.update(handles[f].get_tensor(key).reshape(-1).view(torch.uint8).numpy().tobytes())
    except CheckpointError:
        raise
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: the weights are corrupt or unreadable: {exc}") from exc
    return h.hexdigest()


def file_hash(path: str | Path) -> str:
    """SHA-256 of a checkpoint's weight files as bytes (depends on the header's key order, which
    safetensors does not keep stable: :func:`weights_hash` identifies tensors; adapters written
    by quadllm 0.1.0 before that function existed record this one)."""
    h = hashlib.sha256()
    for f in weight_files(path):
        files.sha256_file(f, h)
    return h.hexdigest()


def weight_files(path: str | Path) -> list[Path]:
    """The tensor files of a checkpoint: ``model.safetensors``, or the shards its index lists."""
    p = Path(path)
    if (p / WEIGHTS_FILE).is_file():
        return [p / WEIGHTS_FILE]
    index = p / WEIGHTS_INDEX
    if not index.is_file():
        raise CheckpointError(f"{p} has no {WEIGHTS_FILE} (nor {WEIGHTS_INDEX}): the checkpoint is incomplete")
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
        raise CheckpointError(f"{index} is corrupt: {exc}") from exc
    if any(not isinstance(n, str) or Path(n).name != n for n in names):
        raise CheckpointError(f"{index} names files outside the checkpoint directory")
    files = [p / n for n in names]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{p} is incomplete: missing {', '.join(missing)}")
    return files


#: ``load`` hashes every weight file when the checkpoint is at most this large (about 0.2 s per
#: 100 MB at SHA-256's speed on this CPU), else only checks sizes and headers unless asked
FULL_VERIFY_BYTES = 512 * 10**6


def _recorded_files(path: Path) -> list[Path]:
    """The files the integrity record covers: every weight file and ``config.json``."""
    return [*weight_files(path), path / "config.json"]


def file_record(path: Path) -> dict[str, dict[str, Any]]:
    """Size and SHA-256 of every weight file and of ``config.json``, as the checkpoint records
    them when written."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": files.sha256_file(f)} for f in _recorded_files(path)}


def verify_files(path: str | Path, meta: dict[str, Any], full: bool | None = None) -> dict[str, Any]:
    """Check a checkpoint's weight files against the record written with them: every listed
    file present with its size and a readable safetensors header, and with ``full`` (None:
    when the files total at most :data:`FULL_VERIFY_BYTES`) its SHA-256. Raises
    :class:`CheckpointError` naming the first damaged file; returns what was checked."""
    p = Path(path)
    record = meta.get("files")
    if record is None:
        return {"checked": "nothing", "reason": "the checkpoint has no integrity record"}
    if not isinstance(record, dict) or not all(
            isinstance(r, dict) and isinstance(r.get("bytes"), int) and isinstance(r.get("sha256"), str)
            for r in record.values()):
        raise CheckpointError(f"{p / CONFIG_FILE} is damaged: its record of the files is malformed")
    found = [f for f in _recorded_files(p) if f.is_file()]
    missing = sorted(set(record) - {f.name for f in found})
    if missing:
        raise CheckpointError(f"{p} is damaged: {', '.join(missing)} missing")
    extra = sorted({f.name for f in found} - set(record))
    if extra:
        raise CheckpointError(f"{p} is damaged: {', '.join(extra)} not in the record written with it")
    total = sum(r["bytes"] for r in record.values())
    full = total <= FULL_VERIFY_BYTES if full is None else full
    for f in found:
        want = record[f.name]
        if f.stat().st_size != want["bytes"]:
            raise CheckpointError(f"{f} is damaged: {f.stat().st_size} bytes, {want['bytes']} when written "
                                  "(truncated or an incomplete copy)")
        if f.suffix == ".safetensors":
            try:
                with safe_open(str(f), framework="pt") as handle:
                    handle.keys()
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{f} is damaged: its header does not read ({exc})") from exc
        if full and files.sha256_file(f) != want["sha256"]:
            raise CheckpointError(f"{f} is damaged: its SHA-256 differs from the one recorded when it was written")
    return {"checked": "sha256" if full else "sizes and headers", "files": len(found), "bytes": total}


def read_state(path: str | Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (floating point ones in ``dtype``)."""
    state = {}
    for weights in weight_files(path):
        try:
            part = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights} is corrupt or unreadable: {exc}") from exc
        state.update({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in part.items()})
        del part
    return state
