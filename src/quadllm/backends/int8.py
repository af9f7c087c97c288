"""The ``cpu-int8`` backend: integer arithmetic for quantized linears, and its kernel.

A W4A4 / W4A8 linear computes ``y[m, n] = sx[m] * sw[n] * Σ_k qx[m, k] qw[n, k]`` where ``qx`` are
the per-token activation codes and ``qw`` the INT4 weight codes: both fit in int8, so one INT8
GEMM with int32 accumulation (``torch._int_mm``) does the work and a per-token x per-channel
scale epilogue turns it back into floats. The codes are exactly those of
:func:`quadllm.core.quantizers.fake_quant_act`, so the result equals the float simulation up to the
float rounding of the simulation's own sums.

Asymmetric activations (``--act-asym``) have codes ``q`` in ``0..2**bits - 1`` and a zero point
``z`` per token: ``x ≈ (q - z) s``. Shifted by ``h = 2**(bits-1)`` both fit in int8 (``c = q - h``,
``z' = z - h``, ``x ≈ (c - z') s``), and ``Σ_k (c_k - z') w_k = Σ_k c_k w_k - z' Σ_k w_k``: the
same GEMM, with the weight codes' row sums (kept beside the weight) subtracted in the epilogue.
"""

from __future__ import annotations

import torch

from ..core.quantizers import asym_params, qrange, row_absmax
from ..nn.modules import QuadLinear
from .base import Kernel

__all__ = ["act_codes", "asym_act_codes", "int8_linear", "scale_sums", "int_mm_available", "supports_int8", "Int8Kernel"]


def act_codes(x: torch.Tensor, bits: int, clip_ratio: float = 1.0,
              block_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric codes of ``x`` [M, K]: (int8 codes [M, K], float scales [M, 1]) with
    ``x ≈ codes * scales``, identical to what :func:`fake_quant_act` rounds to.

    Rows are processed ``block_rows`` at a time, so the max, divide, round, clamp and cast passes
    over a block run while it is still in cache; every block computes exactly the whole-tensor
    formula."""
    if bits > 8:
        raise ValueError(f"integer activations need at most 8 bits, got {bits}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be positive, got {block_rows}")
    qmin, qmax = qrange(bits)
    m = x.shape[0]
    if m <= block_rows:  # one block (decoding, short prompts): no staging buffers
        scale = (row_absmax(x) * clip_ratio / qmax).clamp_min(1e-8)
        return (x / scale).round_().clamp_(qmin, qmax).to(torch.int8), scale
    codes = torch.empty(x.shape, dtype=torch.int8, device=x.device)
    scales = torch.empty((m, 1), dtype=x.dtype, device=x.device)
    buf = torch.empty((min(block_rows, m), x.shape[1]), dtype=x.dtype, device=x.device)
    for i in range(0, m, block_rows):
        xb = x[i:i + block_rows]
        n = xb.shape[0]
        scale = (row_absmax(xb) * clip_ratio / qmax).clamp_min(1e-8)
        codes[i:i + n] = torch.div(xb, scale, out=buf[:n]).round_().clamp_(qmin, qmax)
        scales[i:i + n] = scale
    return codes, scales


def asym_act_codes(x: torch.Tensor, bits: int, clip_ratio: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token asymmetric codes of ``x`` [M, K], shifted into int8: (codes ``c`` [M, K], scales
    [M, 1], shifted zero points ``z'`` [M, 1], integers held as floats) with ``x ≈ (c - z') * scale``,
    the grid of :func:`quadllm.core.quantizers.fake_quant_asym`."""
    if bits > 8:
        raise ValueError(f"integer activations need at most 8 bits, got {bits}")
    half = 2 ** (bits - 1)
    scale, zero = asym_params(x, bits, clip_ratio)
    q = (x / scale).round_().add_(zero).clamp_(0, 2**bits - 1).sub_(half)
    return q.to(torch.int8), scale, zero - half


def int8_linear(codes: torch.Tensor, act_scale: torch.Tensor, weight_t: torch.Tensor,
                weight_scale: torch.Tensor, act_zero: torch.Tensor | None = None,
                weight_sums: torch.Tensor | None = None) -> torch.Tensor:
    """``(codes @ weight_t - act_zero * weight_sums) * act_scale * weight_scale`` with int32
    accumulation (no zero-point term without ``act_zero``).

    ``codes`` int8 [M, K], ``act_scale`` [M, 1], ``weight_t`` int8 [K, N] (the transposed weight
    codes, contiguous), ``weight_scale`` [N] (per output channel); ``act_zero`` [M, 1] and
    ``weight_sums`` [N] (``weight_t``'s column sums) for asymmetric codes. Returns float [M, N] in
    the dtype of ``act_scale``.
    """
    return scale_sums(torch._int_mm(codes, weight_t), act_scale, weight_scale, act_zero, weight_sums)


def scale_sums(acc: torch.Tensor, act_scale: torch.Tensor, weight_scale: torch.Tensor,
               act_zero: torch.Tensor | None = None, weight_sums: torch.Tensor | None = None) -> torch.Tensor:
    """The float epilogue of integer sums ``acc`` [M, N] (int32, or floats holding integers):
    ``(acc - act_zero * weight_sums) * act_scale * weight_scale``, in the dtype of ``act_scale``."""
    if act_scale.dtype == torch.float32 and acc.dtype == torch.int32 and acc.is_contiguous():
        # int32 -> float32 in place: same element size, each element read before it is written,
        # so no second [M, N] buffer is allocated (and page-faulted in) at every call
        y = acc.view(torch.float32)
        y.copy_(acc)
    else:
        y = acc.to(act_scale.dtype)
    if act_zero is not None:
        y.sub_(act_zero.to(y.dtype) * weight_sums.to(y.dtype))
    return y.mul_(act_scale).mul_(weight_scale.to(y.dtype))


def int_mm_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``torch._int_mm`` runs here (it needs M > 16 on some builds: probe with 32)."""
    try:
        a = torch.ones(32, 32, dtype=torch.int8, device=device)
        return bool(torch._int_mm(a, a)[0, 0] == 32)
    except (RuntimeError, NotImplementedError):
        return False


def supports_int8(lin: QuadLinear) -> bool:
    """Whether ``lin`` can run on the INT8 path."""
    return (lin.quantized and lin.act.enabled and lin.act.bits <= 8 and lin.w_bits <= 8
            and lin.group_size == 0)


class Int8Kernel(Kernel):
    """The ``cpu-int8`` forward of one :class:`QuadLinear` (after its online transform).

    ``cache_weights``: keep the transposed int8 weight codes (1 byte per weight, twice the packed
    size) instead of unpacking the INT4 codes at every call."""

    name = "cpu-int8"
    fuses_siblings = True

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return None if int_mm_available() else "torch._int_mm does not run on this CPU/torch build; use --backend fake"

    supports = staticmethod(supports_int8)

    @classmethod
    def create(cls, cache_weights: bool = True) -> "Int8Kernel":
        return cls(cache_weights)

    def __init__(self, cache_weights: bool = True) -> None:
        self.cache_weights = cache_weights
        self._wt: torch.Tensor | None = None
        self._key: tuple | None = None
        self._sums: tuple[tuple, torch.Tensor] | None = None

    @staticmethod
    def _weight_key(lin: QuadLinear) -> tuple:
        """What the kept weight layouts were derived from: they are stale when it changes."""
        return (lin.qweight.data_ptr(), lin.qweight._version)

    # The public calls (prepare, decode_weight_bytes, __call__) go to the sibling group when the layer
    # has one; the *_own methods and compute are the layer alone, which subclasses extend.
    def prepare(self, lin: QuadLinear) -> None:
        if self.siblings is not None:  # the fused layer's layouts replace this layer's own
            self.siblings.prepare()
        else:
            self.prepare_own(lin)

    def prepare_own(self, lin: QuadLinear) -> None:
        """Build ``lin``'s own kept layouts."""
        if self.cache_weights:
            self.weight_t(lin)
        if not lin.act.sym:
            self.weight_sums(lin)

    def weight_t(self, lin: QuadLinear) -> torch.Tensor:
        if torch.compiler.is_compiling():  # a graph cannot compare data pointers: prepare() kept the layout
            return self._wt if self._wt is not None else lin.codes().t().contiguous()
        key = self._weight_key(lin)
        if self._wt is not None and self._key == key:
            return self._wt
        wt = lin.codes().t().contiguous()
        if self.cache_weights:
            self._wt, self._key = wt, key
        return wt

    def weight_sums(self, lin: QuadLinear) -> torch.Tensor:
        """The weight codes' sum per output channel (asymmetric activations' epilogue), kept."""
        if torch.compiler.is_compiling() and self._sums is not None:
            return self._sums[1]
        key = self._weight_key(lin)
        if self._sums is None or self._sums[0] != key:
            self._sums = (key, lin.codes().sum(1, dtype=torch.int32).float())
        return self._sums[1]

    def extra_bytes(self) -> int:
        shared = self.siblings.extra_bytes() if self.siblings is not None and self.siblings.owner(self) else 0
        return shared + (0 if self._wt is None else self._wt.numel() * self._wt.element_size())

    def decode_weight_bytes(self, lin: QuadLinear) -> int:
        if self.siblings is not None:  # the fused layer reads them all, counted once
            return self.siblings.decode_weight_bytes() if self.siblings.owner(self) else 0
        return self.own_decode_bytes(lin)

    def own_decode_bytes(self, lin: QuadLinear) -> int:
        """What one call of ``lin`` alone reads."""
        own = super().decode_weight_bytes(lin)
        if not self.cache_weights:  # unpacked from the layer's INT4 codes at every call
            return own
        return own - lin.qweight.numel() * lin.qweight.element_size() + lin.out_features * (lin.in_features - lin.rank)

    def __call__(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor:
        if self.siblings is not None:
            return self.siblings.output(lin, x)
        return self.compute(lin, x)

    def compute(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor:
        """``lin``'s output for ``x`` on its own (:meth:`__call__` first looks for its siblings')."""
        r = lin.rank
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xs = x2 if x2.dtype == torch.float32 else x2.float()
        wt = self.weight_t(lin)
        if lin.act.sym:
            codes, sx = act_codes(xs[:, r:], lin.act.bits, lin.act.clip_ratio)
            y = int8_linear(codes, sx, wt, lin.scales.reshape(-1))
        else:
            codes, sx, zx = asym_act_codes(xs[:, r:], lin.act.bits, lin.act.clip_ratio)
            y = int8_linear(codes, sx, wt, lin.scales.reshape(-1), zx, self.weight_sums(lin))
        if r:  # in float (INT8 columns, --o-rank-bits 8, are rounded first: simulated, not an INT8 GEMM)
            y.addmm_(lin.outlier_input(xs), lin.outlier_weight().t().to(y.dtype))
        if lin.bias is not None:
            y += lin.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*lead, y.shape[-1])
