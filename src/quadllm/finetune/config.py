"""The fine-tuning configuration: what ``quadllm finetune`` will train, on what, and how.

Saved with every fine-tuned checkpoint, adapter and resumable training state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, check_choice

FT_METHODS = ("quad", "lora")
TRAIN_SETS = ("outliers", "outliers+scales")
DTYPES = ("float32", "bfloat16")
LOSSES = ("kd", "ce", "kd+ce")


@dataclass
class FinetuneConfig:
    """What a fine-tune does.

    ``method``: ``quad`` trains the full-precision outlier columns ``w_outlier`` of every linear
    that reads the residual stream (and, with ``train="outliers+scales"``, the weight scales of
    every quantized linear), quantizers in the loop, everything else frozen; ``lora`` trains
    ``peft`` LoRA adapters on q/k/v/o/gate/up/down instead, with rank ``lora_rank`` (None: the
    rank whose parameter count matches what ``quad`` with ``train`` would train).
    Steps: ``max_steps`` if given, else ``epochs`` passes over the training split; each step
    takes ``batch_size * grad_accum`` sequences. The learning rate warms up linearly over the
    first ``warmup`` share of the steps, then follows a cosine decay to zero; scales use
    ``lr * scales_lr_ratio``. ``val_fraction`` of the sequences are held out: their loss is
    measured before training, every ``eval_every`` steps and at the end, and the weights with
    the lowest held-out loss are kept. ``loss``: ``kd`` (default) distils the original model: the
    mean KL divergence from the teacher's next-token distribution (the checkpoint's original
    model, or ``teacher``) to the quantized model's, on the positions the labels select, so the
    fine-tune wins back the original's behaviour instead of fitting the training text; ``ce`` is
    the plain next-token cross-entropy on the labels (no teacher in memory); ``kd+ce`` their sum. ``grad_checkpointing`` keeps only each decoder layer's
    input for the backward pass and recomputes the rest.
    """

    data: str = ""
    method: str = "quad"
    loss: str = "kd"
    teacher: str | None = None  # kd: the teacher model (None: the checkpoint's original model)
    train: str = "outliers+scales"
    lr: float = 1e-4
    scales_lr_ratio: float = 0.1
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_seqlen: int = 512
    val_fraction: float = 0.05
    eval_every: int = 20
    warmup: float = 0.05
    clip_grad: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    dtype: str = "float32"
    train_on_prompt: bool = False
    lora_rank: int | None = None
    lora_alpha: float | None = None  # None: 2 * rank
    save_every: int = 25
    grad_checkpointing: bool = True  # recompute each decoder layer in backward: far less memory, ~1/3 more time
    limit: int | None = None  # at most this many records (or text windows)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        choice = check_choice
        choice("method", self.method, FT_METHODS)
        choice("train", self.train, TRAIN_SETS)
        choice("dtype", self.dtype, DTYPES)
        choice("loss", self.loss, LOSSES)
        positive = {"lr": self.lr, "epochs": self.epochs, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "max_seqlen": self.max_seqlen, "eval_every": self.eval_every,
                    "save_every": self.save_every}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be at least 1, got {self.max_steps}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if not 0 <= self.warmup < 1:
            raise ConfigError(f"warmup is a share of the steps in [0, 1), got {self.warmup}")
        if self.scales_lr_ratio < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ConfigError("scales_lr_ratio, clip_grad and weight_decay must be >= 0")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ConfigError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be at least 1, got {self.limit}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown fine-tuning keys: {sorted(unknown)}")
        return cls(**data)

    @property
    def uses_teacher(self) -> bool:
        return self.loss in ("kd", "kd+ce")

    def describe(self) -> str:
        what = (f"LoRA (rank {self.lora_rank or 'matched to the outlier budget'})" if self.method == "lora"
                else self.train.replace("+", " + "))
        steps = f"{self.max_steps} steps" if self.max_steps else f"{self.epochs:g} epoch(s)"
        loss = {"kd": "distillation (KL to the teacher)", "ce": "cross-entropy", "kd+ce": "distillation + "
                "cross-entropy"}[self.loss]
        return (f"fine-tuning {what} on {self.data} with {loss}: {steps} of {self.batch_size}x{self.grad_accum} sequences "
                f"of at most {self.max_seqlen} tokens, lr {self.lr:g} (warmup {self.warmup:g}, cosine), "
                f"clip {self.clip_grad:g}, {self.dtype}, seed {self.seed}")
