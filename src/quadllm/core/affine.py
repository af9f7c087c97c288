"""A learned invertible transform of a linear's quantized input coordinates (FlatQuant-style): the
math, as pure functions, and the online module that applies it.

On the ``n`` coordinates of a linear's input that are quantized (all but the first ``keep``, which
stay in full precision), the transform is ``T = kron(L, R) diag(s)`` with ``L`` [a, a], ``R`` [b, b]
(``a * b = n``, :func:`kron_shape`) and a per-channel scale ``s`` [n]: ``x -> T x`` online before the
activation quantizer, and ``W -> W T⁻¹`` fused into the weight, so the layer computes exactly what
it did (:func:`fuse_affine`). Unlike the fixed Hadamard rotations, ``T`` is trained per layer to make
the quantized layer's output close to the float one (:mod:`quadllm.steps.learned_transform`). Its
online cost is ``n * (a + b + 1)`` multiply-adds per token, applied by every linear that reads it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .hadamard import kron_transform

__all__ = ["AffineTail", "apply_affine", "affine_macs", "fuse_affine", "identity_factors", "kron_shape"]


def kron_shape(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a * b = n`` and ``a`` the largest divisor of ``n`` at most ``sqrt(n)``:
    the Kronecker factor orders that make ``a + b`` (the online cost) smallest."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    a = math.isqrt(n)
    while n % a:
        a -= 1
    return a, n // a


def affine_macs(n: int) -> int:
    """Multiply-adds per token of applying the transform of ``n`` coordinates (:func:`kron_shape`)."""
    a, b = kron_shape(n)
    return n * (a + b + 1)


def identity_factors(n: int, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """``[L, R, s]`` of ``T = I`` on ``n`` coordinates (:func:`kron_shape`'s orders)."""
    a, b = kron_shape(n)
    return [torch.eye(a, dtype=dtype), torch.eye(b, dtype=dtype), torch.ones(n, dtype=dtype)]


def apply_affine(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``T x`` for every row of ``x`` [..., n]: ``(x * s) @ kron(L, R)ᵀ``."""
    return kron_transform(x * scale.to(x.dtype), [left, right])


def fuse_affine(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``W T⁻¹ = W diag(1/s) kron(L⁻¹, R⁻¹)`` for ``weight`` [out, n], in ``weight``'s dtype (differentiable),
    so that ``fuse_affine(W) @ apply_affine(x) = W @ x``."""
    dtype = weight.dtype
    inv_l = torch.linalg.inv(left.to(dtype))
    inv_r = torch.linalg.inv(right.to(dtype))
    return kron_transform(weight / scale.to(dtype), [inv_l.T, inv_r.T])


class AffineTail(nn.Module):
    """Online ``x -> [z[..., :keep], T z[..., keep:]]`` with ``z = base(x)`` (an optional earlier online
    transform) and ``T`` of :func:`apply_affine`; ``left``, ``right`` and ``scale`` are buffers (saved
    with the checkpoint)."""

    def __init__(self, keep: int, left: torch.Tensor, right: torch.Tensor, scale: torch.Tensor,
                 base: nn.Module | None = None) -> None:
        super().__init__()
        n = left.shape[0] * right.shape[0]
        if left.ndim != 2 or right.ndim != 2 or left.shape[0] != left.shape[1] or right.shape[0] != right.shape[1] \
                or scale.shape != (n,):
            raise ValueError(f"left {tuple(left.shape)}, right {tuple(right.shape)} and scale {tuple(scale.shape)} "
                             "must be [a, a], [b, b] and [a * b]")
        self.keep = int(keep)
        self.base = base
        self.register_buffer("left", left)
        self.register_buffer("right", right)
        self.register_buffer("scale", scale)

    @classmethod
    def identity(cls, keep: int, n: int, dtype: torch.dtype = torch.float32,
                 base: nn.Module | None = None) -> "AffineTail":
        """``T = I`` on ``n`` coordinates (the start of training, and the skeleton for loading)."""
        return cls(keep, *identity_factors(n, dtype), base=base)

    @property
    def n(self) -> int:
        return self.scale.shape[0]

    def matrix(self) -> torch.Tensor:
        """``T`` [n, n] (float64), for tests and reports."""
        return torch.kron(self.left.double(), self.right.double()) * self.scale.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x) if self.base is not None else x
        k = self.keep
        tail = apply_affine(z[..., k:], self.left, self.right, self.scale)
        return torch.cat([z[..., :k], tail], dim=-1) if k else tail

    def extra_repr(self) -> str:
        return f"keep={self.keep}, n={self.n}, kron={self.left.shape[0]}x{self.right.shape[0]}"
