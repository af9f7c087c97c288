"""Quantizers as pure functions: weight scales (with MSE clipping search), fake quantization
of weights, per-token activations and KV heads, and INT4 packing.

Conventions: symmetric signed integers with ``qmax = 2**(bits-1) - 1`` and
``qmin = -(qmax + 1)`` (INT4: -8..7), ``x ≈ q * scale``; the asymmetric grids (KV cache, and
activations with ``--act-asym``) use ``0..2**bits - 1`` with a zero point. Scales are per output channel
(``group_size == 0``) or per contiguous group of ``group_size`` input columns.
"""

from __future__ import annotations

import torch

__all__ = [
    "qrange",
    "weight_scales",
    "weight_clip_ratios",
    "clipped_scales",
    "quantize_weight",
    "dequantize_weight",
    "row_absmax",
    "fake_quant_act",
    "fake_quant_weight",
    "asym_params",
    "fake_quant_asym",
    "ste_round",
    "fake_quant_kv",
    "pack_int4",
    "unpack_int4",
]


def qrange(bits: int) -> tuple[int, int]:
    """(qmin, qmax) of a signed symmetric ``bits``-bit integer."""
    qmax = 2 ** (bits - 1) - 1
    return -(qmax + 1), qmax


def _group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, g]."""
    out, inp = w.shape
    g = group_size or inp
    if inp % g:
        raise ValueError(f"input size {inp} is not a multiple of group size {g}")
    return w.reshape(out, inp // g, g)


#: Elements of the weight handled at once by the clipping search (bounds its temporaries).
_SEARCH_BLOCK = 1 << 21
#: Relative margin within which float32 screening cannot rank two clipping candidates; such rows
#: are searched again in the weight's own precision (float32 sums of a few thousand terms are
#: accurate to about 1e-6).
_SCREEN_RTOL = 1e-4


def weight_scales(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int = 0,
    mse: bool = True,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
) -> torch.Tensor:
    """Symmetric scales, shape [out, n_groups].

    Without ``mse`` the scale maps the largest magnitude of each row (group) to ``qmax``.
    With ``mse`` (GPTQ's clipping search) the range is shrunk by factors
    ``1 - i/grid`` for ``i < max_shrink*grid`` and the factor minimising
    ``sum |Q(w) - w|**norm`` is kept per row (group); the first one on ties.

    The search runs over blocks of rows. A float64 weight is screened in float32, which is
    several times faster; rows whose best candidates lie within ``_SCREEN_RTOL`` of each other
    are searched again in float64, so the result equals a float64 search.
    """
    _, qmax = qrange(bits)
    wg = _group_view(w.float() if w.dtype in (torch.float16, torch.bfloat16) else w, group_size)
    wmax = wg.abs().amax(dim=-1).clamp_min(1e-12)  # [out, G]
    if not mse:
        return wmax / qmax
    shrink = torch.tensor([1.0 - i / grid for i in range(int(max_shrink * grid))], dtype=wg.dtype)
    flat, fmax = wg.reshape(-1, wg.shape[-1]), wmax.reshape(-1)
    idx = torch.empty(fmax.shape, dtype=torch.long)
    rows = max(1, _SEARCH_BLOCK // flat.shape[1])
    for r in range(0, flat.shape[0], rows):
        blk, bmax = flat[r:r + rows], fmax[r:r + rows]
        if blk.dtype != torch.float64:
            idx[r:r + rows] = _clip_errors(blk, bmax, shrink, bits, norm).argmin(-1)
            continue
        err = _clip_errors(blk.float(), bmax.float(), shrink.float(), bits, norm)
        best = err.amin(-1, keepdim=True)
        close = (err <= best * (1 + _SCREEN_RTOL)).sum(-1) > 1
        choice = err.argmin(-1)
        if bool(close.any()):
            choice[close] = _clip_errors(blk[close], bmax[close], shrink, bits, norm).argmin(-1)
        idx[r:r + rows] = choice
    return (shrink[idx] * fmax / qmax).reshape(wmax.shape)


def weight_clip_ratios(w: torch.Tensor, bits: int = 4, group_size: int = 0, mse: bool = True) -> torch.Tensor:
    """Each row's (group's) clip ratio [out, G]: its :func:`weight_scales` over its absmax scale
    (1 without ``mse``), the start of a learned weight clip."""
    return weight_scales(w, bits, group_size, mse) / weight_scales(w, bits, group_size, mse=False)


def clipped_scales(w: torch.Tensor, ratio: torch.Tensor, bits: int = 4, group_size: int = 0) -> torch.Tensor:
    """Scales [out, G] that map ``ratio`` [out, G] times the largest magnitude of each row (group)
    of ``w`` to ``qmax``: the weight clip given instead of searched (differentiable in ``ratio``)."""
    _, qmax = qrange(bits)
    wmax = _group_view(w, group_size).abs().amax(dim=-1).clamp_min(1e-12)
    return ratio.to(wmax.dtype) * wmax / qmax


def _clip_errors(wg: torch.Tensor, wmax: torch.Tensor, shrink: torch.Tensor, bits: int, norm: float
                 ) -> torch.Tensor:
    """``sum |Q(w) - w|**norm`` over each row of ``wg`` [R, g] for the scales ``p * wmax / qmax``
    of every shrink factor ``p``: [R, len(shrink)]."""
    _, qmax = qrange(bits)
    err = torch.empty(wg.shape[0], len(shrink), dtype=wg.dtype)
    for i, p in enumerate(shrink):
        s = (p * wmax / qmax).unsqueeze(-1)
        err[:, i] = (_fq(wg, s, bits) - wg).abs().pow(norm).sum(-1)
    return err


def _fq(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x / scale), qmin, qmax) * scale


def quantize_weight(w: torch.Tensor, scales: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """Integer codes (int8 tensor, values in [qmin, qmax]) of ``w`` [out, in] for ``scales`` [out, G]."""
    qmin, qmax = qrange(bits)
    out, inp = w.shape
    g = inp // scales.shape[1]
    q = torch.round(w.reshape(out, -1, g) / scales.unsqueeze(-1).to(w.dtype))
    return torch.clamp(q, qmin, qmax).reshape(out, inp).to(torch.int8)


def dequantize_weight(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float weight [out, in] from codes ``q`` and ``scales`` [out, G]."""
    out, inp = q.shape
    g = inp // scales.shape[1]
    return (q.to(dtype).reshape(out, -1, g) * scales.to(dtype).unsqueeze(-1)).reshape(out, inp)


def fake_quant_weight(w: torch.Tensor, bits: int = 4, group_size: int = 0,
                      ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize of ``w`` [out, in] with absmax scales per output channel
    (or per group of ``group_size`` input columns), or with :func:`clipped_scales` for a clip
    ``ratio`` [out, G]. When ``w`` or ``ratio`` needs a gradient, the rounding is a straight-through
    estimator and the gradient also flows through the scales (training a transform or the clip
    with the weight quantizer in the loop, :mod:`quadllm.steps.learned_transform`,
    :mod:`quadllm.steps.learned_weight_clip`): a weight that saturates passes its gradient to
    ``ratio`` only, as LSQ's and OmniQuant's learned clipping do."""
    qmin, qmax = qrange(bits)
    wg = _group_view(w, group_size)
    scale = (weight_scales(w, bits, group_size, mse=False) if ratio is None else
             clipped_scales(w, ratio, bits, group_size)).to(w.dtype).unsqueeze(-1)
    q = wg / scale
    q = ste_round(q) if torch.is_grad_enabled() and q.requires_grad else torch.round(q)
    return (torch.clamp(q, qmin, qmax) * scale).reshape(w.shape)


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """``max |x|`` over the last dimension (keepdim), without a full-size ``|x|`` temporary.

    Taken as ``max(amax(x), -amin(x))``: two vectorized reductions, which on CPU are many times
    faster than ``torch.aminmax`` along the last dimension (torch 2.13)."""
    return torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg())


def fake_quant_act(x: torch.Tensor, bits: int, clip_ratio: float | torch.Tensor = 1.0,
                   sym: bool = True) -> torch.Tensor:
    """Per-token (last dimension) dynamic quantize-dequantize.

    Symmetric (``sym``): ``scale = clip_ratio * max|x| / qmax``; values beyond the clipped range
    saturate. Asymmetric: :func:`fake_quant_asym`, a grid over the token's clipped
    ``[min, max]`` with an integer zero point.
    When ``x`` requires a gradient the rounding is a straight-through estimator: the gradient
    passes unchanged through ``round`` inside the clipping range and is zero outside it
    (values that saturate), and it also flows through the dynamic scale, and so to ``clip_ratio``
    when that is a tensor that needs one (the learned clip, LSQ's gradient).
    """
    if bits >= 16:
        return x
    if not sym:
        return fake_quant_asym(x, bits, clip_ratio)
    qmin, qmax = qrange(bits)
    scale = (row_absmax(x) * clip_ratio / qmax).clamp_min(1e-8)
    q = x / scale
    if torch.is_grad_enabled() and q.requires_grad:
        return torch.clamp(ste_round(q), qmin, qmax) * scale
    return q.round_().clamp_(qmin, qmax).mul_(scale)  # in place: same values, fewer allocations


def asym_params(x: torch.Tensor, bits: int, clip_ratio: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dimension) ``(scale, zero)`` of the asymmetric grid: ``2**bits`` levels over
    ``[min, max] * clip_ratio``, ``zero = round(-min * clip_ratio / scale)`` (an integer, kept as a
    float); ``x ≈ (clamp(round(x / scale) + zero, 0, 2**bits - 1) - zero) * scale``."""
    levels = 2**bits - 1
    xmax = x.amax(dim=-1, keepdim=True) * clip_ratio
    xmin = x.amin(dim=-1, keepdim=True) * clip_ratio
    scale = ((xmax - xmin) / levels).clamp_min(1e-8)
    return scale, torch.round(-xmin / scale)


def fake_quant_asym(x: torch.Tensor, bits: int, clip_ratio: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Asymmetric per-row quantize-dequantize on the grid of :func:`asym_params` (the min and max
    therefore move by up to scale/2); a straight-through estimator when ``x`` needs a gradient."""
    if bits >= 16:
        return x
    scale, zero = asym_params(x, bits, clip_ratio)
    r = x / scale
    q = torch.clamp((ste_round(r) if torch.is_grad_enabled() and r.requires_grad else torch.round(r)) + zero,
                    0, 2**bits - 1)
    return (q - zero) * scale


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fake_quant_kv(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> torch.Tensor:
    """Asymmetric per-token, per-head quantize-dequantize of a KV tensor [..., head_dim]
    (:func:`fake_quant_asym`), as QuaRot does for the KV cache. The attention always quantizes the
    raw cached values, so repeated application never happens."""
    return fake_quant_asym(x, bits, clip_ratio)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] of shape [out, in] into uint8 [out, ceil(in/2)]:
    column ``2j`` in the low nibble, ``2j+1`` in the high nibble (two's complement)."""
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 codes, got {q.dtype}")
    if q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise ValueError("pack_int4: codes outside [-8, 7]")
    out, inp = q.shape
    if inp % 2:
        q = torch.cat([q, q.new_zeros(out, 1)], dim=1)
    u = (q.to(torch.int16) & 0xF).to(torch.uint8)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 [out, ceil(in/2)] -> int8 codes [out, in_features]."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_int4 expects uint8, got {packed.dtype}")
    lo = (packed & 0xF).to(torch.int8)
    hi = (packed >> 4).to(torch.int8)
    lo = torch.where(lo > 7, lo - 16, lo)
    hi = torch.where(hi > 7, hi - 16, hi)
    out = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)
    return out[:, :in_features].contiguous()
