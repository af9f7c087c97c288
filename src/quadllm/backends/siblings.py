"""Linears that read one input, run as one: q/k/v after the attention norm, gate/up after the MLP's.

Such siblings quantize the same input with the same settings, so their activation codes are the
same: computing them once and the three (or two) GEMMs as one over the concatenated weights gives
every sibling its own output, with a third (or half) of the quantization passes, GEMM calls, outlier
matmuls and epilogues. Decoding a small model is bound by such per-call costs (see
:mod:`quadllm.backends.compiled`), and prefill by the passes over the input.

The model's code still calls each sibling in turn. The first one called computes the whole group
for its input and keeps the others' outputs; a sibling then called with *that same tensor* takes its
own, and any other call computes alone. So the result never depends on the call order, and the
group is traced as it runs by ``torch.compile`` (the kept outputs are a side effect dynamo replays).

What is exact: each output's integer sums (the same codes, each sum independent of its neighbours);
the epilogues are the same float operations element by element. The outlier branch is one float
matmul over the concatenated columns, whose blocking may round differently from the separate ones:
tested to float32 rounding, not bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..nn.modules import QuadLinear

if TYPE_CHECKING:
    from .base import Kernel

__all__ = ["SiblingGroup", "fusable"]


def fusable(members: list[QuadLinear]) -> str | None:
    """None when ``members`` can run as one fused linear, else why not."""
    if len(members) < 2:
        return "a single linear"
    first = members[0]
    if any(m.kernel is None or type(m.kernel) is not type(first.kernel) for m in members):
        return "not all on one kernel"
    if any(not m.quantized or m.transform is not None for m in members):
        return "a float or transformed input"
    same = ("in_features", "rank", "act", "w_bits", "group_size")
    for m in members[1:]:
        for attr in same:
            if getattr(m, attr) != getattr(first, attr):
                return f"different {attr}"
        if m.scales.dtype != first.scales.dtype:
            return "different scale dtypes"
    return None


def _state_key(members: tuple[QuadLinear, ...]) -> tuple:
    """What a fused layer was built from: it is stale when any of it changes (fine-tuning updates
    the outlier columns and scales in place)."""
    return tuple((t.data_ptr(), t._version) for m in members
                 for t in (m.qweight, m.scales, m.w_outlier, m.bias) if t is not None)


class SiblingGroup:
    """Linears that read one input (:func:`fusable`), and the one layer computing them all."""

    def __init__(self, members: list[QuadLinear], cache_weights: bool = True) -> None:
        reason = fusable(members)
        if reason is not None:
            raise ValueError(f"these linears cannot run as one: {reason}")
        self.members = tuple(members)
        self.widths = [m.out_features for m in members]
        self.cache_weights = cache_weights
        self.fused: QuadLinear | None = None
        self._key: tuple | None = None
        # (input, {member index: output}) of the last fused call, until its siblings take theirs
        self.pending: tuple[torch.Tensor, dict[int, torch.Tensor]] | None = None

    def _build(self) -> QuadLinear:
        first = self.members[0]
        fused = QuadLinear(first.in_features, sum(self.widths), rank=first.rank,
                           bias=any(m.bias is not None for m in self.members), act=first.act,
                           dtype=first.scales.dtype, allocate=False)
        with torch.no_grad():
            fused.set_quantized(torch.cat([m.codes() for m in self.members]),
                                torch.cat([m.scales for m in self.members]),
                                torch.cat([m.w_outlier for m in self.members]), first.w_bits, first.group_size)
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([m.bias if m.bias is not None else
                                            torch.zeros(m.out_features, dtype=fused.bias.dtype)
                                            for m in self.members]))
        fused.kernel = type(first.kernel).create(cache_weights=self.cache_weights)
        return fused

    def layer(self) -> QuadLinear:
        """The fused layer, rebuilt when a member's weights changed (not checked inside a compiled
        graph: :meth:`prepare` built it)."""
        if torch.compiler.is_compiling() and self.fused is not None:
            return self.fused
        key = _state_key(self.members)
        if self.fused is None or self._key != key:
            self.fused, self._key = self._build(), key
        return self.fused

    def prepare(self) -> None:
        """Build the fused layer and its kernel's layouts now (before a graph is compiled)."""
        fused = self.layer()
        fused.kernel.prepare(fused)

    def output(self, lin: QuadLinear, x: torch.Tensor) -> torch.Tensor:
        """``lin``'s output for its (transformed) input ``x``: kept from the fused call on ``x``, or
        computed with its siblings' now."""
        i = self.members.index(lin)
        pending = self.pending
        if pending is not None and pending[0] is x and i in pending[1]:
            outs = dict(pending[1])
            y = outs.pop(i)
            self.pending = (x, outs) if outs else None
            return y
        fused = self.layer()
        ys = fused.kernel(fused, x).split(self.widths, dim=-1)
        self.pending = (x, {j: y for j, y in enumerate(ys) if j != i})
        return ys[i]

    def owner(self, kernel: "Kernel") -> bool:
        """Whether ``kernel`` is the first member's: the one that accounts for the fused layer."""
        return self.members[0].kernel is kernel

    def decode_weight_bytes(self) -> int:
        fused = self.layer()
        return fused.kernel.decode_weight_bytes(fused)

    def extra_bytes(self) -> int:
        """The fused layer's own tensors and its kernel's layouts."""
        fused = self.fused
        if fused is None:
            return 0
        own = sum(t.numel() * t.element_size() for t in (fused.qweight, fused.scales, fused.w_outlier, fused.bias)
                  if t is not None)
        return own + fused.kernel.extra_bytes()
