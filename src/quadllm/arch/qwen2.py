"""Qwen2 / Qwen2.5: q/k/v projections carry biases (readers keep their bias unchanged)."""

from .base import ArchAdapter


class Qwen2Adapter(ArchAdapter):
    model_types = ("qwen2",)
    notes = "q/k/v biases"
