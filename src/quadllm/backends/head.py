"""The output head in a cheaper precision, for inference: what the logits of every token cost.

Decoding reads the whole head (vocabulary x hidden) for every token: SmolLM2's tied 49,152 x 576
table is 113 MB in float32, Qwen2.5's 151,936 x 896 is 545 MB, more than all its INT4 layers.
:class:`HeadKernel` keeps a copy of the table in

- ``bf16``: bfloat16 weights and inputs (half the bytes; logits rounded to bfloat16);
- ``int8``: per-row symmetric INT8 weights (``round(w / s)``, ``s = max|w| / 127`` rounded to
  bfloat16) through torch's weight-only INT8 GEMM with bfloat16 inputs (a quarter of the bytes;
  what llama.cpp's Q8_0 head costs).

Neither is exact: the perplexity it costs is measured (``quadllm eval --head``), never assumed.
The checkpoint is not changed; the float table stays (the embedding reads it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["HEAD_PRECISIONS", "HeadKernel", "int8_rows"]

#: what ``--head`` may ask for (``float``: the model's own dtype, no kernel)
HEAD_PRECISIONS = ("float", "bf16", "int8")


def int8_rows(table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric INT8 codes [V, d] and scales [V] (bfloat16, as the GEMM takes them) of a
    float table, rounded with the scale the GEMM will use."""
    scale = (table.float().abs().amax(1) / 127).clamp_min(1e-12).to(torch.bfloat16)
    codes = (table.float() / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return codes, scale


class HeadKernel:
    """The logits ``x @ Wᵀ (+ b)`` of a head in ``precision`` (``bf16`` or ``int8``)."""

    def __init__(self, table: torch.Tensor, precision: str) -> None:
        if precision not in HEAD_PRECISIONS[1:]:
            raise ValueError(f"head precision must be one of {', '.join(HEAD_PRECISIONS[1:])}, not {precision!r}")
        self.precision = precision
        # the INT8 GEMM reads past a row whose width is not a multiple of 16 (it crashed on widths
        # 40, 56, 72 here): such tables get zero columns, and the inputs zeros to match
        self.pad = -table.shape[1] % 16 if precision == "int8" else 0
        with torch.no_grad():
            if precision == "bf16":
                self.tensors: tuple[torch.Tensor, ...] = (table.detach().to(torch.bfloat16).contiguous(),)
            else:
                self.tensors = int8_rows(F.pad(table.detach(), (0, self.pad)))

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.pad:
            x2 = F.pad(x2, (0, self.pad))
        if self.precision == "bf16":
            y = F.linear(x2, self.tensors[0])
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2, *self.tensors)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(y.dtype)
        return y.reshape(*lead, y.shape[-1])

    def extra_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)
