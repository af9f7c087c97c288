"""Weight quantization of one decoder layer's linears: RTN, or GPTQ on the layer's inputs.

GPTQ runs one decoder layer at a time: the layer's inputs are the outputs of the layers before
it *after* their quantization, so memory holds one layer's activations, never the model's.
Activation quantization is off while calibrating (as in QuaRot); the outlier columns stay in
full precision and absorb part of the rounding error (see :mod:`quadllm.core.gptq`).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..config import ConfigError, QuantConfig
from ..core.gptq import HessianAccumulator, gptq_quantize, rtn_quantize
from ..nn.modules import QuadLinear
from .calibration import CalibrationError, LayerInputs, capture_group

log = logging.getLogger(__name__)


def _apply(lin: QuadLinear, result, config: QuantConfig) -> None:
    lin.set_quantized(result.codes, result.scales, result.fp_columns, config.w_bits, config.group_size)


def _check_group(lin: QuadLinear, config: QuantConfig, name: str) -> None:
    nq = lin.in_features - lin.rank
    if config.group_size and nq % config.group_size:
        raise ConfigError(f"{name}: {nq} quantized input columns are not a multiple of --group-size "
                         f"{config.group_size}")


@torch.no_grad()
def rtn_layer(layer: nn.Module, adapter: ArchAdapter, config: QuantConfig, index: int) -> None:
    for name in adapter.all_linears:
        lin: QuadLinear = get_submodule(layer, name)
        _check_group(lin, config, f"layer {index} {name}")
        _apply(lin, rtn_quantize(lin.weight.detach(), lin.rank, config.w_bits, config.group_size,
                                 config.w_clip), config)


@torch.no_grad()
def gptq_layer(layer: nn.Module, adapter: ArchAdapter, config: QuantConfig, inputs: LayerInputs,
               index: int) -> None:
    """GPTQ for every linear of one decoder layer, calibrated on ``inputs`` (the layer's inputs);
    with ``config.true_sequential`` each group sees the outputs of the groups quantized before it.
    Activation quantization must be off (the caller's job)."""
    groups = adapter.sequential_groups if config.true_sequential else (adapter.all_linears,)
    try:
        _gptq_groups(layer, adapter, config, inputs, index, groups)
    except CalibrationError:
        raise
    except FloatingPointError as exc:  # the math's own checks (non-finite inputs, a singular Hessian)
        raise CalibrationError(f"layer {index}: {exc}") from exc
    finally:
        for m in layer.modules():
            if isinstance(m, QuadLinear):
                m.capture = None


def _hessians(layer: nn.Module, adapter: ArchAdapter, group, inputs: LayerInputs
              ) -> tuple[dict[str, HessianAccumulator], dict[str, str]]:
    """One Hessian per distinct input of the linears ``group`` (keyed by the first linear reading
    it) and, per linear, the key of its Hessian."""
    accs: dict[str, HessianAccumulator] = {}

    def add(owner: str, x: torch.Tensor) -> None:
        if owner not in accs:
            accs[owner] = HessianAccumulator(get_submodule(layer, owner).in_features)
        accs[owner].add(x)

    return accs, capture_group(layer, adapter, group, inputs, add)


def _gptq_groups(layer: nn.Module, adapter: ArchAdapter, config: QuantConfig, inputs: LayerInputs, index: int,
                 groups) -> None:
    for group in groups:
        lins = {name: get_submodule(layer, name) for name in group}
        for name, lin in lins.items():
            _check_group(lin, config, f"layer {index} {name}")
        accs, owner = _hessians(layer, adapter, group, inputs)
        last = {key: name for name, key in owner.items()}  # the last linear reading each Hessian
        for name, lin in lins.items():
            key = owner[name]
            mine = last[key] == name  # it may use the Hessian as its working buffer
            H = (accs.pop(key) if mine else accs[key]).H
            res = gptq_quantize(lin.weight.detach(), H, lin.rank, config.w_bits, config.group_size,
                                config.w_clip, config.act_order, config.damp, config.gptq_block,
                                overwrite_h=mine)
            del H
            _apply(lin, res, config)
        del accs
