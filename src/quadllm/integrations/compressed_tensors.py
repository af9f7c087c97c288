"""Reading a compressed-tensors checkpoint back with compressed-tensors' own code, in plain torch:
the reference an export (``quadllm export --format compressed-tensors``) is checked against.

transformers (5.24) builds such a checkpoint's quantized linears but does not apply its
``transform_config`` (its configuration class does not even keep it), so a checkpoint with online
transforms loaded by ``from_pretrained`` computes something else. :func:`load_exported` applies
both configurations with compressed-tensors' functions (``apply_quantization_config``, the
``ModelCompressor``'s packing and unpacking, ``apply_transform_config``) to the stock transformers
model, then loads the tensors. Needs ``pip install 'quadllm[export]'`` (compressed-tensors).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import QuadllmError
from ..io.compressed_tensors import QUANT_METHOD

log = logging.getLogger(__name__)

__all__ = ["ExportLoadError", "available", "load_exported"]


class ExportLoadError(QuadllmError, ValueError):
    """A compressed-tensors checkpoint that cannot be loaded, with the reason."""


def available() -> bool:
    """Whether the compressed-tensors package can be imported."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return False
    return True


def load_exported(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model in ``path`` (a compressed-tensors checkpoint with ``model.safetensors``), its weights
    unpacked by compressed-tensors and its online transforms and per-token activation quantization
    applied by compressed-tensors' hooks. Every tensor of the file must land in the model and every
    quantized linear and transform must get one: anything else is an error."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
        from compressed_tensors.transform import TransformConfig, apply_transform_config
    except ImportError as exc:
        raise ExportLoadError("reading a compressed-tensors checkpoint needs the compressed-tensors package "
                              "(pip install 'quadllm[export]')") from exc
    p = Path(path)
    raw = json.loads((p / "config.json").read_text())
    qc = raw.get("quantization_config") or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise ExportLoadError(f"{p}: not a compressed-tensors checkpoint (quant_method {qc.get('quant_method')!r})")
    qc = copy.deepcopy(qc)
    tc = qc.pop("transform_config", None)
    qconfig = QuantizationConfig.model_validate(qc)
    tconfig = TransformConfig.model_validate(tc) if tc else None

    config = AutoConfig.from_pretrained(p)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    apply_quantization_config(model, qconfig, run_compressed=False)
    compressor = ModelCompressor(quantization_config=qconfig, transform_config=tconfig)
    compressor.compress_model(model)  # the compressed tensors' places (weight_packed, ...)
    if tconfig is not None:
        apply_transform_config(model, tconfig)
    state = load_file(p / "model.safetensors")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a scheme's matrix is stored once; the other modules' transforms hold that very tensor
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]
    if missing or unexpected:
        raise ExportLoadError(f"{p}: the tensors do not match the model (missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]})")
    compressor.decompress_model(model)
    return model.to(dtype)
