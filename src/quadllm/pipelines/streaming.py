"""Streaming quantization: models larger than memory, one decoder layer at a time.

:func:`quantize_streaming` does what :func:`quadllm.quantize` followed by
:func:`quadllm.save` does, for a Hugging Face directory of safetensors files, without
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
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import init_empty_weights
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..arch import ArchAdapter, get_adapter
from ..config import ConfigError, QuantConfig
from ..io.checkpoint import CheckpointError, atomic_checkpoint_dir, write_index, write_metadata, write_tensors
from ..io.lazy_weights import LazyWeights, materialize, release
from ..io.memory import map_large_allocations, peak_rss_mb, release_freed_memory
from ..io.storage import round_to_storage, storage_state_dict, tensor_bytes
from ..nn.modules import QuadLinear, use_quad_attention
from ..steps.calibration import LayerInputs, MomentAccumulator, capture_layer_inputs, run_layer
from ..version import __version__
from .recipe import LayerRecipe, structure_of

log = logging.getLogger(__name__)

__all__ = ["ActivationStore", "quantize_streaming"]


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


@dataclass
class _Run:
    """What the phases of one streaming run share."""

    config: QuantConfig
    recipe: LayerRecipe
    model: nn.Module  # the transformers model on the meta device
    weights: LazyWeights
    budget: int | None
    workdir: Path | None
    progress: bool
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        names = {id(m): n for n, m in self.model.named_modules()}
        self.names = names
        self.layers = self.adapter.layers(self.model)
        self.prefixes = [names[id(layer)] + "." for layer in self.layers]
        self.emb_key = names[id(self.adapter.embedding(self.model))] + ".weight"
        self.n_shards = len(self.layers) + 1

    @property
    def adapter(self) -> ArchAdapter:
        return self.recipe.adapter

    def store(self) -> ActivationStore:
        return ActivationStore(self.budget, self.workdir)

    def propagate(self, layer: nn.Module, hidden: ActivationStore) -> ActivationStore:
        """The layer's outputs for every batch of ``hidden`` (which is then closed)."""
        out = self.store()
        for h, kw in zip(hidden, self.kwargs):
            out.append(run_layer(layer, h, kw))
        hidden.close()
        return out

    def shard_name(self, i: int) -> str:
        return f"model-{i:05d}-of-{self.n_shards:05d}.safetensors"


def _open_source(model_dir: Path, config: QuantConfig, tokenizer):
    """The configuration, tokenizer and empty (meta-device) model of ``model_dir``, and its weights
    for reading: unsupported families and bad configurations fail here, before any weight is read."""
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the configuration of {model_dir}: {exc}") from exc
    get_adapter(hf_config)
    weights = LazyWeights(model_dir)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{model_dir} has no tokenizer to save with the checkpoint: {exc}") from exc
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config)
    adapter = get_adapter(model)
    adapter.check(model)
    recipe = LayerRecipe(config, adapter)
    use_quad_attention(model)
    return tokenizer, model, recipe, weights


def _capture_inputs(run: _Run, samples: torch.Tensor) -> ActivationStore:
    """Phase 1: the inputs of layer 0 (original basis) and the layers' keyword arguments, with
    only the embedding table read."""
    t0 = time.perf_counter()
    adapter, model = run.adapter, run.model
    adapter.set_embedding(model, _Lookup(run.weights.get(run.emb_key)))
    captured = capture_layer_inputs(model, adapter, samples, run.config.calib_batch)
    adapter.set_embedding(model, nn.Identity())
    inputs = run.store()
    for h in captured.hidden:
        inputs.append(h)
    run.kwargs = captured.kwargs
    run.timings["capture_s"] = time.perf_counter() - t0
    return inputs


def _moment_pass(run: _Run, inputs: ActivationStore) -> torch.Tensor:
    """Phase 2 (pass 1, rank > 0): the original layers one by one over the calibration hidden
    states, accumulating the residual stream's second moment."""
    t0 = time.perf_counter()
    acc = MomentAccumulator(run.adapter.hidden_size, run.config.moment == "normalized")
    hidden = inputs
    bar = tqdm(run.layers, desc="moment (pass 1)", unit="layer", disable=not run.progress)
    for i, meta_layer in enumerate(bar):
        layer = copy.deepcopy(meta_layer)  # pass 2 needs the original (meta) modules again
        materialize(layer, run.weights, run.prefixes[i], run.dtype)
        run.recipe.prepare(layer, run.dtype)  # as the in-memory pipeline measures it (norm gains fused)
        handles = acc.attach(layer, run.adapter)
        try:
            out = run.store()
            for h, kw in zip(hidden, run.kwargs):
                out.append(run_layer(layer, h, kw))
        finally:
            for hd in handles:
                hd.remove()
        if hidden is not inputs:
            hidden.close()
        hidden = out
        del layer
    hidden.close()
    run.timings["moment_s"] = time.perf_counter() - t0
    return acc.moment


def _quantize_layers(run: _Run, inputs: ActivationStore | None, tmp: Path) -> dict[str, str]:
    """Phase 3 (pass 2): layer by layer, the recipe's steps, GPTQ on the layer's calibration
    inputs (which then pass through the quantized layer), one shard written; returns the
    tensor -> shard map."""
    recipe, config = run.recipe, run.config
    weight_map: dict[str, str] = {}
    hidden = inputs if config.needs_layer_inputs else None  # RTN alone needs no activations in pass 2
    if inputs is not None and hidden is None:
        inputs.close()
    if hidden is not None and recipe.basis is not None:
        Q = recipe.basis
        proj = (Q.T @ torch.eye(Q.shape[0], dtype=torch.float64)).to(run.dtype)
        hidden = _map(inputs, lambda h: F.linear(h.to(run.dtype), proj), run.budget, run.workdir)
    reference = hidden if config.weights == "gptaq" else None  # the full-precision model's hidden states
    bar = tqdm(run.layers, desc=f"{config.weights.upper()} (pass 2)", unit="layer", disable=not run.progress)
    for i, layer in enumerate(bar):
        t_layer = time.perf_counter()
        materialize(layer, run.weights, run.prefixes[i], run.dtype)
        recipe.prepare(layer, run.dtype)
        recipe.transform(layer)
        recipe.set_quantizers(layer, i)
        quad_linears = [m for m in layer.modules() if isinstance(m, QuadLinear)]
        for m in quad_linears:
            m.act_enabled = False
            m.cache_dequantized = False  # no float copy of the weights already quantized
        inputs = LayerInputs(hidden, run.kwargs, reference) if hidden is not None else None
        float_layer = recipe.quantize_weights(layer, i, inputs)
        if float_layer is not None and i + 1 < len(run.layers):  # GPTAQ: the full-precision stream too
            new_reference = run.store()
            for h, kw in zip(inputs.reference, run.kwargs):
                new_reference.append(run_layer(float_layer, h, kw))
            if reference is not None and reference is not hidden:
                reference.close()
            reference = new_reference
        del float_layer, inputs
        if hidden is not None and i + 1 < len(run.layers):
            hidden = run.propagate(layer, hidden)
        for m in quad_linears:
            m.act_enabled = True
        round_to_storage(layer)
        state = storage_state_dict(layer, prefix=run.prefixes[i])
        name = run.shard_name(i + 1)
        write_tensors(state, tmp / name)
        weight_map.update({k: name for k in state})
        del state
        release(layer)
        release_freed_memory()
        bar.set_postfix(sec=f"{time.perf_counter() - t_layer:.1f}", peak_mb=f"{peak_rss_mb():.0f}")
    if hidden is not None:
        hidden.close()
    if reference is not None and reference is not hidden:
        reference.close()
    return weight_map


def _write_ends(run: _Run, tmp: Path) -> dict[str, str]:
    """Phase 4: the embedding, final norm and head, through the recipe, to the last shard."""
    adapter, model, weights = run.adapter, run.model, run.weights
    emb = nn.Embedding(1, 1)
    emb.weight = nn.Parameter(weights.get(run.emb_key, torch.float16), requires_grad=False)
    adapter.set_embedding(model, emb)
    final = adapter.final_norm(model)
    materialize(final, weights, run.names[id(final)] + ".", run.dtype)
    head = adapter.head(model)
    if adapter.tied:
        head.weight = emb.weight
    else:
        materialize(head, weights, run.names[id(head)] + ".", torch.float16)
    run.recipe.prepare_ends(model, run.dtype)
    run.recipe.transform_ends(model)
    round_to_storage(model)
    state = storage_state_dict(model, skip_meta=True)  # the layers are back on the meta device
    name = run.shard_name(run.n_shards)
    write_tensors(state, tmp / name)
    return {k: name for k in state}


@torch.no_grad()
def quantize_streaming(model_dir: str | Path, config: QuantConfig, samples: torch.Tensor | None,
                       out_dir: str | Path, tokenizer=None, original: Any = None, progress: bool = True,
                       activation_budget_bytes: int | None = 2 << 30, workdir: str | Path | None = None
                       ) -> dict[str, Any]:
    """Quantize the safetensors model in ``model_dir`` layer by layer and write the checkpoint
    ``out_dir`` (sharded, atomically). ``tokenizer``: saved with it (default: ``model_dir``'s).
    Returns the run's summary (timings, peak memory, sizes)."""
    t_start = time.perf_counter()
    map_large_allocations()
    model_dir = Path(model_dir)
    tokenizer, model, recipe, weights = _open_source(model_dir, config, tokenizer)
    if config.needs_calibration and samples is None:
        raise ConfigError("streaming quantization with QUAD or GPTQ needs calibration samples")
    if samples is not None and samples.dtype != torch.long:
        raise TypeError("calib_samples must be a LongTensor of token ids [n, seqlen]")
    run = _Run(config, recipe, model, weights, activation_budget_bytes, Path(workdir) if workdir else None, progress)
    log.info("streaming quantization of %s (%d layers): %s", model_dir, len(run.layers), config.describe())

    inputs = _capture_inputs(run, samples) if config.needs_calibration else None
    moment = _moment_pass(run, inputs) if config.rank > 0 else None
    info = recipe.fit_basis(moment)
    moment = None  # its [d, d] float64 matrix is not needed any more
    release_freed_memory()

    t0 = time.perf_counter()
    with atomic_checkpoint_dir(out_dir) as tmp:
        weight_map = _quantize_layers(run, inputs, tmp)
        run.timings["weights_s"] = time.perf_counter() - t0
        weight_map.update(_write_ends(run, tmp))
        kinds = tensor_bytes(model)  # meta tensors keep their shapes: this counts every layer too
        total = write_index(tmp, weight_map)
        run.timings["quantize_s"] = time.perf_counter() - t_start
        info.update(run.timings)
        info.update(recipe.facts())
        quad_info = {"quant_config": config.to_dict(), "structure": structure_of(config, recipe.adapter),
                     "timings": info, "library_version": __version__,
                     "streaming": {"peak_memory_mb": round(peak_rss_mb()), "shards": run.n_shards,
                                   "activation_budget_bytes": activation_budget_bytes}}
        write_metadata(tmp, model.config, tokenizer, quad_info, original,
                       {"weights_file_bytes": total, "tensor_bytes": kinds})
    log.info("streaming quantization done in %.1f s, peak memory %.0f MB", run.timings["quantize_s"], peak_rss_mb())
    return {"timings": info, "peak_memory_mb": round(peak_rss_mb()), "weights_bytes": total, "tensor_bytes": kinds}
