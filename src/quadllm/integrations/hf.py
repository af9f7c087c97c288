"""quadllm as a transformers quantization method: ``AutoModelForCausalLM.from_pretrained(CKPT)`` on a
checkpoint in the stock layout (:mod:`quadllm.io.stock_layout`) once quadllm is imported, or with
``trust_remote_code=True`` through the checkpoint's ``auto_map`` shim
(:data:`quadllm.io.stock_layout.SHIM_FILE`), which
imports quadllm itself.

transformers builds the stock model of ``config.json`` (its own norms, embedding and head); the
quantizer then swaps the decoder linears for :class:`~quadllm.nn.modules.QuadLinear` skeletons
(and attaches the KV quantizers) before the weights load, the same skeleton
:func:`quadllm.load` builds, and checks after loading that every tensor came from the file.
Without quadllm, a stock loader stops on the linears' size-mismatched markers instead of
initializing them at random.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..config import QuantConfig
from ..io.checkpoint import stored_state_dict
from ..io.stock_layout import QUANT_METHOD, marker_keys
from ..nn.modules import KVQuant, QuadLinear
from ..pipelines.loading import build_skeleton, finish_loading

log = logging.getLogger(__name__)

__all__ = ["QuadllmConfig", "QuadllmHfQuantizer", "derived_buffers", "register"]

class QuadllmConfig(QuantizationConfigMixin):
    """``quantization_config`` of a quadllm checkpoint: the :class:`~quadllm.config.QuantConfig`
    (``quant_config``), the shapes (``structure``) and the original width, norm epsilon and tying
    (``original``), as :func:`quadllm.io.stock_layout.stock_config` writes them."""

    def __init__(self, quant_config: dict[str, Any] | None = None, structure: dict[str, Any] | None = None,
                 original: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if quant_config is None or structure is None or original is None:
            raise ValueError("a quadllm quantization_config needs quant_config, structure and original: quadllm "
                             "quantizes with `quadllm quantize`, and transformers only loads its checkpoints")
        self.quant_method = QUANT_METHOD
        self.quant_config = dict(quant_config)
        self.structure = dict(structure)
        self.original = dict(original)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "quant_config": self.quant_config, "structure": self.structure,
                "original": self.original}


class QuadllmHfQuantizer(HfQuantizer):
    """Loads quadllm checkpoints (never quantizes: ``quadllm quantize`` does)."""

    requires_calibration = True

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        if not self.pre_quantized:
            raise ValueError("quadllm quantizes with `quadllm quantize` (calibration needed); from_pretrained "
                             "loads its checkpoints only")
        device_map = kwargs.get("device_map")
        devices = set(device_map.values()) if isinstance(device_map, dict) else {device_map}
        if devices - {None, "cpu", torch.device("cpu")}:
            log.warning("quadllm checkpoints load on the CPU (fake backend); place them on another backend with "
                        "quadllm.place(model, backend)")

    def _process_model_before_weight_loading(self, model, **kwargs: Any) -> None:
        qc = self.quantization_config
        if qc.structure.get("lora"):
            # peft's wrappers rename the linears' tensors, which transformers would then initialize afresh
            raise ValueError("this checkpoint holds LoRA adapters (quadllm finetune --method lora), which "
                             "from_pretrained does not build; load it with quadllm.load")
        config = QuantConfig.from_dict(qc.quant_config)
        dtype = kwargs.get("dtype") or model.dtype
        with torch.device("cpu"):  # the skeleton's own tensors are real: anything not loaded is caught below
            build_skeleton(model, config, qc.structure, dtype)
        markers = {re.escape(k) + "$" for k in marker_keys(model)}
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | markers
        # state the file does not hold (an online transform's index, say): transformers re-creates such
        # buffers empty after loading, so their values are kept here and put back below
        self.rebuilt = derived_buffers(model)

    def _process_model_after_weight_loading(self, model, **kwargs: Any) -> None:
        buffers = dict(model.named_buffers())
        for name, value in getattr(self, "rebuilt", {}).items():
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(attr, value.to(buffers[name].device), persistent=False)
        qc = self.quantization_config
        finish_loading(model, {"quant_config": qc.quant_config, "structure": qc.structure},
                       getattr(model.config, "_name_or_path", "") or "the checkpoint")

    def get_state_dict_and_metadata(self, model) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """What ``save_pretrained`` writes: the tensors as stored, with the markers that stop a loader
        without quadllm."""
        return stored_state_dict(model), {}

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def derived_buffers(model) -> dict[str, torch.Tensor]:
    """Copies of the buffers of quadllm's modules that a checkpoint does not store (non-persistent)."""
    stored = set(model.state_dict())
    ours = [name for name, m in model.named_modules() if isinstance(m, (QuadLinear, KVQuant))]
    return {name: b.detach().clone() for name, b in model.named_buffers()
            if name not in stored and any(name.startswith(prefix + ".") for prefix in ours)}


def register() -> None:
    """Make ``quant_method: quadllm`` known to transformers (once per process)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QuadllmConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QuadllmHfQuantizer)
