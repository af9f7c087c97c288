"""Calibration samples as a :class:`~quadllm.config.QuantConfig` asks for them."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..config import QuantConfig
from .text import TextSource, load_text, mixture_counts, sample_calibration

log = logging.getLogger(__name__)

__all__ = ["calibration_samples"]


def calibration_samples(tokenizer, config: QuantConfig, data_dir: str | Path | None = None,
                        source: TextSource | None = None) -> torch.Tensor:
    """``config.calib_samples`` random windows of ``config.calib_seqlen`` tokens from
    ``config.calib`` (the embedded default when None), drawn with ``config.seed``; from a mixture
    (``A+B``, ``A*3+B``) each part gives its share of the windows (recorded in the config's extra). ``source``:
    that text already loaded (a caller that checked it before loading the model)."""
    source = source if source is not None else load_text(config.calib, "calib", data_dir=data_dir)
    log.info("calibration data: %s", source.origin)
    config.extra["calib_origin"] = source.origin
    if not source.parts:
        return sample_calibration(tokenizer, source.text, config.calib_samples, config.calib_seqlen, config.seed)
    # a mixture: each part's share of the windows, drawn from it alone (seed + its index), then shuffled
    counts = mixture_counts(config.calib_samples, source.shares)
    config.extra["calib_counts"] = counts
    drawn = [sample_calibration(tokenizer, part.text, n, config.calib_seqlen, config.seed + i)
             for i, (part, n) in enumerate(zip(source.parts, counts)) if n]
    samples = torch.cat(drawn)
    return samples[torch.randperm(samples.shape[0], generator=torch.Generator().manual_seed(config.seed))]
