"""Mistral: Llama layout with sliding-window attention (handled by transformers' masks)."""

from .base import ArchAdapter


class MistralAdapter(ArchAdapter):
    model_types = ("mistral",)
    notes = "sliding-window attention"
