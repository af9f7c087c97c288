"""Llama family (Llama 2/3, SmolLM2): tied or untied head, no projection biases."""

from .base import ArchAdapter


class LlamaAdapter(ArchAdapter):
    model_types = ("llama",)
    notes = "tied and untied heads; attention/MLP biases are carried through if present"
