"""Streaming quantization: models larger than memory, one decoder layer at a time.

:func:`quantize_streaming` does what :func:`quadllm.pipeline.quantize` followed by
:func:`quadllm.checkpoint.save` does, for a Hugging Face directory of safetensors files, without
ever holding the model: the weights are memory-mapped (:class:`LazyWeights`) and each decoder
layer is read, transformed, quantized, written to its own shard and dropped before the next.

1. The calibration samples' embeddings (the inputs of layer 0) and the attention arguments are
   captured with only the embedding table read.
2. QUAD (rank > 0): pass 1 runs the original layers one by one over the calibration hidden
   states and accumulates the residual stream's second moment; ``Q`` follows.
3. Pass 2 moves the hidden states to the expanded basis (``h Q``) and, layer by layer: fuse the
   norm gains, apply ``Q`` and the online transforms, attach the quantizers, quantize the weights
   (GPTQ on the hidden states, which then pass through the quantized layer), write the shard.
4. The embedding, final norm and head go to a last shard; the index and the configuration are
   written and the directory is renamed into place (atomically, as :func:`save` does).

Memory holds one layer in float32, its GPTQ Hessians, the calibration hidden states (spilled to
disk when they exceed ``activation_budget_bytes``) and, at the end, the embedding in FP16.
The result loads with :func:`quadllm.load` like any checkpoint; on a model that fits in memory
it is the in-memory pipeline's checkpoint, tensor for tensor (tested).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from . import __version__
from .arch import ArchAdapter, get_adapter
from .calibration import LayerInputs, MomentAccumulator, capture_layer_inputs, run_layer
from .checkpoint import WEIGHTS_INDEX, CheckpointError, _storage_state_dict, atomic_dir, tensor_bytes, write_metadata
from .config import ConfigError, QuantConfig
from .memory import map_large_allocations, peak_rss_mb, release_freed_memory
from .modules import QuadLinear
from .pipeline import round_to_storage, structure_of, use_quad_attention
from .transforms import (attach_layer_kv_quant, kv_rotation, online_transform_layer, prepare_ends, prepare_layer,
                         residual_basis, set_layer_activation_quant, transform_ends, transform_layer)
from .weights import gptq_layer, rtn_layer

log = logging.getLogger(__name__)

__all__ = ["LazyWeights", "ActivationStore", "quantize_streaming"]


class LazyWeights:
    """The tensors of a Hugging Face directory (``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``), read one tensor at a time.

    Each read maps the file, copies the tensor out and unmaps it again: a mapping kept open
    would keep every page read so far in this process's resident memory (they count in its
    RSS until unmapped), which for a 16 GB model is the whole model by the end of a run."""

    def __init__(self, directory: str | Path) -> None:
        from safetensors import safe_open

        self.dir = Path(directory)
        index = self.dir / WEIGHTS_INDEX
        single = self.dir / "model.safetensors"
        self._open = safe_open
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
            return self._open(str(path), framework="pt")
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


class ActivationStore:
    """A list of tensors kept in memory, or in files of a temporary directory once their total
    exceeds ``budget_bytes`` (read back memory-mapped, one at a time)."""

    def __init__(self, budget_bytes: int | None, workdir: Path | None = None) -> None:
        self.budget = budget_bytes
        self.items: list[torch.Tensor | Path] = []
        self.bytes = 0
        self._dir = workdir
        self._tmp: tempfile.TemporaryDirectory | None = None

    def append(self, t: torch.Tensor) -> None:
        self.bytes += t.numel() * t.element_size()
        if self.budget is not None and self.bytes > self.budget:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="quadllm-acts-", dir=self._dir)
                log.info("calibration activations exceed %.0f MB: keeping them on disk in %s",
                         self.budget / 1e6, self._tmp.name)
            path = Path(self._tmp.name) / f"{len(self.items)}.pt"
            torch.save(t.contiguous(), path)
            self.items.append(path)
        else:
            self.items.append(t)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for item in self.items:
            yield torch.load(item, mmap=True, weights_only=True) if isinstance(item, Path) else item

    def __len__(self) -> int:
        return len(self.items)

    def close(self) -> None:
        self.items = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class _Lookup(nn.Module):
    """The embedding as a float32 lookup (the table stays in its stored dtype)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).to(torch.float32)


def _map(store: ActivationStore, fn, budget: int | None, workdir: Path | None) -> ActivationStore:
    out = ActivationStore(budget, workdir)
    for h in store:
        out.append(fn(h))
    store.close()
    return out


def _layer_state(layer: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in _storage_state_dict(layer).items()}


@torch.no_grad()
def quantize_streaming(model_dir: str | Path, config: QuantConfig, samples: torch.Tensor | None,
                       out_dir: str | Path, tokenizer=None, original: Any = None, progress: bool = True,
                       activation_budget_bytes: int | None = 2 << 30, workdir: str | Path | None = None
                       ) -> dict[str, Any]:
    """Quantize the safetensors model in ``model_dir`` layer by layer and write the checkpoint
    ``out_dir`` (sharded, atomically). ``tokenizer``: saved with it (default: ``model_dir``'s).
    Returns the run's summary (timings, peak memory, sizes)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config.validate()
    t_start = time.perf_counter()
    map_large_allocations()
    model_dir = Path(model_dir)
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the configuration of {model_dir}: {exc}") from exc
    get_adapter(hf_config)  # unsupported families fail here, before any weight is read
    weights = LazyWeights(model_dir)
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{model_dir} has no tokenizer to save with the checkpoint: {exc}") from exc
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    adapter: ArchAdapter = get_adapter(model)
    adapter.check(model)
    if config.rank > adapter.hidden_size:
        raise ConfigError(f"rank {config.rank} is larger than the hidden size {adapter.hidden_size}")
    needs_samples = config.rank > 0 or config.weights == "gptq"
    if needs_samples and samples is None:
        raise ConfigError("streaming quantization with QUAD or GPTQ needs calibration samples")
    if samples is not None and samples.dtype != torch.long:
        raise TypeError("calib_samples must be a LongTensor of token ids [n, seqlen]")
    use_quad_attention(model)
    work = Path(workdir) if workdir else None
    dtype = torch.float32
    names = {id(m): n for n, m in model.named_modules()}
    layers = adapter.layers(model)
    prefixes = [names[id(layer)] + "." for layer in layers]
    emb_key = names[id(adapter.embedding(model))] + ".weight"
    n_shards = len(layers) + 1
    shard_name = "model-{:05d}-of-{:05d}.safetensors".format
    log.info("streaming quantization of %s (%d layers): %s", model_dir, len(layers), config.describe())
    timings: dict[str, float] = {}

    # 1. the inputs of layer 0 (original basis) and the layers' keyword arguments
    inputs = None
    if needs_samples:
        t0 = time.perf_counter()
        adapter.set_embedding(model, _Lookup(weights.get(emb_key)))
        captured = capture_layer_inputs(model, adapter, samples, config.calib_batch)
        adapter.set_embedding(model, nn.Identity())
        inputs = ActivationStore(activation_budget_bytes, work)
        for h in captured.hidden:
            inputs.append(h)
        kwargs = captured.kwargs
        del captured
        timings["capture_s"] = time.perf_counter() - t0

    # 2. the residual second moment (pass 1)
    moment = None
    info: dict[str, Any] = {}
    if config.rank > 0:
        t0 = time.perf_counter()
        acc = MomentAccumulator(adapter.hidden_size, config.moment == "normalized")
        hidden = inputs
        for i, meta_layer in enumerate(tqdm(layers, desc="moment (pass 1)", unit="layer", disable=not progress)):
            layer = copy.deepcopy(meta_layer)  # pass 2 needs the original (meta) modules again
            materialize(layer, weights, prefixes[i], dtype)
            prepare_layer(layer, adapter, dtype)  # as the in-memory pipeline measures it (norm gains fused)
            handles = acc.attach(layer, adapter)
            try:
                out = ActivationStore(activation_budget_bytes, work)
                for h, kw in zip(hidden, kwargs):
                    out.append(run_layer(layer, h, kw))
            finally:
                for hd in handles:
                    hd.remove()
            if hidden is not inputs:
                hidden.close()
            hidden = out
            del layer
        hidden.close()
        moment = acc.moment
        timings["moment_s"] = time.perf_counter() - t0
        evals = torch.linalg.eigvalsh(moment).flip(0)
        info["captured_energy"] = float(evals[:config.rank].sum() / evals.sum())
        log.info("residual second moment: top-%d eigenvectors hold %.1f%% of the energy", config.rank,
                 100 * info["captured_energy"])

    Q = None
    if config.rotate or config.rank > 0:
        Q = residual_basis(moment, config.rank, config.seed, rotate=config.rotate, hidden_size=adapter.hidden_size)
    moment = acc = None  # noqa: F841 - their [d, d] float64 matrices are not needed any more
    release_freed_memory()
    rot = kv_rotation(adapter, config.rotate) if config.kv_bits < 16 else None

    # 3. layer by layer: transform, quantize, write (pass 2)
    weight_map: dict[str, str] = {}
    t0 = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        hidden = inputs if config.weights == "gptq" else None  # RTN needs no activations in pass 2
        if inputs is not None and hidden is None:
            inputs.close()
        if hidden is not None and Q is not None:
            proj = (Q.T @ torch.eye(Q.shape[0], dtype=torch.float64)).to(dtype)
            hidden = _map(inputs, lambda h: F.linear(h.to(dtype), proj), activation_budget_bytes, work)
        bar = tqdm(layers, desc=f"{config.weights.upper()} (pass 2)", unit="layer", disable=not progress)
        for i, layer in enumerate(bar):
            t_layer = time.perf_counter()
            materialize(layer, weights, prefixes[i], dtype)
            prepare_layer(layer, adapter, dtype)
            if Q is not None:
                transform_layer(layer, adapter, Q, config.rank)
            if config.rotate:
                online_transform_layer(layer, adapter)
            if config.kv_bits < 16:
                attach_layer_kv_quant(layer, adapter, config.kv_bits, config.kv_clip, rot)
            set_layer_activation_quant(layer, adapter, config)
            quad_linears = [m for m in layer.modules() if isinstance(m, QuadLinear)]
            for m in quad_linears:
                m.act_enabled = False
                m.cache_dequantized = False  # no float copy of the weights already quantized
            if config.weights == "gptq":
                gptq_layer(layer, adapter, config, LayerInputs(hidden, kwargs), i)
            else:
                rtn_layer(layer, adapter, config, i)
            if hidden is not None and i + 1 < len(layers):
                out = ActivationStore(activation_budget_bytes, work)
                for h, kw in zip(hidden, kwargs):
                    out.append(run_layer(layer, h, kw))
                hidden.close()
                hidden = out
            for m in quad_linears:
                m.act_enabled = True
            round_to_storage(layer)
            state = _layer_state(layer, prefixes[i])
            name = shard_name(i + 1, n_shards)
            save_file(state, str(tmp / name), metadata={"format": "pt", "quadllm": "1"})
            weight_map.update({k: name for k in state})
            del state
            release(layer)
            release_freed_memory()
            bar.set_postfix(sec=f"{time.perf_counter() - t_layer:.1f}", peak_mb=f"{peak_rss_mb():.0f}")
        if hidden is not None:
            hidden.close()
        timings["weights_s"] = time.perf_counter() - t0

        # 4. embedding, final norm, head
        emb = nn.Embedding(1, 1)
        emb.weight = nn.Parameter(weights.get(emb_key, torch.float16), requires_grad=False)
        adapter.set_embedding(model, emb)
        final = adapter.final_norm(model)
        materialize(final, weights, names[id(final)] + ".", dtype)
        head = adapter.head(model)
        if adapter.tied:
            head.weight = emb.weight
        else:
            materialize(head, weights, names[id(head)] + ".", torch.float16)
        prepare_ends(model, adapter, dtype)
        if Q is not None:
            transform_ends(model, adapter, Q)
        round_to_storage(model)
        ends_state = _storage_state_dict(model, skip_meta=True)  # the layers are back on the meta device
        name = shard_name(n_shards, n_shards)
        save_file(ends_state, str(tmp / name), metadata={"format": "pt", "quadllm": "1"})
        weight_map.update({k: name for k in ends_state})
        del ends_state
        kinds = tensor_bytes(model)  # meta tensors keep their shapes: this counts every layer too
        total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
        (tmp / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total, "format": "quadllm"},
                                                    "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        timings["quantize_s"] = time.perf_counter() - t_start
        info.update(timings)
        quad_info = {"quant_config": config.to_dict(), "structure": structure_of(config, adapter),
                     "timings": info, "library_version": __version__,
                     "streaming": {"peak_memory_mb": round(peak_rss_mb()), "shards": n_shards,
                                   "activation_budget_bytes": activation_budget_bytes}}
        write_metadata(tmp, model.config, tokenizer, quad_info, original,
                       {"weights_file_bytes": total, "tensor_bytes": kinds})
    log.info("streaming quantization done in %.1f s, peak memory %.0f MB", timings["quantize_s"], peak_rss_mb())
    return {"timings": info, "peak_memory_mb": round(peak_rss_mb()), "weights_bytes": total, "tensor_bytes": kinds}
