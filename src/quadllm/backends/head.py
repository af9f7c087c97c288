"""The output head in a cheaper precision, for inference: what the logits of every token cost.

Decoding reads the whole head (vocabulary x hidden) for every token: SmolLM2's tied 49,152 x 576
table is 113 MB in float32, Qwen2.5's 151,936 x 896 is 545 MB, more than all its INT4 layers.
:class:`HeadKernel` keeps a copy of the table in

- ``bf16``: bfloat16 weights and inputs (half the bytes; logits rounded to bfloat16);
- ``int8``: per-row symmetric INT8 weights (``round(w / s)``, ``s = max|w| / 127`` rounded to
  bfloat16) through torch's weight-only INT8 GEMM with bfloat16 inputs (a quarter of the bytes;
  what llama.cpp's Q8_0 head costs);
- ``w8a8``: the ``int8`` weights' grid, but on a rotated table (``W Rᵀ``, ``R`` a random Hadamard
  matrix), and the rotated input ``x Rᵀ`` quantized to INT8 per token (symmetric, no clipping),
  so the sums are exact integers: :func:`quadllm.backends.vnni.w8a8_mm` (AVX512-VNNI) where it
  runs (up to :data:`HEAD_DECODE_ROWS` rows; beyond, ``torch._int_mm`` on an INT8 copy of the codes
  made at the first such call and kept), else ``torch._int_mm``, the same sums. The rotation spreads the input's outlier channels
  over all columns before the per-token scale is taken (tests/backends/test_head.py checks that it
  at least halves the error on an input with an outlier channel); it costs a d x d float matmul
  per token;
- ``int4``: symmetric INT4 weights with a bfloat16 scale per row and group of 32 columns
  (llama.cpp's Q4_0 grid), the scale chosen by a short squared-error clipping search, through
  torch's weight-only INT4 GEMM with bfloat16 inputs (about an eighth of the bytes).

None is exact: the perplexity each costs is measured (``quadllm eval --head``, scripts/head_cost.py), never
assumed.
The checkpoint is not changed; the float table stays (the embedding reads it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.hadamard import random_hadamard
from ..core.quantizers import quantize_weight, weight_scales
from .int4 import int4_mm, int4pack_available, pack_for_int4_mm
from .int8 import act_codes, scale_sums
from .vnni import pack_w8, vnni_unavailable_reason, w8a8_mm

__all__ = ["HEAD_PRECISIONS", "HEAD_DECODE_ROWS", "HEAD_INT4_GROUP", "HEAD_ROTATION_SEED", "HeadKernel", "int4_groups", "int8_rows"]

#: what ``--head`` may ask for (``float``: the model's own dtype, no kernel)
HEAD_PRECISIONS = ("float", "bf16", "int8", "w8a8", "int4")
#: columns per scale of the INT4 head (llama.cpp's Q4_0 block)
HEAD_INT4_GROUP = 32
#: the seed of the w8a8 head's random Hadamard signs (fixed: a placement is then reproducible)
HEAD_ROTATION_SEED = 0
#: rows up to which the w8a8 head runs the VNNI kernel (a GEMV kernel: beyond, torch's INT8 GEMM is faster)
HEAD_DECODE_ROWS = 32


def int8_rows(table: torch.Tensor, scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8 codes [V, d] and scales [V] (``scale_dtype``: bfloat16 is what torch's
    weight-only GEMM takes) of a float table, rounded with the scale the GEMM will use."""
    scale = (table.float().abs().amax(1) / 127).clamp_min(1e-12).to(scale_dtype)
    codes = (table.float() / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


def int4_groups(table: torch.Tensor, group: int = HEAD_INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT4 codes [V, d] (-8..7) and bfloat16 scales [V, d / group] of a float table
    (``d`` a multiple of ``group``): each group's scale is the largest magnitude over 7, shrunk by
    the factor among 1, 0.95, ..., 0.75 with the least squared error (six candidates: the head is
    quantized at every placement, so the search is kept short), then rounded to bfloat16, and the
    codes rounded with that scale."""
    w = table.detach().float()
    scales = weight_scales(w, 4, group, mse=True, grid=20, max_shrink=0.3, norm=2.0).to(torch.bfloat16)
    return quantize_weight(w, scales.float(), 4), scales


class HeadKernel:
    """The logits ``x @ Wᵀ (+ b)`` of a head in ``precision`` (``bf16``, ``int8``, ``w8a8`` or ``int4``)."""

    def __init__(self, table: torch.Tensor, precision: str) -> None:
        if precision not in HEAD_PRECISIONS[1:]:
            raise ValueError(f"head precision must be one of {', '.join(HEAD_PRECISIONS[1:])}, not {precision!r}")
        self.precision = precision
        if precision == "int4" and not int4pack_available():
            raise ValueError("the INT4 head needs torch's CPU INT4 GEMM (aten._weight_int4pack_mm_for_cpu), "
                             "which this torch build does not run; use int8")
        # zero columns, and zeros in the inputs to match: the INT8 GEMM reads past a row whose width
        # is not a multiple of 16 (it crashed on widths 40, 56, 72 here), and INT4 scales whole
        # groups (a zero group's codes are 0 and add nothing)
        self.pad = -table.shape[1] % {"int8": 16, "int4": HEAD_INT4_GROUP}.get(precision, 1)
        self.rows = table.shape[0]
        self.vnni = precision == "w8a8" and vnni_unavailable_reason() is None
        self._gemm_codes: torch.Tensor | None = None  # w8a8 with VNNI: the codes [K, V] for many rows
        with torch.no_grad():
            padded = F.pad(table.detach(), (0, self.pad)) if self.pad else table.detach()
            if precision == "bf16":
                self.tensors: tuple[torch.Tensor, ...] = (padded.to(torch.bfloat16).contiguous(),)
            elif precision == "int8":
                self.tensors = int8_rows(padded)
            elif precision == "w8a8":
                rotation = random_hadamard(table.shape[1], HEAD_ROTATION_SEED).float()
                codes, scale = int8_rows(padded.float() @ rotation.t(), torch.float32)
                self.tensors = (pack_w8(codes) if self.vnni else codes.t().contiguous(), scale, rotation)
            else:
                self.layout = pack_for_int4_mm(*int4_groups(padded))
                self.tensors = (self.layout.packed, self.layout.scale_zero)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.precision != "w8a8":
            x2 = x2.to(torch.bfloat16)
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        if self.precision == "w8a8":
            y = self._w8a8(x2)
        elif self.precision == "bf16":
            y = F.linear(x2, self.tensors[0])
        elif self.precision == "int4":
            y = int4_mm(x2, self.layout, self.rows)
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, *self.tensors)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, y.shape[-1])

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        weights, scale, rotation = self.tensors
        codes, x_scale = act_codes(x.float() @ rotation.t(), 8)
        if not self.vnni:
            acc = torch._int_mm(codes, weights)
        elif codes.shape[0] <= HEAD_DECODE_ROWS:
            acc = w8a8_mm(codes, weights, self.rows)
        else:
            acc = torch._int_mm(codes, self._many_rows_codes())
        return scale_sums(acc, x_scale, scale)

    def _many_rows_codes(self) -> torch.Tensor:
        """The VNNI layout's codes as int8 [K, V] (a view of a [V, K] copy) for torch's GEMM."""
        if self._gemm_codes is None:
            packed, k = self.tensors[0], self.tensors[2].shape[0]
            rows = (packed ^ 0x80).view(torch.int8).permute(0, 2, 1, 3).reshape(-1, packed.shape[1] * packed.shape[3])
            self._gemm_codes = rows[:self.rows, :k].contiguous().t()
        return self._gemm_codes

    def extra_bytes(self) -> int:
        """The bytes this copy of the head holds."""
        extra = 0 if self._gemm_codes is None else self._gemm_codes.numel()
        return extra + self.decode_bytes()

    def decode_bytes(self) -> int:
        """The bytes a decode step (up to :data:`HEAD_DECODE_ROWS` rows) reads."""
        return sum(t.numel() * t.element_size() for t in self.tensors)
