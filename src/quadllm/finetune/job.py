"""The ``quadllm finetune`` job: load a checkpoint, train, and write a checkpoint or an adapter.

Output checks happen before any training, so a run never spends its time and then fails to save.
The interrupted-run state lives beside the output (``OUT.finetune-state.pt``) and is removed once
the output is written.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ..data.training import check_training_source, load_training_set
from ..io.checkpoint import CheckpointError, dir_size, is_checkpoint, save, weights_hash
from ..io.sources import load_model
from ..pipelines.loading import load
from .adapter_file import AdapterError, is_adapter_file, save_adapter
from .config import FinetuneConfig
from .loop import finetune
from .loss_plot import loss_curve_png

log = logging.getLogger(__name__)

HISTORY_FILE = "finetune_history.json"
PLOT_FILE = "finetune_loss.png"


def check_output(base: Path, out: Path, adapter_only: bool) -> None:
    """Refuse outputs that would be lost or would clobber something, before training starts."""
    if out.resolve() == base.resolve():
        raise CheckpointError(f"--out {out} is the base checkpoint; write the fine-tuned model elsewhere")
    if adapter_only:
        if out.suffix != ".safetensors":
            raise AdapterError(f"--adapter-only writes one file: --out must end in .safetensors, got {out.name}")
        if out.exists() and not is_adapter_file(out):
            raise AdapterError(f"{out} exists and is not a quadllm adapter; refusing to overwrite it")
    elif out.exists() and not (out.is_dir() and (is_checkpoint(out) or not any(out.iterdir()))):
        raise CheckpointError(f"{out} exists and is not a quadllm checkpoint; refusing to overwrite it")


def load_teacher(config: FinetuneConfig, meta: dict[str, Any]) -> torch.nn.Module:
    """The distillation teacher: ``config.teacher``, else the original model the checkpoint records."""
    spec = config.teacher or (meta.get("original_model") or {}).get("spec")
    if not config.teacher and not meta.get("original_model"):
        raise CheckpointError("this checkpoint does not record its original model; pass --teacher MODEL "
                              "or use --loss ce")
    log.info("distillation teacher: %s", spec or "the embedded default (SmolLM2-135M-Instruct)")
    return load_model(spec)[0]


def state_path_for(out: Path) -> Path:
    return out.parent / f"{out.name}.finetune-state.pt"


def run(base: str, config: FinetuneConfig, out: str, *, adapter_only: bool = False, resume: bool = False,
        data_dir: str | None = None, progress: bool = True, device: str | None = None) -> dict[str, Any]:
    """Fine-tune checkpoint ``base`` as ``config`` says and write ``out``; returns the summary."""
    t0 = time.perf_counter()
    base_p, out_p = Path(base).expanduser(), Path(out).expanduser()
    check_output(base_p, out_p, adapter_only)  # before anything is loaded
    check_training_source(config.data, data_dir)
    model, tok, meta = load(base_p, verify=True)  # a damaged or foreign base is a CheckpointError, never trained
    if meta.get("finetune"):
        log.warning("%s is already fine-tuned; training continues from its weights", base_p)
    tset = load_training_set(config.data, tok, config.max_seqlen, config.train_on_prompt, data_dir, config.limit)
    log.info("training data: %s", tset.describe())
    log.info("%s", config.describe())
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    base_id = weights_hash(base_p)
    state_path = state_path_for(out_p)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log.info("training on %s", device)
    model.to(device)
    teacher = None
    if config.uses_teacher:
        teacher = load_teacher(config, meta).to(device)
    result = finetune(model, tset, config, pad_id, teacher=teacher, state_path=state_path, resume=resume,
                      base_id=base_id, progress=progress)
    del teacher
    model.to("cpu")
    record = result.record(config)
    record["base"] = {"path": str(base_p.resolve()), "weights_sha256": base_id}
    history_bytes = (json.dumps({"history": result.history, **record}, indent=2, default=str) + "\n").encode()
    title = (f"{'LoRA r=' + str(result.lora['rank']) if result.lora else config.train}: "
             f"{result.n_trainable:,} trainable ({100 * result.share:.2f}%)")
    png = loss_curve_png(result.history, title)
    if adapter_only:
        save_adapter(model, result.trainable, out_p, base_p, result.lora, record)
        stem = out_p.with_suffix("")
        (stem.parent / f"{stem.name}.{HISTORY_FILE}").write_bytes(history_bytes)
        if png:
            (stem.parent / f"{stem.name}.{PLOT_FILE}").write_bytes(png)
        size = out_p.stat().st_size
    else:
        model.quadllm_info["finetune"] = record
        if result.lora:
            model.quadllm_info["structure"] = dict(model.quadllm_info["structure"], lora=result.lora)
        files = {HISTORY_FILE: history_bytes}
        if png:
            files[PLOT_FILE] = png
        save(model, tok, out_p, original=meta.get("original_model"), extra_files=files)
        size = dir_size(out_p)
    state_path.unlink(missing_ok=True)
    return {"out": str(out_p), "adapter_only": adapter_only, "size_mb": round(size / 1e6, 2),
            "trainable": result.n_trainable, "trainable_share": round(result.share, 6),
            "lora_rank": result.lora["rank"] if result.lora else None, "steps": result.steps,
            "initial_val_loss": result.initial_val_loss, "best_val_loss": result.best_val_loss,
            "best_step": result.best_step, "final_train_loss": record["final_train_loss"],
            "train_seconds": round(result.seconds, 1), "total_seconds": round(time.perf_counter() - t0, 1),
            "resumed_from": result.resumed_from, "device": str(device), "data": result.data,
            "config": config.to_dict()}
