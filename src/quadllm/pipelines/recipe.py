"""The per-layer recipe: what QUAD does to one decoder layer, in order, and nowhere else.

The in-memory pipeline (:mod:`quadllm.pipelines.in_memory`), the streaming pipeline
(:mod:`quadllm.pipelines.streaming`) and the checkpoint loader (:mod:`quadllm.pipelines.loading`)
all go through one :class:`LayerRecipe` built from the :class:`~quadllm.config.QuantConfig`:

1. :meth:`~LayerRecipe.prepare`: quadllm modules, norm gains fused into the readers (original basis);
2. :meth:`~LayerRecipe.fit_basis` (once per model): ``Q`` from the residual second moment;
3. :meth:`~LayerRecipe.transform`: the residual basis ``Q``, the online transforms, the KV quantizer;
4. :meth:`~LayerRecipe.set_quantizers`: the activation quantizer of every linear;
5. :meth:`~LayerRecipe.quantize_weights`: (``o_rank``, ``down_rank``) the input subspaces, (``learn_transform``)
   the learned transforms, (``w_clip_learn``) the learned weight clips, GPTQ or RTN,
   then (``a_clip_search``) each input's clip ratio, then (``a_clip_learn``) the layer's ratios trained jointly;

and :meth:`~LayerRecipe.skeleton`: the empty modules those steps produce, for loading a checkpoint.
The embedding, final norm and head have the same steps (``*_ends``). A new per-layer step goes
here, with its skeleton beside it.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ..arch import ArchAdapter, get_submodule, set_submodule
from ..config import RANK_ROLES, ConfigError, QuantConfig, RankSetting, module_key, pattern_matches
from ..core.affine import AffineTail
from ..nn.modules import QuadEmbedding, QuadHead, QuadLinear, QuadRMSNorm
from ..steps.calibration import LayerInputs
from ..steps.clipping import float_weights, search_layer_act_clips
from ..steps.layer_fit import float_copy, float_targets
from ..steps.learned_clip import learn_layer_act_clips
from ..steps.learned_transform import learn_layer_transforms
from ..steps.learned_weight_clip import keep_after_quantization, learn_layer_weight_clips
from ..steps.decompose import decompose_down_proj, decompose_o_proj, empty_split_transform, o_rank_transform
from ..steps.smoothing import smooth_down_proj
from ..steps.transforms import (
    attach_layer_kv_quant,
    kv_rotation,
    norm_eps,
    online_transform_layer,
    online_transforms,
    prepare_ends,
    prepare_layer,
    residual_basis,
    set_layer_activation_quant,
    transform_ends,
    transform_layer,
)
from ..steps.weights import gptq_layer, rtn_layer

log = logging.getLogger(__name__)

__all__ = ["LayerRecipe", "check_overrides", "module_table", "rank_table", "structure_of"]


def structure_of(config: QuantConfig, adapter: ArchAdapter) -> dict[str, Any]:
    """What the quantized model's modules look like (saved with the checkpoint)."""
    return {
        "hidden_size": adapter.hidden_size,
        "rank": config.rank,
        "expanded_hidden_size": adapter.hidden_size + config.rank,
        "residual_transform": config.residual_transform,
        "online_transforms": config.rotate,
        "tied_head": adapter.tied,
        "kv_bits": config.kv_bits,
        "down_rank": config.down_rank,
        "o_rank": config.o_rank,
        "learned_transform": config.learns_transforms,
        # each decoder linear's precision, recorded where overrides make them differ
        **({"modules": module_table(config, adapter)} if config.overrides else {}),
        # o_proj's and down_proj's ranks, where rank overrides make them differ per layer
        **({"module_ranks": rank_table(config, adapter)} if any(
            isinstance(s, RankSetting) for _, s in config.parsed_overrides()) else {}),
    }


def check_overrides(config: QuantConfig, adapter: ArchAdapter) -> None:
    """Every override's pattern names at least one decoder linear of this model (a typo fails here,
    before any work, with the names it could have matched)."""
    keys = [module_key(i, name) for i in range(adapter.num_layers) for name in adapter.all_linears]
    for text, (pattern, setting) in zip(config.overrides, config.parsed_overrides()):
        named = [key for key in keys if pattern_matches(pattern, key)]
        if not named:
            raise ConfigError(f"override {text!r} names no module of this model; its decoder linears are "
                              f"{keys[0]} ... {keys[-1]} ({', '.join(adapter.all_linears)} in layers 0-"
                              f"{adapter.num_layers - 1})")
        if isinstance(setting, RankSetting):
            _check_rank_override(text, setting.rank, named, config, adapter)


def _check_rank_override(text: str, rank: int, named: list[str], config: QuantConfig, adapter: ArchAdapter) -> None:
    """A ``rank<N>`` override names only o_proj / down_proj inputs, and N fits them."""
    roles = {adapter.role(key.split(".", 2)[2]) for key in named}
    if not roles <= set(RANK_ROLES):
        raise ConfigError(f"override {text!r}: a rank applies to o_proj (per head) and down_proj inputs only "
                          f"({adapter.o_proj}, {adapter.down_proj}); the residual rank is one per model (--rank)")
    if "o_proj" in roles and rank >= adapter.head_dim:
        raise ConfigError(f"override {text!r}: o_proj's rank per head must be smaller than the head dimension "
                          f"{adapter.head_dim}")
    if "o_proj" in roles and rank and config.kv_bits < 16:
        raise ConfigError(f"override {text!r}: an o_proj rank rotates the values, which a quantized KV cache would "
                          "store unrotated; use kv_bits 16")
    if "down_proj" in roles and rank >= adapter.intermediate_size:
        raise ConfigError(f"override {text!r}: down_proj's rank must be smaller than the intermediate size "
                          f"{adapter.intermediate_size}")
    if "o_proj" in roles and not rank and config.o_rank_bits < 16:
        raise ConfigError(f"override {text!r}: o_rank_bits 8 needs o_proj ranks > 0")


def rank_table(config: QuantConfig, adapter: ArchAdapter) -> dict[str, int]:
    """o_proj's (per head) and down_proj's rank in every layer, resolved from the configuration
    and the rank overrides: what the checkpoint records."""
    return {module_key(i, name): config.module_rank(adapter.role(name), module_key(i, name))
            for i in range(adapter.num_layers) for name in (adapter.o_proj, adapter.down_proj)}


def module_table(config: QuantConfig, adapter: ArchAdapter) -> dict[str, str]:
    """Every decoder linear's precision (``fp``, ``w4a4``, ``w4a8``, ``w4a16`` ...), resolved from the
    mode and the overrides: what the checkpoint records and the report shows."""
    return {module_key(i, name): config.module_setting(adapter.role(name), module_key(i, name)).name(config.w_bits)
            for i in range(adapter.num_layers) for name in adapter.all_linears}


class LayerRecipe:
    """QUAD's steps for the decoder layers (and ends) of one model under one configuration.

    Building it validates the configuration against the model (the rank must fit in the hidden
    size): the one place that check is made."""

    def __init__(self, config: QuantConfig, adapter: ArchAdapter) -> None:
        config.validate()
        config.check_model_sizes(adapter.hidden_size, adapter.intermediate_size, adapter.head_dim)
        check_overrides(config, adapter)
        self.config = config
        self.adapter = adapter
        self.basis: torch.Tensor | None = None  # Q [d, d + rank], once fitted
        self._kv_rotation: torch.Tensor | None = None
        #: per layer, the share of down_proj's input (o_proj's values') energy its full-precision coordinates hold
        self.down_energy: list[float] = []
        self.o_energy: list[float] = []
        #: per layer, whether its learned transforms were kept (they lowered its output error)
        self.transforms_kept: list[bool] = []
        #: per layer, whether its learned weight clips were kept (else GPTQ/RTN searched its own)
        self.weight_clips_kept: list[bool] = []

    @property
    def rank(self) -> int:
        return self.config.rank

    # --- the exact part -------------------------------------------------------------------
    def prepare(self, layer: nn.Module, dtype: torch.dtype) -> None:
        """quadllm modules for one layer, norm gains fused into its readers (original basis)."""
        prepare_layer(layer, self.adapter, dtype)

    def prepare_ends(self, model: nn.Module, dtype: torch.dtype) -> None:
        prepare_ends(model, self.adapter, dtype)

    def fit_basis(self, moment: torch.Tensor | None) -> dict[str, Any]:
        """``Q`` from the residual second moment (None for rank 0); returns facts for the record."""
        info: dict[str, Any] = {}
        if self.rank > 0:
            if moment is None:
                raise ValueError("rank > 0 needs the residual second moment")
            evals = torch.linalg.eigvalsh(moment).flip(0)
            info["captured_energy"] = float(evals[:self.rank].sum() / evals.sum())
            log.info("residual second moment: top-%d eigenvectors hold %.1f%% of the energy", self.rank,
                     100 * info["captured_energy"])
        if self.config.residual_transform:
            self.basis = residual_basis(moment if self.rank > 0 else None, self.rank, self.config.seed,
                                        rotate=self.config.rotate, hidden_size=self.adapter.hidden_size)
        return info

    def transform(self, layer: nn.Module) -> None:
        """After :meth:`prepare` and :meth:`fit_basis`: the expanded basis, the online
        transforms and the KV-cache quantizer of one layer."""
        if self.basis is not None:
            transform_layer(layer, self.adapter, self.basis, self.rank)
        if self.config.rotate:
            online_transform_layer(layer, self.adapter)
        if self.config.kv_bits < 16:
            attach_layer_kv_quant(layer, self.adapter, self.config.kv_bits, self.config.kv_clip, self.kv_rotation())

    def transform_ends(self, model: nn.Module) -> None:
        if self.basis is not None:
            transform_ends(model, self.adapter, self.basis)

    def kv_rotation(self) -> torch.Tensor | None:
        """The per-head rotation of q and k before the KV quantizer (one matrix for all layers)."""
        if self._kv_rotation is None and self.config.rotate:
            self._kv_rotation = kv_rotation(self.adapter, True)
        return self._kv_rotation

    # --- quantization ---------------------------------------------------------------------
    def set_quantizers(self, layer: nn.Module, index: int) -> None:
        """The activation quantizer of every linear of decoder layer ``index``."""
        set_layer_activation_quant(layer, self.adapter, self.config, index)

    def quantize_weights(self, layer: nn.Module, index: int, inputs: LayerInputs | None) -> nn.Module | None:
        """With ``o_rank`` and ``down_rank``, o_proj's and down_proj's input subspaces first (exact), with
        ``learn_transform`` every quantized input's learned transform (exact), with ``w_clip_learn``
        the weight clip ratios trained against the float layer; then GPTQ on ``inputs``
        (the layer's inputs, activation quantization off) or RTN; then, with ``a_clip_search``, the
        clip ratio of each linear input on the same inputs, and with ``a_clip_learn`` the layer's
        ratios trained against its float output. Returns, for GPTAQ, the layer as it was
        before its weights were quantized: the caller runs the full-precision hidden states
        (``inputs.reference``) through it for the next layer."""
        if self.config.needs_layer_inputs and inputs is None:
            raise ValueError("GPTQ, the clip search and --down-rank need the layer's calibration inputs")
        o_rank = self.config.module_rank("o_proj", module_key(index, self.adapter.o_proj))
        down_rank = self.config.module_rank("down_proj", module_key(index, self.adapter.down_proj))
        if o_rank:
            self.o_energy.append(decompose_o_proj(layer, self.adapter, inputs, o_rank, index))
        if self.config.down_smooth:
            smooth_down_proj(layer, self.adapter, inputs, self.config.down_smooth, index)
        if down_rank:
            self.down_energy.append(decompose_down_proj(layer, self.adapter, inputs, down_rank, index))
        if self.config.learns_transforms:
            self.transforms_kept.append(learn_layer_transforms(layer, self.adapter, inputs, self.config, index))
        # the float layer's outputs, for training the weight clips and for GPTQ's test of them
        clip_targets = float_targets(float_copy(layer), inputs) if self.config.w_clip_learn else None
        clips = learn_layer_weight_clips(layer, self.adapter, inputs, clip_targets, self.config, index) \
            if clip_targets is not None else None
        clips_kept = clips is not None
        reference = float_weights(layer, self.adapter) if self.config.searches_act_clips else None
        reference_layer = copy.deepcopy(layer) if self.config.weights == "gptaq" else None
        float_layer = float_copy(layer) if self.config.learns_act_clips else None
        if reference_layer is not None and inputs.reference is None:
            inputs.reference = list(inputs.hidden)  # the first layer: both models' inputs are the same
        if self.config.weights in ("gptq", "gptaq"):
            def quantize(target: nn.Module, ratios: dict[str, torch.Tensor] | None) -> None:
                gptq_layer(target, self.adapter, self.config, inputs, index, reference_layer, clips=ratios)

            if clips is not None:  # trained for round-to-nearest: GPTQ has the last word
                clips_kept = keep_after_quantization(layer, self.adapter, inputs, clip_targets, clips, quantize,
                                                     index)
            else:
                quantize(layer, None)
        else:
            rtn_layer(layer, self.adapter, self.config, index, clips=clips)
        if self.config.w_clip_learn:
            self.weight_clips_kept.append(clips_kept)
        if reference is not None:
            search_layer_act_clips(layer, self.adapter, inputs, reference, index)
        if float_layer is not None:
            learn_layer_act_clips(layer, self.adapter, inputs, float_layer, self.config.a_clip_learn, index,
                                  self.config.a_clip_learn_loss)
        return reference_layer

    def facts(self) -> dict[str, Any]:
        """What the quantization steps found, for the checkpoint's record."""
        facts = {}
        for key, kept in (("learned_transforms_kept", self.transforms_kept),
                          ("learned_weight_clips_kept", self.weight_clips_kept)):
            if kept:
                facts[key] = f"{sum(kept)} of {len(kept)} layers"
        return facts

    # --- loading --------------------------------------------------------------------------
    def skeleton(self, layer: nn.Module, index: int, dtype: torch.dtype, norms: bool = True, pad: int = 0) -> None:
        """Replace one original (empty-weight) layer's modules by the empty quantized modules
        the steps above produce, ready for ``load_state_dict``; ``norms=False`` keeps the layer's
        own norms and ``pad`` widens the stream by that many zero coordinates after the outlier
        ones (the stock layout's, :mod:`quadllm.io.stock_layout`)."""
        adapter, config = self.adapter, self.config
        d, r = adapter.hidden_size, self.rank
        wide = d + r + pad  # the expanded residual stream (rank 0 without a residual transform)
        online = online_transforms(adapter, layer) if config.rotate else {}
        def empty(name: str, in_features: int | None, out_features: int | None, rank: int,
                  transform: nn.Module | None) -> None:
            self._empty_linear(layer, index, name, in_features, out_features, rank, transform, dtype)

        for group in adapter.reader_groups:
            for name in group.linears:
                empty(name, wide, None, r + pad, None)
            if norms:
                set_submodule(layer, group.norm, QuadRMSNorm(d, norm_eps(get_submodule(layer, group.norm))))
        for name in adapter.writers:
            k = config.module_rank(adapter.role(name), module_key(index, name))
            if name == adapter.down_proj and k:
                lin = get_submodule(layer, name)
                split = empty_split_transform(lin, online.get(name), k, dtype)
                empty(name, lin.in_features + k, wide, k, split)
            elif name == adapter.o_proj and k:
                empty(name, None, wide, adapter.num_heads * k, o_rank_transform(adapter, online.get(name), k))
            else:
                empty(name, None, wide, 0, online.get(name))
        if config.kv_bits < 16:
            attach_layer_kv_quant(layer, adapter, config.kv_bits, config.kv_clip, self.kv_rotation())

    def _empty_linear(self, layer: nn.Module, index: int, name: str, in_features: int | None,
                      out_features: int | None, rank: int, transform: nn.Module | None, dtype: torch.dtype) -> None:
        lin = get_submodule(layer, name)
        in_features = in_features or lin.in_features
        role, key = self.adapter.role(name), module_key(index, name)
        act = self.config.act_spec(role, key)
        if self.config.learns_transforms and act.enabled:
            transform = AffineTail.identity(rank, in_features - rank, dtype, transform)
        quantized = self.config.module_setting(role, key).weights
        q = QuadLinear(in_features, out_features or lin.out_features, rank=rank, bias=lin.bias is not None,
                       act=act, transform=transform, dtype=dtype, allocate=not quantized)
        if quantized:
            q.allocate_quantized(self.config.w_bits, self.config.group_size, dtype)
        if self.config.stores_act_clips and q.act.enabled:
            q.set_act_clip(self.config.a_clip)  # a place for the searched or learned value the checkpoint holds
        set_submodule(layer, name, q)

    def skeleton_ends(self, model: nn.Module, dtype: torch.dtype, tied: bool) -> None:
        """The empty embedding, final norm and head of the quantized model."""
        adapter = self.adapter
        d = adapter.hidden_size
        wide = d + self.rank
        adapter.set_final_norm(model, QuadRMSNorm(d, norm_eps(adapter.final_norm(model))))
        vocab = adapter.embedding(model).weight.shape[0]
        emb = QuadEmbedding(torch.empty(vocab, d, dtype=dtype),
                            torch.empty(wide, d, dtype=dtype) if self.config.residual_transform else None)
        adapter.set_embedding(model, emb)
        head = adapter.head(model)
        bias = None if getattr(head, "bias", None) is None else torch.empty(vocab, dtype=dtype)
        proj = torch.empty(d, wide, dtype=dtype)
        adapter.set_head(model, QuadHead(proj, tied_to=emb, bias=bias) if tied else
                         QuadHead(proj, weight=torch.empty(vocab, d, dtype=dtype), bias=bias))
