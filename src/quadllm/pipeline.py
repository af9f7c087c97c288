"""The quantization pipeline: prepare, calibrate, decompose, rotate, quantize.

``quantize(model, config, calib_samples)`` turns a transformers causal LM into a QUAD model in
place and returns it. Every step is logged with its time; ``model.quadllm_info`` holds what a
checkpoint must record (configuration, structure, timings, calibration).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from torch import nn

from . import __version__
from .arch import ArchAdapter, get_adapter
from .calibration import residual_second_moment
from .config import ConfigError, QuantConfig
from .modules import ATTN_IMPLEMENTATION, QuadEmbedding, QuadHead, QuadLinear, register_attention
from .transforms import (apply_online_transforms, apply_residual_transform, attach_kv_quant, prepare_model,
                         residual_basis, set_activation_quant)
from .weights import quantize_weights

log = logging.getLogger(__name__)



def use_quad_attention(model: nn.Module) -> None:
    register_attention()
    model.config._attn_implementation = ATTN_IMPLEMENTATION


def structure_of(config: QuantConfig, adapter: ArchAdapter) -> dict[str, Any]:
    """What the quantized model's modules look like (enough to rebuild them empty)."""
    return {
        "hidden_size": adapter.hidden_size,
        "rank": config.rank,
        "expanded_hidden_size": adapter.hidden_size + config.rank,
        "residual_transform": config.rotate or config.rank > 0,
        "online_transforms": config.rotate,
        "tied_head": adapter.tied,
        "kv_bits": config.kv_bits,
    }


@torch.no_grad()
def transform(model: nn.Module, config: QuantConfig, calib_samples: torch.Tensor | None,
              progress: bool = True, moment: torch.Tensor | None = None) -> dict[str, Any]:
    """The exact part: fuse norms, estimate P, move to the expanded rotated basis, add the
    online transforms. Returns timings and spectrum facts. No quantization happens here.
    ``moment``: a residual second moment already measured on these samples (then reused)."""
    adapter = get_adapter(model)
    if config.rank > adapter.hidden_size:
        raise ConfigError(f"rank {config.rank} is larger than the hidden size {adapter.hidden_size}")
    info: dict[str, Any] = {}
    t0 = time.perf_counter()
    prepare_model(model, adapter)
    use_quad_attention(model)
    info["prepare_s"] = time.perf_counter() - t0

    if config.rank > 0 and moment is None:
        if calib_samples is None:
            raise ConfigError("QUAD with rank > 0 needs calibration samples")
        t0 = time.perf_counter()
        moment = residual_second_moment(model, adapter, calib_samples, config.calib_batch,
                                        normalized=config.moment == "normalized", progress=progress)
        info["moment_s"] = time.perf_counter() - t0
    if config.rank > 0:
        evals = torch.linalg.eigvalsh(moment).flip(0)
        captured = float(evals[:config.rank].sum() / evals.sum())
        info["captured_energy"] = captured
        log.info("residual second moment: top-%d eigenvectors hold %.1f%% of the energy", config.rank,
                 100 * captured)
    if config.rotate or config.rank > 0:
        t0 = time.perf_counter()
        Q = residual_basis(moment, config.rank, config.seed, rotate=config.rotate, hidden_size=adapter.hidden_size)
        apply_residual_transform(model, adapter, Q, config.rank)
        if config.rotate:
            apply_online_transforms(model, adapter)
        info["rotate_s"] = time.perf_counter() - t0
    if config.kv_bits < 16:
        attach_kv_quant(model, adapter, config.kv_bits, config.kv_clip, rotate=config.rotate)
    return info


def quantize(model: nn.Module, config: QuantConfig, calib_samples: torch.Tensor | None = None,
             progress: bool = True) -> nn.Module:
    """Quantize ``model`` (a transformers causal LM of a supported family) in place."""
    adapter = get_adapter(model)
    config.validate()
    if calib_samples is not None and calib_samples.dtype != torch.long:
        raise TypeError("calib_samples must be a LongTensor of token ids [n, seqlen]")
    log.info("quantizing: %s", config.describe())
    t_start = time.perf_counter()
    info = transform(model, config, calib_samples, progress)
    set_activation_quant(model, adapter, config)
    t0 = time.perf_counter()
    quantize_weights(model, adapter, config, calib_samples, progress)
    info["weights_s"] = time.perf_counter() - t0
    round_to_storage(model)
    info["quantize_s"] = time.perf_counter() - t_start
    model.quadllm_info = {
        "quant_config": config.to_dict(),
        "structure": structure_of(config, adapter),
        "timings": info,
        "library_version": __version__,
    }
    log.info("quantized in %.1f s", info["quantize_s"])
    return model


STORAGE_HALF = ("w_outlier", "scales", "bias")


def storage_dtype(module: nn.Module, name: str) -> torch.dtype | None:
    """The dtype a tensor is stored in: FP16 for weight scales, outlier columns, biases, the
    embedding and the head; None (keep as is) for everything else."""
    if isinstance(module, QuadLinear) and name in STORAGE_HALF:
        return torch.float16
    if isinstance(module, QuadEmbedding) and name == "weight":
        return torch.float16
    if isinstance(module, QuadHead) and name in ("own_weight", "bias"):
        return torch.float16
    return None


@torch.no_grad()
def round_to_storage(model: nn.Module) -> None:
    """Round in memory what the checkpoint stores in FP16, so a loaded model is identical."""
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            dt = storage_dtype(module, name)
            if dt is not None and t is not None and t.is_floating_point():
                t.copy_(t.to(dt).to(t.dtype))
        if isinstance(module, QuadLinear):
            module._deq = None
