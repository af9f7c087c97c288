"""Calibration samples as a :class:`~quadllm.config.QuantConfig` asks for them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import QuantConfig
from .text import TextSource, load_text, sample_calibration

log = logging.getLogger(__name__)

__all__ = ["calibration_samples"]


def calibration_samples(tokenizer, config: QuantConfig, data_dir: str | Path | None = None,
                        source: TextSource | None = None) -> torch.Tensor:
    """``config.calib_samples`` random windows of ``config.calib_seqlen`` tokens from
    ``config.calib`` (the embedded default when None), drawn with ``config.seed``. ``source``:
    that text already loaded (a caller that checked it before loading the model)."""
    source = source if source is not None else load_text(config.calib, "calib", data_dir=data_dir)
    log.info("calibration data: %s", source.origin)
    config.extra["calib_origin"] = source.origin
    return sample_calibration(tokenizer, source.text, config.calib_samples, config.calib_seqlen, config.seed)
