"""Integer arithmetic for quantized linears (pure functions).

A W4A4 / W4A8 linear computes ``y[m, n] = sx[m] * sw[n] * Σ_k qx[m, k] qw[n, k]`` where ``qx`` are
the per-token activation codes and ``qw`` the INT4 weight codes: both fit in int8, so one INT8
GEMM with int32 accumulation (``torch._int_mm``) does the work and a per-token x per-channel
scale epilogue turns it back into floats. The codes are exactly those of
:func:`quadllm.quantizers.fake_quant_act`, so the result equals the float simulation up to the
float rounding of the simulation's own sums.
"""

from __future__ import annotations

import torch

from ..quantizers import qrange

__all__ = ["act_codes", "int8_linear", "int_mm_available"]


def act_codes(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric codes of ``x`` [M, K]: (int8 codes [M, K], float scales [M, 1]) with
    ``x ≈ codes * scales``, identical to what :func:`fake_quant_act` rounds to."""
    if bits > 8:
        raise ValueError(f"integer activations need at most 8 bits, got {bits}")
    qmin, qmax = qrange(bits)
    lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
    scale = (torch.maximum(hi, -lo) * clip_ratio / qmax).clamp_min(1e-8)
    return (x / scale).round_().clamp_(qmin, qmax).to(torch.int8), scale


def int8_linear(codes: torch.Tensor, act_scale: torch.Tensor, weight_t: torch.Tensor,
                weight_scale: torch.Tensor) -> torch.Tensor:
    """``(codes @ weight_t) * act_scale * weight_scale`` with int32 accumulation.

    ``codes`` int8 [M, K], ``act_scale`` [M, 1], ``weight_t`` int8 [K, N] (the transposed weight
    codes, contiguous), ``weight_scale`` [N] (per output channel). Returns float [M, N] in the
    dtype of ``act_scale``.
    """
    acc = torch._int_mm(codes, weight_t)
    return acc.to(act_scale.dtype).mul_(act_scale).mul_(weight_scale.to(act_scale.dtype))


def int_mm_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch._int_mm`` runs here (it needs M > 16 on some builds: probe with 32)."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        return bool(torch._int_mm(a, a)[0, 0] == 32)
    except (RuntimeError, NotImplementedError):
        return False
