"""SmoothRot-style channel scaling of down_proj's input (``--down-smooth ALPHA``).

down_proj reads ``m = act(gate(x)) * up(x)``; a few intermediate channels carry huge values for a
few tokens. Dividing channel ``j`` of ``m`` by ``s_j`` (fused into up_proj's row ``j``, since ``m``
is linear in ``up(x)``) and multiplying down_proj's column ``j`` by ``s_j`` changes nothing, and with
SmoothQuant's ``s_j = max|m_j|^α / max|W_:j|^(1-α)`` the online Hadamard before down_proj then
spreads a flatter input. The scales come from the layer's calibration inputs (activation
quantization off), before its weights are quantized; nothing is added at run time.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule
from ..core.quantizers import row_absmax
from ..nn.modules import QuadLinear
from .calibration import LayerInputs, capture_group

log = logging.getLogger(__name__)

__all__ = ["smoothing_scales", "smooth_down_proj"]


def smoothing_scales(act_max: torch.Tensor, weight_max: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s = act_max^α / weight_max^(1-α)`` per channel (float64), normalized to a
    geometric mean of 1 (an overall factor changes nothing but the numbers' range); channels that
    never fire keep 1."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a = act_max.to(torch.float64)
    w = weight_max.to(torch.float64)
    live = (a > 0) & (w > 0)
    s = torch.ones_like(a)
    s[live] = a[live].pow(alpha) / w[live].pow(1 - alpha)
    s[live] /= torch.exp(torch.log(s[live]).mean())
    return s


@torch.no_grad()
def smooth_down_proj(layer: nn.Module, adapter: ArchAdapter, inputs: LayerInputs, alpha: float,
                     index: int) -> torch.Tensor:
    """Scale ``layer``'s down_proj input channels (up_proj's rows ``/ s``, down_proj's columns
    ``* s``) with :func:`smoothing_scales` measured on ``inputs``; returns ``s``. down_proj must be
    float with its online transform (if any) fused, and not yet split."""
    down: QuadLinear = get_submodule(layer, adapter.down_proj)
    up: QuadLinear = get_submodule(layer, adapter.up_proj)
    if down.quantized or up.quantized or down.rank:
        raise ValueError("smoothing needs float up_proj and down_proj, before down_proj is split")
    n = up.out_features
    T = down.transform.dense().to(torch.float64) if down.transform is not None else None
    act_max = torch.zeros(n, dtype=torch.float64)

    def keep(_owner: str, z: torch.Tensor) -> None:
        m = z.detach().reshape(-1, z.shape[-1]).to(torch.float64)
        if T is not None:
            m = m @ T  # back to the channels before the online transform (z = m Tᵀ)
        act_max.copy_(torch.maximum(act_max, row_absmax(m.T).squeeze(-1)))

    capture_group(layer, adapter, [adapter.down_proj], inputs, keep)
    w = down.weight.detach().to(torch.float64)
    w_orig = w @ T if T is not None else w  # down_proj's weight on the untransformed input
    s = smoothing_scales(act_max, row_absmax(w_orig.T).squeeze(-1), alpha)
    w_new = w_orig * s.unsqueeze(0)
    down.weight.data.copy_((w_new @ T.T if T is not None else w_new).to(down.weight.dtype))
    up.weight.data.copy_((up.weight.detach().to(torch.float64) / s.unsqueeze(1)).to(up.weight.dtype))
    if up.bias is not None:
        up.bias.data.copy_((up.bias.detach().to(torch.float64) / s).to(up.bias.dtype))
    down.drop_dequantized()
    up.drop_dequantized()
    log.debug("layer %d: down_proj input smoothed (scales %.3g..%.3g)", index, float(s.min()), float(s.max()))
    return s
