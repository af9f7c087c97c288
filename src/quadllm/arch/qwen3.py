"""Qwen3: per-head RMSNorm on q and k (q_norm/k_norm) after the projections.

Those norms act on q/k outputs, which no transform touches, so they stay as they are.
"""

from .base import ArchAdapter


class Qwen3Adapter(ArchAdapter):
    model_types = ("qwen3",)
    notes = "q/k norms kept in full precision"
