"""What every command shares: common options, logging, configs from options, opening a model,
writing a result file."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, TypeVar

from ..backends import BACKENDS, DTYPES, HEAD_PRECISIONS, BackendError, place
from ..finetune.adapter_file import is_adapter_file, read_adapter_meta
from ..io.checkpoint import CheckpointError, is_checkpoint
from ..io.files import WriteError, atomic_write
from ..io.sources import load_model
from ..pipelines.loading import load

log = logging.getLogger("quadllm")

C = TypeVar("C")

__all__ = ["add_common", "add_backend", "add_dtype", "setup_logging", "config_from_args", "open_model",
           "write_text"]

#: what a --data / --calib option accepts (quadllm.data.text.load_text)
TEXT_SPECS = "wikitext2, ptb, pysource (embedded Python code), a .jsonl or text file"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, help="offline data directory (default: $QUADLLM_DATA_DIR or ../shared/data)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")


def add_backend(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=BACKENDS, default="fake",
                   help="how a quadllm checkpoint's quantized linears run: float simulation (default), INT8 GEMM "
                        "on the CPU, Triton kernels on a CUDA device, or the fastest available")
    p.add_argument("--head", choices=HEAD_PRECISIONS, default="float",
                   help="a quadllm checkpoint's output head on the CPU: as stored (default), a bfloat16, a per-row "
                        "INT8 (bfloat16 inputs), a W8A8 (rotated, INT8 inputs per token) or a group-wise INT4 copy "
                        "(faster decoding; it changes the logits: measure it)")


def add_dtype(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="the dtype the model's weights and activations run in (bfloat16: faster on CPUs with "
                        "bfloat16 matrix units; quantized linears keep their INT4 grid, simulated in that dtype; "
                        "the fake backend only)")


def setup_logging(args) -> None:
    level = logging.DEBUG if args.verbose else (logging.WARNING if args.quiet else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def config_from_args(cls: type[C], args: argparse.Namespace, **overrides: Any) -> C:
    """An instance of the config dataclass ``cls`` from the options named like its fields (the
    parser's ``dest``); fields without an option keep their defaults."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**values, **overrides})


def open_model(spec: str | None, adapter: str | None = None, backend: str = "fake", dtype: str = "float32",
               head: str = "float"):
    """A quadllm checkpoint (optionally with an adapter) placed on ``backend``, an adapter file
    (loaded on the base it records) or an original model: ``(model, tokenizer, meta_or_None,
    source_or_None)``. ``--backend`` names how a checkpoint's quantized linears run: asking for a
    kernel on an original model is an error, ``auto`` there a warning. ``dtype`` (a key of
    :data:`DTYPES`) is the dtype everything runs in; the kernels take float32 models only. ``head``
    (:data:`HEAD_PRECISIONS`): a checkpoint's output head precision."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype != "float32" and backend != "fake":
        raise BackendError(f"--dtype {dtype} runs on the fake backend; --backend {backend} takes float32 models")
    torch_dtype = DTYPES[dtype]
    if spec is not None and str(spec).endswith(".safetensors") and adapter is None and is_adapter_file(spec):
        adapter, spec = spec, read_adapter_meta(spec)["base_path"]
    if spec is not None and spec != "default" and is_checkpoint(spec):
        model, tok, meta = load(spec, dtype=torch_dtype, adapter=adapter)
        if backend != "fake" or head != "float":
            meta = dict(meta, backend=place(model, backend, head=head), head=head)
        return model, tok, meta, None
    if adapter is not None:
        raise CheckpointError(f"--adapter needs a quadllm checkpoint as the model, not {spec or 'default'}")
    if head != "float":
        raise BackendError(f"--head {head} runs quadllm checkpoints; {spec or 'the default model'} is an original model")
    if backend == "auto":
        log.warning("--backend auto applies to quadllm checkpoints; %s is an original model and runs in float",
                    spec or "the default model")
    elif backend != "fake":
        raise BackendError(f"--backend {backend} runs quadllm checkpoints; {spec or 'the default model'} is an "
                           "original model (quantize it first, or drop --backend)")
    model, tok, source = load_model(spec, dtype=torch_dtype)
    return model, tok, None, source


#: a checkpoint's expected size against the original's FP16 size (0.37-0.51 measured; with margin)
CHECKPOINT_SIZE_VS_FP16 = 0.6


def check_free_space(out: Path, need: int, what: str) -> None:
    """Refuse, before any work, an output whose filesystem has less than ``need`` bytes free."""
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise WriteError(f"{probe} has {_size(free)} free and {what} needs about {_size(need)}; "
                         "free some space or write elsewhere")


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 10**7 else f"{n / 1e3:.0f} kB"


def write_text(path: str | Path, text: str) -> None:
    """A result file, written atomically."""
    atomic_write(path, text)
