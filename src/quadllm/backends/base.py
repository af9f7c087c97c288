"""What an execution kernel for a :class:`~quadllm.nn.modules.QuadLinear` declares and does.

A backend is a :class:`Kernel` subclass: its name (the ``--backend`` choice), the device its
model must be on, whether it can run here, which layers it supports, and the forward of one
supported layer. :mod:`quadllm.backends` keeps the registry and places models on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # the modules hold kernels; kernels only read the modules' tensors
    from ..nn.modules import QuadLinear
    from .siblings import SiblingGroup

__all__ = ["Kernel"]


class Kernel:
    """The forward of one quantized linear on an execution backend."""

    #: the backend's name, as ``--backend`` spells it
    name: ClassVar[str]
    #: whether linears reading one input may run as one on this kernel (:mod:`quadllm.backends.siblings`)
    fuses_siblings: ClassVar[bool] = False
    #: set by :func:`quadllm.backends.place` when the layer runs with its siblings
    siblings: "SiblingGroup | None" = None

    @classmethod
    def device(cls) -> str:
        """The device type a model must be on to run this kernel."""
        return "cpu"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when the kernel can run on this machine, else why not (one sentence)."""
        return None

    @classmethod
    def create(cls, cache_weights: bool = True) -> "Kernel":
        """A kernel for one layer; ``cache_weights``: keep a faster weight layout in memory where
        the kernel has one."""
        return cls()

    @staticmethod
    def supports(lin: "QuadLinear") -> bool:
        """Whether this kernel can run ``lin`` (others keep the float simulation)."""
        raise NotImplementedError

    @staticmethod
    def refuses(lin: "QuadLinear") -> str | None:
        """Why this backend must not run ``lin`` at all, not even in the float simulation (a
        layer it would silently compute otherwise than asked), or None."""
        return None

    def __call__(self, lin: "QuadLinear", x: torch.Tensor) -> torch.Tensor:
        """The output of ``lin`` for its input ``x`` after the online transform."""
        raise NotImplementedError

    def fused_call(self, lin: "QuadLinear", x: torch.Tensor) -> torch.Tensor | None:
        """The output of ``lin`` for its input *before* the online transform, when the kernel
        applies the transform itself; None when it does not (the layer then transforms ``x``
        and calls the kernel)."""
        return None

    def prepare(self, lin: "QuadLinear") -> None:
        """Build the weight layouts the kernel keeps for ``lin`` now. A compiled graph
        (:mod:`quadllm.backends.compiled`) uses what is kept without checking that the weight is
        unchanged: it is built for fixed weights, after this call."""

    def decode_weight_bytes(self, lin: "QuadLinear") -> int:
        """The bytes of ``lin``'s weights one decode call reads: by default the layer's own
        quantized tensors (packed codes, scales, outlier columns, bias)."""
        return sum(t.numel() * t.element_size() for t in (lin.qweight, lin.scales, lin.w_outlier, lin.bias)
                   if t is not None)

    def extra_bytes(self) -> int:
        """Memory the kernel holds beyond the layer's own tensors (cached weight layouts)."""
        return 0
