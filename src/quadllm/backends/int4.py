"""The ``cpu-int4`` backend: quantized linears that read their weights as packed INT4 when decoding.

Decoding a token is bound by memory bandwidth: every weight is read once per token. ``cpu-int8``
keeps the weight codes as int8 (a byte per weight, twice the INT4 checkpoint) for ``torch._int_mm``.
torch's CPU weight-only INT4 GEMM (``aten._weight_int4pack_mm_for_cpu``) reads half a byte per
weight and expands the nibbles in registers. It computes ``A @ ((w - 8) * s + z)ᵀ`` per group;
with the unsigned nibbles ``w = qw + 8``, ``s = 1`` and ``z = 0`` that is ``A @ qwᵀ``, and with the
per-token activation codes as ``A`` (integers, exact in bfloat16) the result is the integer sum
``Σ_k qx[m, k] qw[n, k]`` of ``cpu-int8``, accumulated in float32 and returned in bfloat16. The
per-token and per-channel scales, the asymmetric zero-point term, the outlier branch and the bias
follow in float32, as in :mod:`quadllm.backends.int8`.

Tolerance: the activation and weight codes are exactly ``fake``'s; each integer sum is rounded to
bfloat16 once (a relative error of at most 2^-8, what a bfloat16 model has at every output; its
cost in perplexity is measured by scripts/decode_int4_check.py).

For more than ``decode_rows`` rows (prefill) the INT8 GEMM is faster: those go through
``cpu-int8``'s path (which then keeps its own int8 weight layout when ``cache_weights``), as do the
linears whose widths the INT4 GEMM does not take (:meth:`Int4Kernel.packs`).
"""

from __future__ import annotations

import torch

from ..nn.modules import QuadLinear
from .int8 import Int8Kernel, act_codes, asym_act_codes, supports_int8

__all__ = ["Int4Kernel", "int4pack_available", "int4pack_group", "pack_for_int4_mm", "int4_code_mm"]

#: the group sizes the op accepts, largest first (a unit scale makes any dividing one equivalent)
GROUPS = (256, 128, 64, 32)


def int4pack_group(k: int) -> int | None:
    """A group size the op accepts that divides ``k`` (None: the op cannot take this width)."""
    return next((g for g in GROUPS if k % g == 0), None)


def pack_for_int4_mm(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Signed INT4 codes [N, K] (-8..7; N a multiple of 16, K of 32) -> (the op's packed weight, its unit scales and zero
    points [K / G, N, 2] in bfloat16, the group size G)."""
    n, k = codes.shape
    group = int4pack_group(k)
    if n % 16:
        raise ValueError(f"the INT4 GEMM needs an output width divisible by 16, got {n}")
    if group is None:
        raise ValueError(f"the INT4 GEMM needs an input width divisible by 32, got {k}")
    if int(codes.min()) < -8 or int(codes.max()) > 7:
        raise ValueError("INT4 codes must lie in -8..7")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((codes.to(torch.int32) + 8).contiguous(), 1)
    scale_zero = torch.zeros(k // group, n, 2, dtype=torch.bfloat16)
    scale_zero[..., 0] = 1.0
    return packed, scale_zero, group


def int4_code_mm(codes: torch.Tensor, packed: torch.Tensor, scale_zero: torch.Tensor, group: int) -> torch.Tensor:
    """``codes @ qwᵀ`` for integer activation codes [M, K] (any dtype; exact in bfloat16 up to
    ±256) against the packed weight: the integer sums, each rounded once to bfloat16."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(codes.to(torch.bfloat16), packed, group, scale_zero)


def int4pack_available() -> bool:
    """Whether torch's CPU INT4 GEMM runs here and gives the integer sums (probed once)."""
    try:
        codes = torch.arange(-8, 8, dtype=torch.int8).repeat(16, 2)  # [16, 32]
        packed, sz, group = pack_for_int4_mm(codes)
        got = int4_code_mm(torch.ones(1, 32), packed, sz, group)
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
        if not int4pack_available():
            return "torch's CPU INT4 GEMM (aten._weight_int4pack_mm_for_cpu) does not run on this torch build; use cpu-int8"
        return super().unavailable_reason()

    @staticmethod
    def packs(lin: QuadLinear) -> bool:
        """Whether the INT4 GEMM takes ``lin`` (INT4 weights, input widths divisible by 32 and
        output widths by 16); the others run ``cpu-int8``'s path at every length."""
        return (supports_int8(lin) and lin.w_bits <= 4 and lin.out_features % 16 == 0
                and int4pack_group(lin.in_features - lin.rank) is not None)

    def __init__(self, cache_weights: bool = True) -> None:
        super().__init__(cache_weights)
        self._packed: tuple[tuple, tuple[torch.Tensor, torch.Tensor, int] | None] | None = None

    def packed(self, lin: QuadLinear) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """The op's layout of ``lin``'s weight codes (the layer's own packed codes are in another
        nibble order), or None when the op cannot take ``lin`` (:meth:`packs`): found once, and
        again if the weight changes."""
        key = self._weight_key(lin)
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, pack_for_int4_mm(lin.codes()) if self.packs(lin) else None)
        return self._packed[1]

    def extra_bytes(self) -> int:
        layout = None if self._packed is None else self._packed[1]
        own = 0 if layout is None else sum(t.numel() * t.element_size() for t in layout[:2])
        return own + super().extra_bytes()

    def __call__(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        layout = self.packed(lin) if x2.shape[0] <= self.decode_rows else None
        if layout is None:
            return super().__call__(lin, x)
        packed, scale_zero, group = layout
        r = lin.rank
        xs = x2 if x2.dtype == torch.float32 else x2.float()
        if lin.act.sym:
            codes, sx = act_codes(xs[:, r:], lin.act.bits, lin.act.clip_ratio)
            y = int4_code_mm(codes, packed, scale_zero, group).float()
        else:
            codes, sx, zx = asym_act_codes(xs[:, r:], lin.act.bits, lin.act.clip_ratio)
            y = int4_code_mm(codes, packed, scale_zero, group).float().sub_(zx * self.weight_sums(lin))
        y.mul_(sx).mul_(lin.scales.reshape(-1).float())
        if r:
            y.addmm_(lin.outlier_input(xs), lin.outlier_weight().t().float())
        if lin.bias is not None:
            y += lin.bias.float()
        return y.to(x.dtype).reshape(*lead, y.shape[-1])
