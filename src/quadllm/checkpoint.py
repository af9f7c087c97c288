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
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from . import __version__
from .arch import get_adapter, get_submodule, set_submodule
from .config import QuantConfig
from .hadamard import OnlineTransform
from .modules import QuadEmbedding, QuadHead, QuadLinear, QuadRMSNorm
from .pipeline import storage_dtype, use_quad_attention
from .transforms import _norm_eps, attach_kv_quant

log = logging.getLogger(__name__)

FORMAT = "quadllm"
FORMAT_VERSION = 1
CONFIG_FILE = "quadllm_config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded checkpoints (streaming quantization)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written or read, with the reason."""


def _storage_state_dict(model: nn.Module, skip_meta: bool = False) -> dict[str, torch.Tensor]:
    """The tensors as stored (FP16 where :func:`storage_dtype` says so); ``skip_meta`` leaves
    out tensors on the meta device (layers a streaming run has already written)."""
    modules = dict(model.named_modules())
    out = {}
    for key, t in model.state_dict().items():
        if skip_meta and t.device.type == "meta":
            continue
        mod_name, _, tname = key.rpartition(".")
        dt = storage_dtype(modules[mod_name], tname)
        t = t.detach()
        if dt is not None and t.is_floating_point():
            t = t.to(dt)
        out[key] = t.contiguous()
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def check_output_dir(out_dir: str | Path) -> Path:
    """The resolved output path; refuses a path that holds something other than a checkpoint."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not (out.is_dir() and (is_checkpoint(out) or not any(out.iterdir()))):
        raise CheckpointError(f"{out} exists and is not a quadllm checkpoint; refusing to overwrite it")
    return out


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out_dir``; on success it replaces ``out_dir`` (an
    existing checkpoint is replaced only then), on any error it is removed and ``out_dir`` is
    left as it was."""
    out = check_output_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "ckpt")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_metadata(tmp: Path, hf_config, tokenizer, info: dict[str, Any], original: Any,
                   sizes: dict[str, Any], extra: dict[str, Any] | None = None,
                   extra_files: dict[str, bytes] | None = None) -> None:
    """Everything of a checkpoint but its tensors: ``config.json``, the tokenizer, extra files
    and ``quadllm_config.json`` (written last, fsynced)."""
    hf = hf_config.to_dict()
    hf.pop("_attn_implementation_internal", None)
    with open(tmp / "config.json", "w") as f:
        json.dump(hf, f, indent=2, default=str)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, data in (extra_files or {}).items():
        if Path(name).name != name or name in (WEIGHTS_FILE, WEIGHTS_INDEX, CONFIG_FILE, "config.json"):
            raise CheckpointError(f"invalid extra file name {name!r}")
        (tmp / name).write_bytes(data)
    if hasattr(original, "to_dict"):
        original = original.to_dict()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "transformers_version": _transformers_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model_type": hf_config.model_type,
        "original_model": original,
        **{k: v for k, v in info.items() if k != "library_version"},
        "sizes": sizes,
        **(extra or {}),
    }
    with open(tmp / CONFIG_FILE, "w") as f:
        json.dump(meta, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())


def save(model: nn.Module, tokenizer, out_dir: str | Path, original: Any = None,
         extra: dict[str, Any] | None = None, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` (quantized by :func:`quadllm.quantize`) to ``out_dir`` atomically.

    ``extra`` goes into ``quadllm_config.json``; ``extra_files`` (name -> bytes) are written
    into the directory too (a fine-tune's loss curve, for example)."""
    from safetensors.torch import save_file

    info = getattr(model, "quadllm_info", None)
    if info is None:
        raise CheckpointError("this model has not been quantized by quadllm (no quadllm_info)")
    with atomic_dir(out_dir) as tmp:
        save_file(_storage_state_dict(model), str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "quadllm": "1"})
        sizes = {"weights_file_bytes": (tmp / WEIGHTS_FILE).stat().st_size, "tensor_bytes": tensor_bytes(model)}
        write_metadata(tmp, model.config, tokenizer, info, original, sizes, extra, extra_files)
    out = check_output_dir(out_dir)
    log.info("saved %s (%.1f MB)", out, dir_size(out) / 1e6)
    return out


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def dir_size(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the stored tensors by kind (as written, FP16 where stored so)."""
    kinds = {"int4_weights": 0, "scales": 0, "outlier_columns": 0, "embedding_and_head": 0, "other": 0}
    for mod_name, module in model.named_modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None:
                continue
            dt = storage_dtype(module, name)
            n = t.numel() * (torch.finfo(dt).bits // 8 if dt is not None else t.element_size())
            if isinstance(module, QuadLinear) and name == "qweight":
                kinds["int4_weights"] += n
            elif isinstance(module, QuadLinear) and name == "scales":
                kinds["scales"] += n
            elif isinstance(module, QuadLinear) and name == "w_outlier":
                kinds["outlier_columns"] += n
            elif isinstance(module, (QuadEmbedding, QuadHead)):
                kinds["embedding_and_head"] += n
            else:
                kinds["other"] += n
    return kinds


def read_meta(path: str | Path) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if not p.is_dir() or not (p / CONFIG_FILE).is_file():
        raise CheckpointError(f"{p} is not a quadllm checkpoint (no {CONFIG_FILE}); "
                              "create one with `quadllm quantize --out DIR`")
    try:
        meta = json.loads((p / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{p / CONFIG_FILE} is corrupt: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{p / CONFIG_FILE} is not a quadllm configuration")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{p} has format version {meta.get('format_version')}; this quadllm "
                              f"({__version__}) reads version {FORMAT_VERSION}")
    return meta


def build_skeleton(model: nn.Module, config: QuantConfig, structure: dict[str, Any],
                   dtype: torch.dtype) -> None:
    """Replace the modules of an (empty-weight) transformers model by quantized quadllm modules
    of the right shapes, ready for ``load_state_dict``."""
    adapter = get_adapter(model)
    d = adapter.hidden_size
    r = int(structure["rank"])
    D = d + r
    online = bool(structure["online_transforms"])
    for layer in adapter.layers(model):
        for group in adapter.reader_groups:
            norm = get_submodule(layer, group.norm)
            for name in group.linears:
                lin = get_submodule(layer, name)
                q = QuadLinear(D, lin.out_features, n_outlier=r, bias=lin.bias is not None,
                               act=config.act_spec(adapter.role(name)), dtype=dtype, allocate=False)
                q.allocate_quantized(config.w_bits, config.group_size, dtype)
                set_submodule(layer, name, q)
            set_submodule(layer, group.norm, QuadRMSNorm(d, _norm_eps(norm)))
        for name in adapter.writers:
            lin = get_submodule(layer, name)
            transform = None
            if online:
                transform = (OnlineTransform.mixing(adapter.num_heads, adapter.head_dim) if name == adapter.o_proj
                             else OnlineTransform.hadamard(lin.in_features))
            q = QuadLinear(lin.in_features, D, bias=lin.bias is not None, act=config.act_spec(adapter.role(name)),
                           transform=transform, dtype=dtype, allocate=False)
            q.allocate_quantized(config.w_bits, config.group_size, dtype)
            set_submodule(layer, name, q)
    final = adapter.final_norm(model)
    adapter.set_final_norm(model, QuadRMSNorm(d, _norm_eps(final)))
    emb = adapter.embedding(model)
    V = emb.weight.shape[0]
    qemb = QuadEmbedding(torch.empty(V, d, dtype=dtype),
                         torch.empty(D, d, dtype=dtype) if structure["residual_transform"] else None)
    adapter.set_embedding(model, qemb)
    head = adapter.head(model)
    bias = None if getattr(head, "bias", None) is None else torch.empty(V, dtype=dtype)
    if structure["tied_head"]:
        qhead = QuadHead(torch.empty(d, D, dtype=dtype), tied_to=qemb, bias=bias)
    else:
        qhead = QuadHead(torch.empty(d, D, dtype=dtype), weight=torch.empty(V, d, dtype=dtype), bias=bias)
    adapter.set_head(model, qhead)
    if structure["kv_bits"] < 16:
        attach_kv_quant(model, adapter, structure["kv_bits"], config.kv_clip, rotate=online)
    if structure.get("lora"):
        from .lora import inject_lora

        inject_lora(model, structure["lora"])


def load(path: str | Path, dtype: torch.dtype = torch.float32, adapter: str | Path | None = None,
         backend: str = "fake"):
    """Load a quadllm checkpoint: ``(model, tokenizer, meta)``; the model is ready to run.

    ``adapter``: a fine-tuning adapter file (``quadllm finetune --adapter-only``) to apply; it
    must have been trained on exactly this checkpoint (checked by hash).
    ``backend``: how quantized linears run (:mod:`quadllm.backends`): ``fake`` (float
    simulation), ``cpu-int8`` (INT8 GEMM), ``gpu`` (Triton kernels; the model is moved to the
    CUDA device) or ``auto`` (``gpu`` when a CUDA device and Triton are there, else ``cpu-int8``
    where it runs)."""
    from accelerate import init_empty_weights
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path).expanduser()
    meta = read_meta(p)
    config = QuantConfig.from_dict(meta["quant_config"])
    hf_config = AutoConfig.from_pretrained(p)
    get_adapter(hf_config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    build_skeleton(model, config, meta["structure"], dtype)
    state = {}
    for weights in weight_files(p):
        try:
            part = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{weights} is corrupt or unreadable: {exc}") from exc
        state.update({k: (v.to(dtype) if v.is_floating_point() else v) for k, v in part.items()})
        del part
    weights = p / (WEIGHTS_FILE if (p / WEIGHTS_FILE).is_file() else WEIGHTS_INDEX)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its configuration: {exc}") from exc
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.device.type == "meta":
            raise CheckpointError(f"{p}: tensor {name} was not in the checkpoint")
    for m in model.modules():
        for t in m.parameters(recurse=False):
            t.requires_grad_(False)
    use_quad_attention(model)
    model.quadllm_info = {k: meta[k] for k in ("quant_config", "structure", "timings", "finetune") if k in meta}
    model.eval()
    if adapter is not None:
        from .adapter import apply_adapter

        meta = dict(meta, adapter=apply_adapter(model, adapter, p))
    if backend != "fake":
        from .backends import set_backend
        from .backends.gpu import gpu_available

        if torch.cuda.is_available() and (backend == "gpu" or (backend == "auto" and gpu_available())):
            model.to("cuda")
        meta = dict(meta, backend=set_backend(model, backend))
    tok = AutoTokenizer.from_pretrained(p)
    return model, tok, meta


def weights_hash(path: str | Path) -> str:
    """SHA-256 of a checkpoint's tensors (name, dtype, shape and bytes of each, in name order):
    identifies the exact base an adapter belongs to.

    The header's metadata and key order do not count: safetensors writes them in a different
    order from one run to the next, so two saves of the same tensors have the same hash, though
    not always the same file bytes."""
    import hashlib

    from safetensors import safe_open

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
    """SHA-256 of a checkpoint's weight files as bytes: what ``weights_hash`` was before
    2026-12-01 (adapters saved then record it)."""
    import hashlib

    h = hashlib.sha256()
    for f in weight_files(path):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
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
