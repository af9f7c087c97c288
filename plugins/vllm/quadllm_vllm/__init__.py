"""quadllm checkpoints served by vLLM: the ``quadllm`` quantization method for vLLM's own model classes.

Installed next to vLLM (its own pins: ``plugins/vllm/README.md``), this package's
``vllm.general_plugins`` entry point calls :func:`register` in every vLLM process, which registers
:class:`~quadllm_vllm.method.QuadllmVllmConfig` under the name of ``quant_method`` in a stock-layout
checkpoint's ``config.json``. vLLM's Llama / Qwen2 classes then build the model; only their decoder
linears compute through quadllm.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register the ``quadllm`` quantization method with vLLM (idempotent: vLLM may call it in
    several processes, and more than once in one)."""
    from . import method  # noqa: F401  (its decorator registers the config)
