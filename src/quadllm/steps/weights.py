"""Weight quantization of one decoder layer's linears: RTN, or GPTQ / GPTAQ on the layer's inputs.

GPTQ runs one decoder layer at a time: the layer's inputs are the outputs of the layers before
it *after* their quantization, so memory holds one layer's activations, never the model's.
Activation quantization is off while calibrating (as in QuaRot); the outlier columns stay in
full precision and absorb part of the rounding error (see :mod:`quadllm.core.gptq`).

GPTAQ also needs, for every linear, its input in the full-precision model on the same tokens:
``reference_layer`` (the layer before its weights are quantized) runs on ``inputs.reference`` (the
full-precision model's hidden states) and its inputs are paired, batch by batch, with the
quantized model's.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..config import ConfigError, QuantConfig
from ..core.gptq import CrossAccumulator, HessianAccumulator, gptaq_target, gptq_quantize, rtn_quantize
from ..core.quantizers import fake_quant_weight
from ..nn.modules import QuadLinear
from .calibration import CalibrationError, LayerInputs, capture_group
from .transforms import weight_quantized_names

log = logging.getLogger(__name__)


def _apply(lin: QuadLinear, result, config: QuantConfig) -> None:
    fp = result.fp_columns
    if lin.act.outlier_bits < 16:  # INT8 outlier columns (--o-rank-bits 8): their weights on that grid too
        fp = fake_quant_weight(fp, lin.act.outlier_bits)
    lin.set_quantized(result.codes, result.scales, fp, config.w_bits, config.group_size)


def _check_group(lin: QuadLinear, config: QuantConfig, name: str) -> None:
    nq = lin.in_features - lin.rank
    if config.group_size and nq % config.group_size:
        raise ConfigError(f"{name}: {nq} quantized input columns are not a multiple of --group-size "
                         f"{config.group_size}")


@torch.no_grad()
def rtn_layer(layer: nn.Module, adapter: ArchAdapter, config: QuantConfig, index: int, *,
              clips: dict[str, torch.Tensor] | None = None) -> None:
    """Round-to-nearest for every linear of one decoder layer; ``clips``: each linear's weight clip
    ratios [out, G] (learned) in place of the search."""
    for name in weight_quantized_names(adapter, config, index):
        lin: QuadLinear = get_submodule(layer, name)
        _check_group(lin, config, f"layer {index} {name}")
        _apply(lin, rtn_quantize(lin.weight.detach(), lin.rank, config.w_bits, config.group_size,
                                 config.w_clip, (clips or {}).get(name)), config)


@torch.no_grad()
def gptq_layer(layer: nn.Module, adapter: ArchAdapter, config: QuantConfig, inputs: LayerInputs,
               index: int, reference_layer: nn.Module | None = None, *,
               clips: dict[str, torch.Tensor] | None = None) -> None:
    """GPTQ for every linear of one decoder layer, calibrated on ``inputs`` (the layer's inputs);
    with ``config.true_sequential`` each group sees the outputs of the groups quantized before it.
    With ``reference_layer`` (and ``inputs.reference``) the target is GPTAQ's: the full-precision
    layer's outputs on the full-precision model's inputs. ``clips``: each linear's weight clip
    ratios [out, G] (learned) in place of the search. Activation quantization must be off (the
    caller's job)."""
    groups = adapter.sequential_groups if config.true_sequential else (adapter.all_linears,)
    if reference_layer is not None and inputs.reference is None:
        raise ValueError("GPTAQ needs the full-precision model's hidden states (inputs.reference)")
    try:
        _gptq_groups(layer, adapter, config, inputs, index, groups, reference_layer, clips or {})
    except CalibrationError:
        raise
    except FloatingPointError as exc:  # the math's own checks (non-finite inputs, a singular Hessian)
        raise CalibrationError(f"layer {index}: {exc}") from exc
    finally:
        for m in [*layer.modules(), *(reference_layer.modules() if reference_layer is not None else ())]:
            if isinstance(m, QuadLinear):
                m.capture = None


def _hessians(layer: nn.Module, adapter: ArchAdapter, group, inputs: LayerInputs,
              reference_layer: nn.Module | None = None
              ) -> tuple[dict[str, HessianAccumulator], dict[str, str], dict[str, CrossAccumulator]]:
    """One Hessian per distinct input of the linears ``group`` (keyed by the first linear reading
    it), per linear the key of its Hessian, and (GPTAQ, with ``reference_layer``) per key the
    cross moment of the full-precision and the quantized inputs."""
    accs: dict[str, HessianAccumulator] = {}
    cross: dict[str, CrossAccumulator] = {}
    ref: dict[str, list[torch.Tensor]] = {}
    seen: dict[str, int] = {}
    if reference_layer is not None:
        ref_inputs = LayerInputs(inputs.reference, inputs.kwargs)
        capture_group(reference_layer, adapter, group, ref_inputs,
                      lambda owner, x: ref.setdefault(owner, []).append(x.detach().clone()))

    def add(owner: str, x: torch.Tensor) -> None:
        if owner not in accs:
            accs[owner] = HessianAccumulator(get_submodule(layer, owner).in_features)
        accs[owner].add(x)
        if reference_layer is not None:
            i = seen.get(owner, 0)
            seen[owner] = i + 1
            cross.setdefault(owner, CrossAccumulator(x.shape[-1])).add(ref[owner][i], x)
            ref[owner][i] = None  # paired: free it

    return accs, capture_group(layer, adapter, group, inputs, add), cross


def _gptq_groups(layer: nn.Module, adapter: ArchAdapter, config: QuantConfig, inputs: LayerInputs, index: int,
                 groups, reference_layer: nn.Module | None, clips: dict[str, torch.Tensor]) -> None:
    for group in groups:
        group = weight_quantized_names(adapter, config, index, tuple(group))
        if not group:
            continue
        lins = {name: get_submodule(layer, name) for name in group}
        for name, lin in lins.items():
            _check_group(lin, config, f"layer {index} {name}")
        accs, owner, cross = _hessians(layer, adapter, group, inputs, reference_layer)
        last = {key: name for name, key in owner.items()}  # the last linear reading each Hessian
        for name, lin in lins.items():
            key = owner[name]
            mine = last[key] == name  # it may use the Hessian as its working buffer
            H = (accs.pop(key) if mine else accs[key]).H
            w = lin.weight.detach()
            if reference_layer is not None:
                w = gptaq_target(w, H, cross[key].C, config.damp, config.gptaq_alpha).to(w.dtype)
            res = gptq_quantize(w, H, lin.rank, config.w_bits, config.group_size,
                                config.w_clip, config.act_order, config.damp, config.gptq_block,
                                overwrite_h=mine, clip=clips.get(name))
            del H
            _apply(lin, res, config)
        del accs
