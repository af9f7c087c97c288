"""The ``cpu-int4`` backend: quantized linears that read their weights as packed INT4 when decoding.

Decoding a token is bound by memory bandwidth: every weight is read once per token. ``cpu-int8``
keeps the weight codes as int8 (a byte per weight, twice the INT4 checkpoint) for ``torch._int_mm``.
Two INT4 kernels read half a byte per weight:

- where the CPU has AVX512-VNNI and a C++ compiler builds it, :mod:`quadllm.backends.vnni`'s
  ``quadllm::w4a8_mm``: the exact int32 sums of the activation codes and the weight codes, so
  every output equals ``cpu-int8``'s;
- elsewhere (or with ``QUADLLM_INT4_KERNEL=torch``) torch's CPU weight-only INT4 GEMM (``aten._weight_int4pack_mm_for_cpu``) reads half a byte per
weight and expands the nibbles in registers. It computes ``A @ ((w - 8) * s + z)ᵀ`` per group;
with the unsigned nibbles ``w = qw + 8``, ``s = 1`` and ``z = 0`` that is ``A @ qwᵀ``, and with the
per-token activation codes as ``A`` (integers, exact in bfloat16) the result is the integer sum
``Σ_k qx[m, k] qw[n, k]`` of ``cpu-int8``, accumulated in float32 and returned in bfloat16. The
per-token and per-channel scales, the asymmetric zero-point term, the outlier branch and the bias
follow in float32, as in :mod:`quadllm.backends.int8`.

Tolerance: the activation and weight codes are exactly ``fake``'s. With torch's op each integer
sum is rounded to bfloat16 once (a relative error of at most 2^-8, what a bfloat16 model has at every output; its
cost in perplexity is measured by scripts/decode_int4_check.py).

torch's op takes input widths divisible by 32 and output widths divisible by 16: other widths (an
o_proj whose inputs lost ``o_rank`` columns per KV head, an output the outlier rank widened) are
padded with zero weight codes and zero activation codes, which add nothing to any sum, and the
padded outputs are dropped.

The outlier columns: with the VNNI kernels, where the layer's outlier weights are float16 values
(checkpoints store them in float16; a freshly quantized or fine-tuned float32 weight may not be),
``quadllm::f16_mm`` reads a float16 copy (half the bytes of the float32 ``addmm``) with the same
products; only the order of the float32 additions differs. Otherwise the float32 ``addmm``.

For more than ``decode_rows`` rows (prefill) the INT8 GEMM is faster: those go through
``cpu-int8``'s path (which then keeps its own int8 weight layout when ``cache_weights``).
"""

from __future__ import annotations

import logging
from functools import cache
from typing import NamedTuple

import torch

from ..nn.modules import QuadLinear
from .base import Kernel
from .int8 import Int8Kernel, act_codes, asym_act_codes, scale_sums, supports_int8
from .vnni import f16_mm, holds_in_f16, pack_f16, pack_w4, vnni_unavailable_reason, w4a8_mm

__all__ = ["Int4Kernel", "Int4Layout", "VnniLayout", "int4pack_available", "int4pack_group", "pack_for_int4_mm",
           "int4_code_mm", "int4_kernel_name", "int4_mm", "layout_bytes", "pack_codes"]

log = logging.getLogger(__name__)

#: the group sizes the op accepts, largest first (a unit scale makes any dividing one equivalent)
GROUPS = (256, 128, 64, 32)


def int4pack_group(k: int) -> int | None:
    """A group size the op accepts that divides ``k`` (None: the op cannot take this width)."""
    return next((g for g in GROUPS if k % g == 0), None)


class Int4Layout(NamedTuple):
    """A weight in the op's layout: the packed codes, unit scales and zero points [K' / G, N', 2]
    (bfloat16), the group size G, and the zero columns added to the inputs (K' - K; N' - N zero
    rows pad the output, which callers slice back to N)."""

    packed: torch.Tensor
    scale_zero: torch.Tensor
    group: int
    pad_k: int


def pack_for_int4_mm(codes: torch.Tensor, scales: torch.Tensor | None = None) -> Int4Layout:
    """Signed INT4 codes [N, K] (-8..7) in the op's layout, padded with zero codes to N' (a multiple
    of 16) and K' (of 32). Without ``scales`` every scale is 1 (the integer sums, for activation
    codes); with ``scales`` [N, K / G] (one per row and group of G contiguous columns, G a multiple
    of 32) the op computes ``a @ (codes * scales)ᵀ``, the scales rounded to bfloat16 (the op's)."""
    if int(codes.min()) < -8 or int(codes.max()) > 7:
        raise ValueError("INT4 codes must lie in -8..7")
    n, k = codes.shape
    if scales is not None and (scales.dim() != 2 or scales.shape[0] != n or k % scales.shape[1]
                               or (k // scales.shape[1]) % 32):
        raise ValueError(f"scales {tuple(scales.shape)} do not divide codes {(n, k)} into groups of a multiple of 32")
    pad_n, pad_k = -n % 16, -k % 32
    padded = torch.nn.functional.pad(codes.to(torch.int32), (0, pad_k, 0, pad_n))
    group = int4pack_group(k + pad_k) if scales is None else k // scales.shape[1]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((padded + 8).contiguous(), 1)
    scale_zero = torch.zeros((k + pad_k) // group, n + pad_n, 2, dtype=torch.bfloat16)
    scale_zero[..., 0] = 1.0
    if scales is not None:
        scale_zero[:, :n, 0] = scales.t().to(torch.bfloat16)
    return Int4Layout(packed, scale_zero, group, pad_k)


class VnniLayout(NamedTuple):
    """A weight in :func:`quadllm.backends.vnni.pack_w4`'s layout (uint8 [N' / 4, K' / 64, 2, 64]),
    for ``quadllm::w4a8_mm``."""

    packed: torch.Tensor


def pack_codes(codes: torch.Tensor) -> Int4Layout | VnniLayout:
    """Signed INT4 weight codes [N, K] in the layout of the INT4 kernel that runs here: the VNNI
    kernel's where it runs (:func:`quadllm.backends.vnni.vnni_unavailable_reason`), torch's op's
    (unit scales) otherwise."""
    reason = vnni_unavailable_reason()
    if reason is None:
        return VnniLayout(pack_w4(codes))
    _log_fallback(reason)
    return pack_for_int4_mm(codes)


def int4_kernel_name() -> str:
    """Which INT4 kernel cpu-int4's linears run here (recorded with benchmark results)."""
    return "vnni" if vnni_unavailable_reason() is None else "torch-int4pack"


@cache
def _log_fallback(reason: str) -> None:
    log.info("cpu-int4 runs torch's INT4 GEMM (sums rounded to bfloat16): %s", reason)


def layout_bytes(layout: Int4Layout | VnniLayout) -> int:
    """The bytes of a layout's tensors."""
    return sum(t.numel() * t.element_size() for t in layout if isinstance(t, torch.Tensor))


def int4_mm(a: torch.Tensor, layout: Int4Layout, n: int) -> torch.Tensor:
    """``a @ wᵀ`` [M, n] in bfloat16 for inputs ``a`` [M, K] (cast to bfloat16) against the
    weight's ``layout`` (accumulated in float32 by the op)."""
    a = a.to(torch.bfloat16)
    if layout.pad_k:
        a = torch.nn.functional.pad(a, (0, layout.pad_k))
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(a, layout.packed, layout.group, layout.scale_zero)
    return y if y.shape[1] == n else y[:, :n]


def int4_code_mm(codes: torch.Tensor, layout: Int4Layout | VnniLayout, n: int) -> torch.Tensor:
    """``codes @ qwᵀ`` for integer activation codes [M, K] against the weight's :func:`pack_codes`
    layout: the integer sums [M, n], exact in int32 from the VNNI kernel (int8 ``codes``), each
    rounded once to bfloat16 from torch's op (any dtype; exact in bfloat16 up to ±256)."""
    if isinstance(layout, VnniLayout):
        return w4a8_mm(codes, layout.packed, n)
    return int4_mm(codes, layout, n)


@cache
def int4pack_available() -> bool:
    """Whether torch's CPU INT4 GEMM runs here and gives the integer sums (probed once)."""
    try:
        codes = torch.arange(-8, 8, dtype=torch.int8).repeat(16, 2)  # [16, 32]
        got = int4_code_mm(torch.ones(1, 32), pack_for_int4_mm(codes), 16)
        return bool(torch.equal(got.float(), codes.float().sum(1)[None]))
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


class Int4Kernel(Int8Kernel):
    """The ``cpu-int4`` forward of one :class:`QuadLinear`: packed INT4 weights for up to
    ``decode_rows`` rows, ``cpu-int8``'s INT8 GEMM beyond."""

    name = "cpu-int4"
    #: rows (tokens) up to which the INT4 GEMM runs; beyond, the INT8 GEMM is faster
    decode_rows = 32

    @classmethod
    def unavailable_reason(cls) -> str | None:
        vnni_reason = vnni_unavailable_reason()
        if vnni_reason is not None and not int4pack_available():
            return (f"no INT4 kernel runs here (the VNNI kernel: {vnni_reason}; torch's CPU INT4 GEMM "
                    "does not run on this torch build); use cpu-int8")
        return super().unavailable_reason()

    @staticmethod
    def packs(lin: QuadLinear) -> bool:
        """Whether the INT4 GEMM takes ``lin`` (INT4 weights); 8-bit weights run ``cpu-int8``'s
        path at every length."""
        return supports_int8(lin) and lin.w_bits <= 4

    def __init__(self, cache_weights: bool = True) -> None:
        super().__init__(cache_weights)
        self._packed: tuple[tuple, Int4Layout | VnniLayout | None] | None = None
        self._outlier16: tuple[tuple, torch.Tensor | None] | None = None

    def packed(self, lin: QuadLinear) -> Int4Layout | VnniLayout | None:
        """The INT4 kernel's layout of ``lin``'s weight codes (:func:`pack_codes`; the layer's own
        packed codes are in another nibble order), or None for 8-bit weights (:meth:`packs`): found once, and
        again if the weight changes (not checked inside a compiled graph: :meth:`prepare` found it)."""
        if torch.compiler.is_compiling() and self._packed is not None:
            return self._packed[1]
        key = self._weight_key(lin)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_codes(lin.codes()) if self.packs(lin) else None)
        return self._packed[1]

    def outlier16(self, lin: QuadLinear) -> torch.Tensor | None:
        """:func:`quadllm.backends.vnni.pack_f16`'s copy of ``lin``'s outlier weight, or None where
        the VNNI kernels do not run or float16 does not hold it exactly: found once, and again if
        the weight changes (not checked inside a compiled graph, as :meth:`packed`)."""
        if torch.compiler.is_compiling() and self._outlier16 is not None:
            return self._outlier16[1]
        w = lin.w_outlier
        key = (w.data_ptr(), w._version, lin.act.outlier_bits) if w is not None else None
        if self._outlier16 is None or self._outlier16[0] != key:
            copy = None
            if lin.rank and vnni_unavailable_reason() is None:
                weight = lin.outlier_weight().detach()
                copy = pack_f16(weight) if holds_in_f16(weight) else None
            self._outlier16 = (key, copy)
        return self._outlier16[1]

    def prepare_own(self, lin: QuadLinear) -> None:
        super().prepare_own(lin)
        self.packed(lin)
        self.outlier16(lin)

    def extra_bytes(self) -> int:
        layout = None if self._packed is None else self._packed[1]
        own = 0 if layout is None else layout_bytes(layout)
        if self._outlier16 is not None and self._outlier16[1] is not None:
            own += self._outlier16[1].numel() * 2
        return own + super().extra_bytes()

    def own_decode_bytes(self, lin: QuadLinear) -> int:
        layout = self.packed(lin)
        if layout is None:
            return super().own_decode_bytes(lin)
        own = Kernel.decode_weight_bytes(self, lin) - lin.qweight.numel() * lin.qweight.element_size()
        if lin.w_outlier is not None and self.outlier16(lin) is not None:  # read in float16, not as held
            own -= lin.w_outlier.numel() * (lin.w_outlier.element_size() - 2)
        return own + layout_bytes(layout)

    def compute(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        layout = self.packed(lin) if x2.shape[0] <= self.decode_rows else None
        if layout is None:
            return super().compute(lin, x)
        r, n = lin.rank, lin.out_features
        xs = x2 if x2.dtype == torch.float32 else x2.float()
        if lin.act.sym:
            codes, sx = act_codes(xs[:, r:], lin.act.bits, lin.act.clip_ratio)
            y = scale_sums(int4_code_mm(codes, layout, n), sx, lin.scales.reshape(-1))
        else:
            codes, sx, zx = asym_act_codes(xs[:, r:], lin.act.bits, lin.act.clip_ratio)
            y = scale_sums(int4_code_mm(codes, layout, n), sx, lin.scales.reshape(-1), zx, self.weight_sums(lin))
        if r:
            w16 = self.outlier16(lin)
            if w16 is not None:
                y.add_(f16_mm(lin.outlier_input(xs), w16, n))
            else:
                y.addmm_(lin.outlier_input(xs), lin.outlier_weight().t().float())
        if lin.bias is not None:
            y += lin.bias.float()
        return y.to(x.dtype).reshape(*lead, y.shape[-1])
