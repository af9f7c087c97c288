"""Storage precision: which tensors a checkpoint keeps in FP16, and the model rounded to match.

The in-memory model is rounded to the stored precision at the end of quantization
(:func:`round_to_storage`), so a loaded checkpoint gives bit-identical logits.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.modules import QuadEmbedding, QuadHead, QuadLinear

__all__ = ["STORAGE_DTYPE_ATTR", "STORAGE_HALF", "storage_dtype", "round_to_storage", "storage_state_dict",
           "tensor_bytes"]

STORAGE_HALF = ("w_outlier", "scales", "bias")
#: a module attribute giving the stored dtype of its ``weight`` and ``bias`` (the stock layout's
#: fused embedding and head, plain ``nn.Embedding`` and ``nn.Linear``: see :mod:`quadllm.io.stock_layout`)
STORAGE_DTYPE_ATTR = "quadllm_storage_dtype"


def storage_dtype(module: nn.Module, name: str) -> torch.dtype | None:
    """The dtype a tensor is stored in: FP16 for weight scales, outlier columns, biases, full-precision
    linears, the embedding and the head; None (keep as is) for everything else."""
    marked = getattr(module, STORAGE_DTYPE_ATTR, None)
    if marked is not None and name in ("weight", "bias"):
        return marked
    if isinstance(module, QuadLinear) and (name in STORAGE_HALF or (name == "weight" and not module.quantized)):
        return torch.float16  # a float weight: a linear an override keeps in full precision
    if isinstance(module, QuadEmbedding) and name == "weight":
        return torch.float16
    if isinstance(module, QuadHead) and name in ("own_weight", "bias"):
        return torch.float16
    return None


@torch.no_grad()
def round_to_storage(model: nn.Module) -> None:
    """Round in memory what the checkpoint stores in FP16, so a loaded model is identical."""
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            dt = storage_dtype(module, name)
            if dt is not None and t is not None and t.is_floating_point():
                t.copy_(t.to(dt).to(t.dtype))
        if isinstance(module, QuadLinear):
            module.drop_dequantized()


def storage_state_dict(model: nn.Module, prefix: str = "", skip_meta: bool = False) -> dict[str, torch.Tensor]:
    """The tensors as stored (FP16 where :func:`storage_dtype` says so), keys prefixed with
    ``prefix``; ``skip_meta`` leaves out tensors on the meta device (layers a streaming run has
    already written)."""
    modules = dict(model.named_modules())
    out = {}
    for key, t in model.state_dict().items():
        if skip_meta and t.device.type == "meta":
            continue
        mod_name, _, tname = key.rpartition(".")
        dt = storage_dtype(modules[mod_name], tname)
        t = t.detach()
        if dt is not None and t.is_floating_point():
            t = t.to(dt)
        out[prefix + key] = t.contiguous()
    return out


def tensor_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the stored tensors by kind (as written, FP16 where stored so)."""
    kinds = {"int4_weights": 0, "scales": 0, "outlier_columns": 0, "embedding_and_head": 0, "other": 0}
    for module in model.modules():
        for name, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if t is None:
                continue
            dt = storage_dtype(module, name)
            n = t.numel() * (torch.finfo(dt).bits // 8 if dt is not None else t.element_size())
            if isinstance(module, QuadLinear) and name == "qweight":
                kinds["int4_weights"] += n
            elif isinstance(module, QuadLinear) and name == "scales":
                kinds["scales"] += n
            elif isinstance(module, QuadLinear) and name == "w_outlier":
                kinds["outlier_columns"] += n
            elif isinstance(module, (QuadEmbedding, QuadHead)) or getattr(module, STORAGE_DTYPE_ATTR, None):
                kinds["embedding_and_head"] += n
            else:
                kinds["other"] += n
    return kinds
