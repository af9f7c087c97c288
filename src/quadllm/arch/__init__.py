"""Architecture adapters, one per model family, and the registry that picks one."""

from __future__ import annotations

from ..errors import QuadllmError
from .base import ArchAdapter, ReaderGroup, get_submodule, set_submodule
from .llama import LlamaAdapter
from .mistral import MistralAdapter
from .qwen2 import Qwen2Adapter
from .qwen3 import Qwen3Adapter

ADAPTERS: tuple[type[ArchAdapter], ...] = (LlamaAdapter, Qwen2Adapter, Qwen3Adapter, MistralAdapter)


class UnsupportedArchitecture(QuadllmError, NotImplementedError):
    """The model family has no adapter."""


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(config) -> ArchAdapter:
    """The adapter for a transformers config (or a model, whose ``.config`` is used)."""
    config = getattr(config, "config", config)
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(config)
    raise UnsupportedArchitecture(
        f"architecture {model_type!r} is not supported; quadllm supports: {', '.join(supported_model_types())}")


__all__ = ["ArchAdapter", "ReaderGroup", "get_adapter", "supported_model_types", "UnsupportedArchitecture",
           "get_submodule", "set_submodule", "ADAPTERS"]
