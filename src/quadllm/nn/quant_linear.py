"""A linear map with packed integer weights whose backward pass never keeps a float weight.

``quant_linear(x, qweight, scales, ...)`` computes ``x @ (codes * scales)ᵀ`` where ``codes`` are
the stored INT4 (packed two per byte) or INT8 integers. Autograd saves only the input, the
packed codes and the scales; the backward pass dequantizes the weight again, so training holds
one layer's float weight at a time instead of a full-precision copy of the model.

Gradients: to the input (``g @ W``) and, when ``scales`` requires it, to the scales
(``∂L/∂s[o, j] = Σ_{i in group j} (gᵀx)[o, i] · codes[o, i]``). The integer codes are fixed
(they are not trained), so the scale gradient is exact, not an estimate.
"""

from __future__ import annotations

import torch

from ..core.quantizers import dequantize_weight, unpack_int4

__all__ = ["weight_codes", "quant_linear"]


def weight_codes(qweight: torch.Tensor, in_features: int, bits: int) -> torch.Tensor:
    """Integer codes [out, in_features] of a stored quantized weight."""
    return unpack_int4(qweight, in_features) if bits <= 4 else qweight


class _QuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                bits: int) -> torch.Tensor:
        w = dequantize_weight(weight_codes(qweight, in_features, bits), scales, x.dtype)
        ctx.save_for_backward(x, qweight, scales)
        ctx.in_features = in_features
        ctx.bits = bits
        return x @ w.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, qweight, scales = ctx.saved_tensors
        codes = weight_codes(qweight, ctx.in_features, ctx.bits)
        grad_x = grad_s = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ dequantize_weight(codes, scales, grad.dtype)
        if ctx.needs_input_grad[2]:
            out, inp = codes.shape
            g_w = grad.reshape(-1, out).t() @ x.reshape(-1, inp)  # [out, in], freed right after
            groups = scales.shape[1]
            grad_s = (g_w * codes.to(g_w.dtype)).reshape(out, groups, inp // groups).sum(-1).to(scales.dtype)
        return grad_x, None, grad_s, None, None


def quant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, in_features: int,
                 bits: int) -> torch.Tensor:
    """``x @ (codes * scales)ᵀ`` for ``x`` [..., in_features]; differentiable in ``x`` and ``scales``."""
    return _QuantLinear.apply(x, qweight, scales, in_features, bits)
