"""Reading a Hugging Face safetensors directory one tensor at a time, without keeping it mapped."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .checkpoint import WEIGHTS_INDEX, CheckpointError

__all__ = ["LazyWeights", "materialize", "release"]


class LazyWeights:
    """The tensors of a Hugging Face directory (``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``), read one tensor at a time.

    Each read maps the file, copies the tensor out and unmaps it again: a mapping kept open
    would keep every page read so far in this process's resident memory (they count in its
    RSS until unmapped), which for a 16 GB model is the whole model by the end of a run."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        index = self.dir / WEIGHTS_INDEX
        single = self.dir / "model.safetensors"
        try:
            if index.is_file():
                self.weight_map: dict[str, str] = dict(json.loads(index.read_text())["weight_map"])
            elif single.is_file():
                self.weight_map = {k: single.name for k in self._handle(single.name).keys()}
            else:
                raise CheckpointError(f"{self.dir} has no model.safetensors nor {WEIGHTS_INDEX}: streaming "
                                      "quantization reads safetensors directories only")
        except (OSError, ValueError, KeyError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"cannot read the weights of {self.dir}: {exc}") from exc

    def _handle(self, name: str):
        """A new handle on one file (the caller drops it, which unmaps the file)."""
        path = self.dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the index but missing")
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is corrupt or unreadable: {exc}") from exc

    def get(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``key`` as a copy in memory (``dtype``: converted, floating point only)."""
        if key not in self.weight_map:
            raise CheckpointError(f"{self.dir}: tensor {key} is missing")
        t = self._handle(self.weight_map[key]).get_tensor(key)  # a view of the mapped file
        if dtype is not None and t.is_floating_point():
            return t.to(dtype, copy=True)
        return t.clone()

    def numel(self) -> int:
        """Elements of all tensors, read from the headers only."""
        total = 0
        for name in sorted(set(self.weight_map.values())):
            handle = self._handle(name)
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k, f in self.weight_map.items() if f == name)
        return total


@torch.no_grad()
def materialize(module: nn.Module, weights: LazyWeights, prefix: str, dtype: torch.dtype) -> None:
    """Give ``module`` (on the meta device) its tensors ``prefix + name`` from ``weights``."""
    state = {}
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if t.device.type != "meta":
            continue
        t = weights.get(prefix + name, dtype)
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"{weights.dir}: the weight {prefix + name} has NaN or Inf values")
        state[name] = t
    module.load_state_dict(state, strict=False, assign=True)
    for t in module.parameters():
        t.requires_grad_(False)


def release(module: nn.Module) -> None:
    """Drop a module's tensors (back to the meta device)."""
    module.to("meta")
