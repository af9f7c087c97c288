"""Helpers tying data, models and checkpoints together (shared by the CLI and the Python API)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .data import TextSource, load_text, sample_calibration, tokenize_windows
from .evaluate import perplexity

log = logging.getLogger(__name__)


def calibration_samples(tokenizer, config: QuantConfig, data_dir: str | Path | None = None) -> torch.Tensor:
    """``config.calib_samples`` random windows of ``config.calib_seqlen`` tokens from
    ``config.calib`` (the embedded default when None), drawn with ``config.seed``."""
    source = load_text(config.calib, "calib", data_dir=data_dir)
    log.info("calibration data: %s", source.origin)
    config.extra["calib_origin"] = source.origin
    return sample_calibration(tokenizer, source.text, config.calib_samples, config.calib_seqlen, config.seed)


def evaluate(model: nn.Module, tokenizer, data: str | None = None, seqlen: int = 2048,
             max_windows: int | None = None, reference: nn.Module | None = None,
             data_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Perplexity of ``model`` on ``data`` (a name or file; None: the embedded default's
    evaluation part) and, with a ``reference`` model, KL and top-1 agreement."""
    source: TextSource = load_text(data, "eval", data_dir=data_dir)
    log.info("evaluation data: %s", source.origin)
    windows = tokenize_windows(tokenizer, source.text, seqlen, max_windows)
    result = perplexity(model, windows, reference=reference, progress=progress)
    result["data"] = source.origin
    return result
