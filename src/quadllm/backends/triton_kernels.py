"""Triton kernels of the ``gpu`` backend (imported only when Triton is installed).

- :func:`quantize_rows`: per-token dynamic symmetric quantization, one program per row: the row's
  max |x| in one sweep, the int8 codes in a second (exactly :func:`quadllm.backends.int8.act_codes`:
  same scale formula, round half to even, same clamp).
- :func:`transform_quantize_rows`: the same codes of ``x @ kron(A, B)ᵀ`` (an online Hadamard or
  head mixing, :class:`quadllm.backends.gpu.FusedTransform`) without writing the transformed
  row: each program reads one row as an [A, B] tile, multiplies it by Bᵀ in [16, B] slices and
  by A on the left (float32 ``tl.dot``), and takes the max and the codes from registers. The row
  costs one read and one int8 write instead of a float write and two more reads.
- :func:`w4a8_linear`: ``y = (codes @ W_int4ᵀ) * sx * sw + x_outlier @ w_outlierᵀ + bias`` in one
  kernel. INT8 tensor cores do the quantized part with int32 accumulation; the packed INT4 weight
  bytes are loaded once and unpacked in registers (low nibble = even input column, high nibble =
  odd), so the activation codes are read as their even and odd columns and two INT8 dots per
  K step cover both nibbles (Hopper has no INT4 tensor cores; W4A4 and W4A8 activations both
  fit in int8). The full-precision outlier columns are a second, float loop in the same program
  and are added in the epilogue, so the outlier branch costs no extra launch or output pass.

With ``TRITON_INTERPRET=1`` Triton runs these kernels on the CPU (slowly, with NumPy), which is
how the tests check them on a machine without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quantize_rows", "transform_quantize_rows", "w4a8_linear"]

@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, clip, QMAX: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, K, BLOCK):
        m = k + offs < K
        v = tl.load(x_ptr + row * stride_x + k + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.max(amax, axis=0) * clip / QMAX
    scale = tl.maximum(scale, 1e-8)
    for k in range(0, K, BLOCK):
        m = k + offs < K
        v = tl.load(x_ptr + row * stride_x + k + offs, mask=m, other=0.0).to(tl.float32)
        q = (v / scale + 12582912.0) - 12582912.0  # 1.5 * 2**23: rounds |v| < 2**22 half to even
        q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
        tl.store(q_ptr + row * stride_q + k + offs, q.to(tl.int8), mask=m)
    tl.store(s_ptr + row, scale)


def _rows_and_outputs(x: torch.Tensor, bits: int, what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Checks of a per-row quantizer's input; ``x`` with unit column stride, the int8 codes [M, K]
    and the float32 scales [M, 1] to fill."""
    if x.dim() != 2:
        raise ValueError(f"{what} expects a 2-d tensor, got shape {tuple(x.shape)}")
    if not 2 <= bits <= 8:
        raise ValueError(f"integer activations need 2 to 8 bits, got {bits}")
    if x.shape[1] and x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    return (x, torch.empty(m, k, dtype=torch.int8, device=x.device),
            torch.empty(m, 1, dtype=torch.float32, device=x.device))


def quantize_rows(x: torch.Tensor, bits: int, clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes of ``x`` [M, K]: (int8 [M, K], float32 scales [M, 1]), as ``act_codes``."""
    x, q, s = _rows_and_outputs(x, bits, "quantize_rows")
    m, k = x.shape
    if m:
        block = min(triton.next_power_of_2(max(k, 16)), 4096)
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), float(clip_ratio),
                                    QMAX=2 ** (bits - 1) - 1, BLOCK=block)
    return q, s


@triton.jit
def _transform_quantize_kernel(x_ptr, a_ptr, b_ptr, q_ptr, s_ptr, stride_x, stride_q, clip,
                               A: tl.constexpr, AP: tl.constexpr, B: tl.constexpr, BK: tl.constexpr,
                               HAS_A: tl.constexpr, HAS_B: tl.constexpr, QMAX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ra = tl.arange(0, AP)
    rb = tl.arange(0, B)
    am = ra < A
    xrow = x_ptr + row * stride_x
    if HAS_B:
        rk = tl.arange(0, BK)
        y = tl.zeros((AP, B), dtype=tl.float32)
        for k0 in range(0, B, BK):
            xk = tl.load(xrow + ra[:, None] * B + k0 + rk[None, :], mask=am[:, None], other=0.0).to(tl.float32)
            bt = tl.load(b_ptr + rb[None, :] * B + k0 + rk[:, None])  # [BK, B]: Bᵀ[k, j] = B[j, k]
            y += tl.dot(xk, bt, input_precision="ieee")
    else:
        y = tl.load(xrow + ra[:, None] * B + rb[None, :], mask=am[:, None], other=0.0).to(tl.float32)
    if HAS_A:
        a = tl.load(a_ptr + ra[:, None] * A + ra[None, :], mask=am[:, None] & am[None, :], other=0.0)
        y = tl.dot(a, y, input_precision="ieee")  # padded rows of A are zero: they add nothing to the max
    scale = tl.max(tl.max(tl.abs(y), axis=1), axis=0) * clip / QMAX
    scale = tl.maximum(scale, 1e-8)
    q = (y / scale + 12582912.0) - 12582912.0
    q = tl.minimum(tl.maximum(q, -QMAX - 1.0), QMAX * 1.0)
    tl.store(q_ptr + row * stride_q + ra[:, None] * B + rb[None, :], q.to(tl.int8), mask=am[:, None])
    tl.store(s_ptr + row, scale)


def transform_quantize_rows(x: torch.Tensor, plan, bits: int,
                            clip_ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row codes of ``x @ kron(plan.a, plan.b)ᵀ`` ([M, K] with K = a_order * b_order), as
    :func:`quantize_rows` of the transformed rows (up to float32 rounding of the transform)."""
    x, q, s = _rows_and_outputs(x, bits, "transform_quantize_rows")
    a_order, b_order = plan.a_order, plan.b_order
    if x.shape[1] != a_order * b_order:
        raise ValueError(f"rows of {x.shape[1]} do not match the transform's order {a_order} x {b_order}")
    m = x.shape[0]
    if m:
        a = plan.a if plan.a is not None else s
        b = plan.b if plan.b is not None else s
        tile = plan.padded_a * b_order
        # the whole [A, B] tile lives in registers: more warps for larger tiles (about 64 values
        # per thread at the largest); a guess until it is tuned on a device (scripts/gpu_check.py)
        warps = 4 if tile <= 4096 else (8 if tile <= 8192 else 16)
        _transform_quantize_kernel[(m,)](x, a, b, q, s, x.stride(0), q.stride(0), float(clip_ratio),
                                         A=a_order, AP=plan.padded_a, B=b_order, BK=16,
                                         HAS_A=plan.a is not None, HAS_B=plan.b is not None,
                                         QMAX=2 ** (bits - 1) - 1, num_warps=warps)
    return q, s


@triton.jit
def _w4a8_kernel(a_ptr, w_ptr, sx_ptr, sw_ptr, xo_ptr, wo_ptr, b_ptr, y_ptr,
                 M, N, K, R,
                 stride_am, stride_wn, stride_xom, stride_won, stride_ym,
                 HAS_OUTLIER: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    HALF: tl.constexpr = BK // 2
    rj = tl.arange(0, HALF)  # packed byte index within the K step
    acc = tl.zeros((BM, BN), dtype=tl.int32)
    K2 = K // 2
    for k0 in range(0, K2, HALF):
        j = k0 + rj
        jm = j < K2
        # weight bytes [HALF, BN]: byte j of output channel n holds columns 2j (low) and 2j+1 (high)
        p = tl.load(w_ptr + rn[None, :] * stride_wn + j[:, None], mask=jm[:, None] & (rn[None, :] < N),
                    other=0).to(tl.int32)
        lo = ((p & 0xF) ^ 8) - 8
        hi = ((p >> 4) ^ 8) - 8
        a_even = tl.load(a_ptr + rm[:, None] * stride_am + 2 * j[None, :], mask=(rm[:, None] < M) & jm[None, :],
                         other=0)
        a_odd = tl.load(a_ptr + rm[:, None] * stride_am + 2 * j[None, :] + 1,
                        mask=(rm[:, None] < M) & jm[None, :], other=0)
        acc += tl.dot(a_even, lo.to(tl.int8))
        acc += tl.dot(a_odd, hi.to(tl.int8))
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    if HAS_OUTLIER:
        rr = tl.arange(0, BR)
        for r0 in range(0, R, BR):
            cr = r0 + rr
            xo = tl.load(xo_ptr + rm[:, None] * stride_xom + cr[None, :], mask=(rm[:, None] < M) & (cr[None, :] < R),
                         other=0.0).to(tl.float32)
            wo = tl.load(wo_ptr + rn[None, :] * stride_won + cr[:, None], mask=(cr[:, None] < R) & (rn[None, :] < N),
                         other=0.0).to(tl.float32)
            y += tl.dot(xo, wo, input_precision="ieee")
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def w4a8_linear(codes: torch.Tensor, act_scale: torch.Tensor, qweight: torch.Tensor, weight_scale: torch.Tensor,
                x_outlier: torch.Tensor | None = None, w_outlier: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                block: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``(codes @ unpack(qweight)ᵀ) * act_scale * weight_scale (+ x_outlier @ w_outlierᵀ) (+ bias)``.

    ``codes`` int8 [M, K] (K even), ``act_scale`` [M, 1], ``qweight`` uint8 [N, K/2] (packed INT4,
    :func:`quadllm.core.quantizers.pack_int4`), ``weight_scale`` [N] or [N, 1] (per output channel),
    ``x_outlier`` [M, R] and ``w_outlier`` [N, R] (float), ``bias`` [N]. Returns [M, N] in ``out_dtype``.
    ``block``: (BM, BN, BK) tile sizes (default: by problem size).
    """
    m, k = codes.shape
    n = qweight.shape[0]
    if codes.dtype != torch.int8 or qweight.dtype != torch.uint8:
        raise TypeError(f"expected int8 codes and uint8 packed weights, got {codes.dtype}, {qweight.dtype}")
    if k % 2 or qweight.shape[1] != k // 2:
        raise ValueError(f"codes [M, {k}] do not match packed weights {tuple(qweight.shape)} (K must be even)")
    if weight_scale.numel() != n or act_scale.numel() != m:
        raise ValueError("one weight scale per output channel and one activation scale per row are required")
    has_outlier = x_outlier is not None and x_outlier.shape[-1] > 0
    if has_outlier and (w_outlier is None or x_outlier.shape != (m, w_outlier.shape[1]) or w_outlier.shape[0] != n):
        raise ValueError("x_outlier [M, R] and w_outlier [N, R] do not match")
    codes, qweight = codes.contiguous(), qweight.contiguous()
    sx = act_scale.reshape(m).float().contiguous()
    sw = weight_scale.reshape(n).contiguous()
    xo = (x_outlier if x_outlier.stride(1) == 1 else x_outlier.contiguous()) if has_outlier else sx
    wo = w_outlier.contiguous() if has_outlier else sw
    y = torch.empty(m, n, dtype=out_dtype, device=codes.device)
    if m == 0 or n == 0:
        return y
    if block is None:
        bm = 16 if m <= 16 else (32 if m <= 32 else 64)
        block = (bm, 64, 64)
    bm, bn, bk = block
    r = xo.shape[1] if has_outlier else 0
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _w4a8_kernel[grid](codes, qweight, sx, sw, xo, wo, bias if bias is not None else sw, y,
                       m, n, k, r,
                       codes.stride(0), qweight.stride(0), xo.stride(0) if has_outlier else 0,
                       wo.stride(0) if has_outlier else 0, y.stride(0),
                       HAS_OUTLIER=has_outlier, HAS_BIAS=bias is not None,
                       BM=bm, BN=bn, BK=bk, BR=16 if r <= 16 else 32)
    return y
