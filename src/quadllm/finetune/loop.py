"""Fine-tuning a quantized model: train the full-precision outlier columns (QUAD) or LoRA.

The INT4 weights stay packed; every quantized linear dequantizes its weight inside its forward
and backward pass (:mod:`quadllm.nn.quant_linear`) and the activation quantizers pass gradients
straight through (:func:`quadllm.core.quantizers.ste_round`), so the model trains with its
quantizers in the loop and never holds a full-precision copy of its weights. Only the tensors
:func:`select_trainable` marks get gradients.

A run can be interrupted and resumed: every ``save_every`` steps the trained tensors, the
optimizer, the schedule, the history and the RNG state go to a state file (written atomically),
which ``resume=True`` picks up if it belongs to the same base and configuration.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data.training import IGNORE, Example, TrainingSet, collate
from ..errors import QuadllmError
from ..io.files import atomic_write
from ..io.storage import round_to_storage
from ..nn.modules import QuadEmbedding, QuadHead, QuadLinear
from .config import FinetuneConfig
from .lora import inject_lora, rank_for_budget, target_names

log = logging.getLogger(__name__)

__all__ = ["FinetuneError", "FinetuneResult", "select_trainable", "logical_param_count", "outlier_budget",
           "lm_loss", "kd_loss", "finetune", "lr_factor"]


class FinetuneError(QuadllmError, ValueError):
    """A fine-tune that cannot run, with the reason."""


@dataclass
class FinetuneResult:
    trainable: list[str]
    n_trainable: int
    n_model: int
    steps: int
    history: list[dict[str, Any]]
    best_step: int | None
    best_val_loss: float | None
    initial_val_loss: float | None
    seconds: float
    lora: dict[str, Any] | None = None
    resumed_from: int | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.n_trainable / self.n_model

    def record(self, config: FinetuneConfig) -> dict[str, Any]:
        """What goes into the checkpoint's or adapter's metadata."""
        return {"config": config.to_dict(), "trainable": sorted(self.trainable), "n_trainable": self.n_trainable,
                "n_model": self.n_model, "share": self.share, "steps": self.steps, "best_step": self.best_step,
                "initial_val_loss": self.initial_val_loss, "best_val_loss": self.best_val_loss,
                "final_train_loss": next((h["train_loss"] for h in reversed(self.history) if "train_loss" in h),
                                         None),
                "seconds": round(self.seconds, 1), "lora": self.lora, "resumed_from": self.resumed_from,
                "data": self.data}


# ---------------------------------------------------------------------------- selection


def _quad_linears(model: nn.Module) -> list[tuple[str, QuadLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuadLinear)]


def logical_param_count(model: nn.Module) -> int:
    """Parameters of the model as a user counts them: every quantized weight counts as
    out x in (not its packed bytes), the embedding once even when the head is tied to it;
    fixed transform matrices are not counted."""
    n = 0
    for _, m in model.named_modules():
        if isinstance(m, QuadLinear):
            n += m.out_features * m.in_features + (m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, QuadEmbedding):
            n += m.weight.numel()
        elif isinstance(m, QuadHead) and not m.tied:
            n += m.own_weight.numel() + (m.bias.numel() if m.bias is not None else 0)
    n += sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return n


def outlier_budget(model: nn.Module, train: str) -> int:
    """Parameters QUAD fine-tuning would train: all ``w_outlier`` (+ all ``scales``) of the quantized
    linears (a linear an override keeps in full precision stays frozen: it has no quantization error
    to win back)."""
    n = 0
    quantized = [m for _, m in _quad_linears(model) if m.quantized]
    if not quantized:
        raise FinetuneError("the model is not quantized; run `quadllm quantize` first")
    for m in quantized:
        n += m.w_outlier.numel()
        if train == "outliers+scales":
            n += m.scales.numel()
    return n


def _scales_to_parameter(m: QuadLinear) -> None:
    if isinstance(m.scales, nn.Parameter):
        return
    t = m._buffers.pop("scales")
    m.scales = nn.Parameter(t, requires_grad=False)


def select_trainable(model: nn.Module, config: FinetuneConfig) -> tuple[list[str], dict[str, Any] | None]:
    """Freeze everything, then enable gradients on what ``config`` trains.

    Returns the trained tensor names and, for LoRA, the adapter shape that was injected."""
    for p in model.parameters():
        p.requires_grad_(False)
    lora = None
    if config.method == "lora":
        targets = target_names(model)
        rank = config.lora_rank
        if rank is None:
            budget = outlier_budget(model, config.train)
            if budget == 0:
                raise FinetuneError("this checkpoint has no outlier columns to match a LoRA budget to; "
                                    "pass --lora-rank")
            rank = rank_for_budget(model, budget, targets)
        lora = {"rank": int(rank), "alpha": float(config.lora_alpha or 2 * rank), "targets": targets}
        inject_lora(model, lora)
    else:
        outlier_budget(model, config.train)  # checks the model is quantized
        for _, m in _quad_linears(model):
            if not m.quantized:
                continue
            if m.rank:
                m.w_outlier.requires_grad_(True)
            if config.train == "outliers+scales":
                _scales_to_parameter(m)
                m.scales.requires_grad_(True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise FinetuneError("nothing to train: this checkpoint has rank 0 (no outlier columns); use "
                            "--train outliers+scales or --method lora")
    for _, m in _quad_linears(model):
        m.cache_dequantized = False  # no float copy of the weights while training
    return names, lora


def _finish(model: nn.Module) -> None:
    if getattr(model, "is_activation_checkpointing", False):
        model.activation_checkpointing_disable()

    for p in model.parameters():
        p.requires_grad_(False)
    round_to_storage(model)
    for _, m in _quad_linears(model):
        m.cache_dequantized = True
    model.eval()


# ------------------------------------------------------------------------------- losses


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean next-token cross-entropy over positions whose label is not IGNORE, and their count."""
    target = labels[:, 1:]
    n = int((target != IGNORE).sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss / n, n


def kd_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Mean KL(teacher ‖ model) of the next-token distributions over the positions whose label is
    not IGNORE (the positions :func:`lm_loss` scores), and their count."""
    if teacher_logits.shape != logits.shape:
        raise FinetuneError(f"the teacher's logits {tuple(teacher_logits.shape)} do not match the model's "
                            f"{tuple(logits.shape)}: is the teacher the same model family (same vocabulary)?")
    mask = labels[:, 1:] != IGNORE
    n = int(mask.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    student = F.log_softmax(logits[:, :-1][mask].float(), dim=-1)
    teacher = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="sum") / n, n


def _autocast(dtype: str):
    if dtype == "bfloat16":
        return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _forward_loss(model: nn.Module, batch: dict[str, torch.Tensor], dtype: str, device, loss: str = "ce",
                  teacher: nn.Module | None = None) -> tuple[torch.Tensor, int]:
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
              "use_cache": False}
    labels = batch["labels"].to(device)
    with _autocast(dtype):
        logits = model(**inputs).logits
    if loss == "ce":
        return lm_loss(logits, labels)
    if teacher is None:
        raise FinetuneError(f"loss {loss!r} needs a teacher model")
    with torch.no_grad(), _autocast(dtype):
        teacher_logits = teacher(**inputs).logits
    value, n = kd_loss(logits, teacher_logits, labels)
    if loss == "kd+ce":
        value = value + lm_loss(logits, labels)[0]
    return value, n


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int, dtype: str = "float32",
                  device=None, loss: str = "ce", teacher: nn.Module | None = None) -> float:
    """Token-weighted mean loss (``ce``, ``kd`` or ``kd+ce``) on ``examples``."""
    device = device or next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss_value, n = _forward_loss(model, collate(examples[i:i + batch_size], pad_id), dtype, device, loss,
                                      teacher)
        total += float(loss_value) * n
        count += n
    return total / max(count, 1)


# ----------------------------------------------------------------------------- schedule


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warmup over ``ceil(warmup * total)`` steps, then cosine decay to 0 at ``total``."""
    w = math.ceil(warmup * total)
    if step < w:
        return (step + 1) / w
    progress = (step - w) / max(1, total - w)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# -------------------------------------------------------------------------------- state


def _split(tset: TrainingSet, config: FinetuneConfig) -> tuple[list[Example], list[Example]]:
    n = len(tset.examples)
    g = torch.Generator().manual_seed(config.seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_val = 0 if config.val_fraction == 0 or n < 2 else max(1, round(config.val_fraction * n))
    val = [tset.examples[i] for i in perm[:n_val]]
    train = [tset.examples[i] for i in perm[n_val:]]
    return train, val


def save_state(path: Path, state: dict[str, Any]) -> None:
    """The resumable state, pickled, inside an envelope that carries the pickle's SHA-256 (the
    envelope itself loads with ``weights_only``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    envelope = {"format": "quadllm-finetune-state", "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    atomic_write(path, writer=lambda tmp: torch.save(envelope, tmp))


def load_state(path: Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote; :class:`FinetuneError` for a damaged or foreign file."""
    try:
        envelope = torch.load(path, map_location="cpu", weights_only=True)
        ok = (isinstance(envelope, dict) and envelope.get("format") == "quadllm-finetune-state"
              and isinstance(envelope.get("payload"), bytes)
              and hashlib.sha256(envelope["payload"]).hexdigest() == envelope.get("sha256"))
    except Exception as exc:  # a truncated or foreign file raises whatever the unpickler meets
        raise FinetuneError(f"the training state {path} is damaged ({type(exc).__name__}); delete it or drop "
                            "--resume") from exc
    if not ok:
        raise FinetuneError(f"the training state {path} is damaged or not quadllm's (its hash does not match); "
                            "delete it or drop --resume")
    state = torch.load(io.BytesIO(envelope["payload"]), map_location="cpu", weights_only=False)
    if not isinstance(state, dict):
        raise FinetuneError(f"the training state {path} holds no state")
    return state


def _state_matches(state: dict[str, Any], config: FinetuneConfig, base_id: str) -> str | None:
    if state.get("base_id") != base_id:
        return "it belongs to another base checkpoint"
    if state.get("config") != config.to_dict():
        return "its configuration differs"
    return None


# --------------------------------------------------------------------------------- train


@dataclass
class _Progress:
    """What a run has done so far: saved with the resumable state and restored from it."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, torch.Tensor] | None = None
    best_val: float | None = None
    best_step: int | None = None
    initial_val: float | None = None

    FIELDS = ("step", "history", "best", "best_val", "best_step", "initial_val")

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.FIELDS}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "_Progress":
        return cls(**{k: state[k] for k in cls.FIELDS})


@dataclass
class _Training:
    """One run's model, trainable tensors, optimizer and schedule."""

    model: nn.Module
    config: FinetuneConfig
    names: list[str]
    params: dict[str, nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    total: int
    micro_per_epoch: int
    lora: dict[str, Any] | None = None

    @property
    def trainable(self) -> list[nn.Parameter]:
        return [self.params[n] for n in self.names]

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {n: self.params[n].detach().clone() for n in self.names}

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        for n in self.names:
            self.params[n].copy_(weights[n])


def _check_teacher(config: FinetuneConfig, teacher: nn.Module | None) -> nn.Module | None:
    """The teacher the loss uses (frozen, eval mode), or None."""
    if config.uses_teacher and teacher is None:
        raise FinetuneError(f"loss {config.loss!r} distils a teacher (the original model) and none was given; "
                            "pass one or use loss 'ce'")
    if not config.uses_teacher:
        return None
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _setup(model: nn.Module, config: FinetuneConfig, n_train: int) -> _Training:
    """The trainable tensors (outlier columns and scales, or LoRA), AdamW with the scales' own
    learning rate, and the warmup + cosine schedule over the run's steps."""
    names, lora = select_trainable(model, config)
    params = dict(model.named_parameters())
    scale_params = [params[n] for n in names if n.endswith(".scales")]
    other = [params[n] for n in names if not n.endswith(".scales")]
    groups = [g for g in ({"params": other, "lr": config.lr},
                          {"params": scale_params, "lr": config.lr * config.scales_lr_ratio}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    micro_per_epoch = math.ceil(n_train / config.batch_size)
    total = config.max_steps or max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, config.warmup))
    return _Training(model, config, names, params, opt, sched, total, micro_per_epoch, lora)


def _resume(run: _Training, state_path: Path | None, resume: bool, base_id: str) -> tuple[_Progress, int | None]:
    """The progress to continue from: a matching saved state with ``resume``, else a fresh start."""
    if resume and state_path and state_path.is_file():
        state = load_state(state_path)
        why = _state_matches(state, run.config, base_id)
        if why:
            raise FinetuneError(f"cannot resume from {state_path}: {why}; delete it or drop --resume")
        run.set_weights(state["trainable"])
        run.opt.load_state_dict(state["optimizer"])
        run.sched.load_state_dict(state["scheduler"])
        progress = _Progress.from_state(state)
        torch.set_rng_state(state["rng"])
        log.info("resumed from step %d of %d (%s)", progress.step, run.total, state_path)
        return progress, progress.step
    if resume:
        log.info("no training state at %s: starting from step 0", state_path)
    elif state_path and state_path.is_file():
        log.warning("%s holds the state of an interrupted run; starting over (pass --resume to continue it)",
                    state_path)
    return _Progress(), None


def _validate(run: _Training, progress: _Progress, val: list[Example], pad_id: int, device, teacher) -> None:
    """The held-out loss at ``progress.step``; the best weights so far are kept."""
    if not val:
        return
    config = run.config
    run.model.eval()
    v = evaluate_loss(run.model, val, config.batch_size, pad_id, config.dtype, device, config.loss, teacher)
    run.model.train()
    at = progress.step
    progress.history.append({"step": at, "val_loss": v})
    if progress.initial_val is None:
        progress.initial_val = v
    if progress.best_val is None or v < progress.best_val:
        progress.best_val, progress.best_step = v, at
        progress.best = run.snapshot()
    log.info("step %d: held-out loss %.4f (best %.4f at step %d)", at, v, progress.best_val, progress.best_step)


def _train_step(run: _Training, train: list[Example], step: int, micro: int, pad_id: int, device, teacher
                ) -> tuple[dict[str, Any], int]:
    """One optimizer step over ``grad_accum`` micro-batches (each epoch in its own seeded order);
    returns the step's record without its time, and the next micro-batch index."""
    config = run.config
    run.opt.zero_grad(set_to_none=True)
    loss_sum, tok_sum = 0.0, 0
    for _ in range(config.grad_accum):
        epoch, pos = divmod(micro, run.micro_per_epoch)
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(config.seed + 1 + epoch))
        idx = order[pos * config.batch_size:(pos + 1) * config.batch_size].tolist()
        loss, n = _forward_loss(run.model, collate([train[i] for i in idx], pad_id), config.dtype, device,
                                config.loss, teacher)
        (loss / config.grad_accum).backward()
        loss_sum += float(loss.detach()) * n
        tok_sum += n
        micro += 1
    if not math.isfinite(loss_sum):
        raise FinetuneError(f"the training loss became {loss_sum} at step {step}; lower --lr")
    gnorm = float(torch.nn.utils.clip_grad_norm_(run.trainable, config.clip_grad)) if config.clip_grad else None
    run.opt.step()
    run.sched.step()
    rec = {"train_loss": loss_sum / max(tok_sum, 1), "lr": run.opt.param_groups[0]["lr"], "tokens": tok_sum}
    if gnorm is not None:
        rec["grad_norm"] = gnorm
    return rec, micro


def _save_progress(run: _Training, progress: _Progress, state_path: Path, base_id: str) -> None:
    save_state(state_path, {"base_id": base_id, "config": run.config.to_dict(), "trainable": run.snapshot(),
                             "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
                             **progress.state(), "rng": torch.get_rng_state()})


def finetune(model: nn.Module, tset: TrainingSet, config: FinetuneConfig, pad_id: int, *,
             teacher: nn.Module | None = None, state_path: str | Path | None = None, resume: bool = False,
             base_id: str = "", progress: bool = True) -> FinetuneResult:
    """Fine-tune ``model`` (a quantized quadllm model) in place on ``tset``.

    ``teacher`` (the original model) is needed by the distillation losses (``config.loss`` ``kd``
    or ``kd+ce``) and ignored by ``ce``. On return the model holds the weights with the lowest
    held-out loss (the last ones without a held-out split), rounded to what the checkpoint
    stores, frozen and in eval mode.
    """
    teacher = _check_teacher(config, teacher)
    t_start = time.perf_counter()
    torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    train, val = _split(tset, config)
    if not train:
        raise FinetuneError("no training sequence left after the held-out split; lower --val-fraction")
    run = _setup(model, config, len(train))
    n_trainable = sum(p.numel() for p in run.trainable)
    n_model = logical_param_count(model)
    log.info("trainable parameters: %d (%.3f%% of %d)", n_trainable, 100 * n_trainable / n_model, n_model)
    state_path = Path(state_path) if state_path else None
    done, resumed_from = _resume(run, state_path, resume, base_id)

    log.info("%d training and %d held-out sequences; %d steps of %d sequences", len(train), len(val), run.total,
             config.batch_size * config.grad_accum)
    model.train()  # no dropout in these models; lets transformers take its training paths
    if config.grad_checkpointing and hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if done.step == 0:
        _validate(run, done, val, pad_id, device, teacher)
    bar = tqdm(total=run.total, initial=done.step, desc="finetune", unit="step", disable=not progress)
    micro = done.step * config.grad_accum
    t_last = time.perf_counter()
    while done.step < run.total:
        rec, micro = _train_step(run, train, done.step, micro, pad_id, device, teacher)
        done.step += 1
        now = time.perf_counter()
        done.history.append({"step": done.step, **rec, "seconds": round(now - t_last, 3)})
        t_last = now
        bar.set_postfix(loss=f"{rec['train_loss']:.4f}")
        bar.update(1)
        if done.step % config.eval_every == 0 or done.step == run.total:
            _validate(run, done, val, pad_id, device, teacher)
        if state_path and (done.step % config.save_every == 0) and done.step < run.total:
            _save_progress(run, done, state_path, base_id)
    bar.close()
    if done.best is not None and done.best_step != done.step:
        log.info("keeping the weights of step %d (lowest held-out loss %.4f)", done.best_step, done.best_val)
        run.set_weights(done.best)
    _finish(model)
    return FinetuneResult(trainable=run.names, n_trainable=n_trainable, n_model=n_model, steps=done.step,
                          history=done.history, best_step=done.best_step, best_val_loss=done.best_val,
                          initial_val_loss=done.initial_val, seconds=time.perf_counter() - t_start, lora=run.lora,
                          resumed_from=resumed_from,
                          data={"origin": tset.origin, "kinds": tset.kinds, "sequences": len(tset.examples),
                                "tokens": tset.n_tokens, "train": len(train), "held_out": len(val),
                                "skipped": tset.skipped})
