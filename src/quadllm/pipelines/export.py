"""Exporting a rank-0 (QuaRot) checkpoint to the compressed-tensors format
(:mod:`quadllm.io.compressed_tensors`), which vLLM serves with its own INT4 kernels.

What carries over exactly: the INT4 (or INT2 / INT8) weight codes and their scales, the fused
norm gains and residual rotation (already in the weights; the stock layout of
:mod:`quadllm.io.stock_layout` supplies unit norms and the fused embedding and head), the online
transforms before down_proj and o_proj (stored as matrices), and symmetric per-token activation
quantization at the clip ratio compressed-tensors' grid corresponds to
(:func:`~quadllm.io.compressed_tensors.equivalent_clip`).

What cannot, refused before any work with the reason: full-precision outlier columns (QUAD's rank
> 0, ``--o-rank``, ``--down-rank``), learned per-layer transforms, asymmetric activations, a
quantized KV cache, LoRA adapters, 3-bit weights. Clip ratios other than the format's (quadllm's
default 0.9, per-linear searched or learned ratios) are refused unless ``approximate_activations``:
the export then rounds activations on compressed-tensors' grid, and the check measures the cost.

The export is checked before it replaces anything: with compressed-tensors installed, the new
directory is loaded back by compressed-tensors' own code (:mod:`quadllm.integrations.compressed_tensors`)
and compared with quadllm's ``fake`` backend on the embedded evaluation text: every decoder linear
on the very inputs quadllm's sees (:func:`linear_agreement`: the format itself), and the logits
against the source checkpoint (``source``) and against the same model in the stock layout
(``stock_layout``: its fused embedding and head rounded to FP16 as the export stores them). At W4A4
the logits are those of a neighbouring model, not a copy: compressed-tensors' grid puts each
token's largest magnitude on a rounding tie, where the last bit of the scale picks the code, and
per-token INT4 rounding turns such differences into others layer after layer. The figures go into
``quadllm_export.json``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter, get_submodule
from ..config import ConfigError, QuantConfig
from ..core.hadamard import OnlineTransform, sylvester_matrix
from ..data.text import load_text
from ..evaluation.perplexity import kl_per_position
from ..integrations import compressed_tensors as ct_reader
from ..io import compressed_tensors as ct
from ..io.checkpoint import CheckpointError, read_meta, write_tensors
from ..io.files import atomic_dir
from ..io.stock_layout import is_stock_config, to_stock_modules
from ..io.storage import storage_state_dict
from ..nn.modules import QuadLinear
from ..version import __version__
from .loading import load

log = logging.getLogger(__name__)

__all__ = ["ExportError", "export_obstacles", "check_export_dir", "export_compressed_tensors", "forward_capturing",
           "linear_agreement", "logit_agreement"]

#: the weight widths the format packs into 32-bit words
PACKABLE_BITS = (2, 4, 8)
#: relative tolerance within which a clip ratio counts as the format's
CLIP_RTOL = 1e-6


class ExportError(CheckpointError):
    """A checkpoint that cannot be exported, with the reason."""


def export_obstacles(config: QuantConfig, structure: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(impossible, approximate)``: what the compressed-tensors format cannot hold at all, and what
    it holds only with activations rounded on its own grid (allowed with ``approximate_activations``)."""
    impossible = []
    if config.rank:
        impossible.append(f"rank {config.rank}: the format has no full-precision outlier columns (QUAD's "
                          "decomposition); quantize with --method quarot (rank 0)")
    if config.o_rank:
        impossible.append(f"--o-rank {config.o_rank} keeps o_proj input columns outside the INT4 grid")
    if config.down_rank:
        impossible.append(f"--down-rank {config.down_rank} splits down_proj's input online")
    if config.learn_transform:
        impossible.append("--learn-transform adds a trained transform per layer, which the format's shared "
                          "transforms cannot hold")
    if not config.act_sym:
        impossible.append("asymmetric activations (--act-asym): vLLM's INT4 kernels take symmetric ones")
    if config.kv_bits < 16:
        impossible.append(f"--kv-bits {config.kv_bits}: quadllm's per-token KV quantization has no "
                          "counterpart in the format")
    if config.w_bits not in PACKABLE_BITS:
        impossible.append(f"{config.w_bits}-bit weights do not pack into 32-bit words")
    if structure.get("lora"):
        impossible.append("the checkpoint holds LoRA adapters")
    if config.overrides:
        impossible.append("per-module precisions (--override): the export writes one scheme per role")
    off_grid: dict[tuple[float, int], list[str]] = {}
    for role in ("reader", "o_proj", "down_proj"):
        spec = config.act_spec(role)
        if spec.enabled and not math.isclose(spec.clip_ratio, ct.equivalent_clip(spec.bits), rel_tol=CLIP_RTOL):
            off_grid.setdefault((spec.clip_ratio, spec.bits), []).append(role)
    approximate = [f"activation clip {clip:g} at INT{bits} ({', '.join(roles)} inputs): the format's grid is "
                   f"clip {ct.equivalent_clip(bits):.10f} (quantize with --a-clip {ct.equivalent_clip(bits):.10f})"
                   for (clip, bits), roles in off_grid.items()]
    if config.a_clip_search or config.a_clip_learn:
        approximate.append("per-linear activation clip ratios (--a-clip-search / --a-clip-learn): the format "
                           "has one grid for all")
    return impossible, approximate


def check_export_dir(src: Path, dst: Path) -> None:
    """Refuse an output that is the source, or that holds something other than an earlier export."""
    if dst == src:
        raise ExportError("the export needs a directory of its own (CKPT and OUT are the same)")
    if dst.exists() and not (dst.is_dir() and ((dst / ct.EXPORT_FILE).is_file() or not any(dst.iterdir()))):
        raise ExportError(f"{dst} exists and is not an earlier quadllm export; refusing to overwrite it")


def _layer_linears(model: nn.Module) -> list[tuple[str, str, QuadLinear]]:
    """``(full name, name inside the layer, module)`` of every decoder linear."""
    adapter = get_adapter(model.config)
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for layer in adapter.layers(model):
        for local in adapter.all_linears:
            lin = get_submodule(layer, local)
            out.append((f"{names[id(layer)]}.{local}", local, lin))
    return out


def _linear_tensors(lin: QuadLinear) -> dict[str, torch.Tensor]:
    """A quantized linear's tensors in the format: packed codes, float32 scales (the stored FP16
    values, which compressed-tensors then multiplies without rounding), shape, bias."""
    codes = lin.codes().to(torch.int8)
    out = {"weight_packed": ct.pack_int32(codes, lin.w_bits),
           "weight_scale": lin.scales.detach().to(torch.float32).contiguous(),
           "weight_shape": torch.tensor([lin.out_features, lin.in_features], dtype=torch.int32)}
    if lin.bias is not None:
        out["bias"] = lin.bias.detach().to(torch.float16)
    return out


def _is_sylvester(dense: torch.Tensor) -> bool:
    """Whether a normalized transform is the Sylvester Hadamard matrix (vLLM's fast kernel's)."""
    n = dense.shape[0]
    return not n & (n - 1) and torch.allclose(dense.to(torch.float64) * math.sqrt(n), sylvester_matrix(n), atol=1e-6)


def _transforms(linears: list[tuple[str, str, QuadLinear]]) -> tuple[dict[str, dict], dict[str, torch.Tensor]]:
    """One scheme per linear role with an online transform, its matrix stored once. Refuses roles
    whose layers hold different transforms (the format's scheme is one matrix)."""
    by_local: dict[str, list[tuple[str, QuadLinear]]] = {}
    for name, local, lin in linears:
        if lin.transform is not None:
            if not isinstance(lin.transform, OnlineTransform):
                raise ExportError(f"{name} applies a {type(lin.transform).__name__}, which the format cannot hold")
            by_local.setdefault(local, []).append((name, lin))
    schemes, tensors = {}, {}
    for local, members in by_local.items():
        dense = members[0][1].transform.dense().to(torch.float64)
        for name, lin in members[1:]:
            if not torch.equal(lin.transform.dense().to(torch.float64), dense):
                raise ExportError(f"{name}'s online transform differs from {members[0][0]}'s; the format "
                                  "shares one matrix per scheme")
        if len(members) != sum(1 for _, loc, _ in linears if loc == local):
            raise ExportError(f"only some {local} layers have an online transform")
        scheme = f"quadllm_{local.replace('.', '_')}"
        schemes[scheme] = ct.transform_scheme([local], _is_sylvester(dense))
        tensors[ct.transform_key(members[0][0], scheme)] = ct.transform_weight(dense).to(torch.float32).contiguous()
    return schemes, tensors


def _config_groups(linears: list[tuple[str, str, QuadLinear]]) -> dict[str, dict]:
    """One config group per (weight bits, group size, input bits) of the linears."""
    kinds: dict[tuple[int, int, int], list[str]] = {}
    for name, local, lin in linears:
        if not lin.quantized or lin.rank:
            raise ExportError(f"{name} is {'not quantized' if not lin.quantized else 'rank ' + str(lin.rank)}")
        kinds.setdefault((lin.w_bits, lin.group_size, lin.act.bits), []).append(local)
    return {f"group_{i}": ct.config_group(locals_, w, g, a) for i, ((w, g, a), locals_) in enumerate(sorted(kinds.items()))}


def _within(key: str, modules: set[str]) -> bool:
    """Whether tensor ``key`` belongs to one of ``modules`` (or to a submodule of one)."""
    parts = key.split(".")
    return any(".".join(parts[:i]) in modules for i in range(1, len(parts)))


@torch.no_grad()
def logit_agreement(ref: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Logits [..., V] of two models on the same tokens: the largest and mean absolute difference,
    the mean KL(ref ‖ other) per position, and the share of positions with the same top token."""
    ref, other = ref.double().flatten(0, -2), other.double().flatten(0, -2)
    lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
    return {"max_abs_logit_diff": float((ref - other).abs().max()),
            "mean_abs_logit_diff": float((ref - other).abs().mean()),
            "mean_kl": float(kl_per_position(lp, lq).mean()),
            "top1_agreement": float((ref.argmax(-1) == other.argmax(-1)).double().mean())}


def _check_ids(tok, tokens: int) -> tuple[torch.Tensor, str]:
    """The check's text: the first ``tokens`` tokens of the embedded evaluation text (offline, the
    same on every machine with the same Python), and its origin. Real text, not random tokens: on
    random sequences a W4A4 model runs far outside what it was calibrated on."""
    source = load_text("pydoc", "eval")
    ids = tok(source.text[: 20 * tokens], return_tensors="pt").input_ids[:, :tokens]
    return ids, source.origin


@torch.no_grad()
def forward_capturing(model: nn.Module, ids: torch.Tensor, names: list[str]) -> tuple[torch.Tensor, dict]:
    """``model``'s logits on ``ids`` and the input each module in ``names`` saw."""
    inputs: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0].detach()))
             for n in names]
    try:
        logits = model(ids).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, inputs


@torch.no_grad()
def linear_agreement(model: nn.Module, exported: nn.Module, inputs: dict[str, torch.Tensor],
                     rtol: float = 1e-3) -> dict[str, Any]:
    """Each linear of ``exported`` named in ``inputs`` fed the very input its counterpart in
    ``model`` saw (:func:`forward_capturing`): the share of token rows whose outputs agree (largest
    difference within ``rtol`` of the row's largest output), overall and for the worst linear, and
    the share of the other rows whose quantized input has a negative largest magnitude (the format's
    rounding tie: where these explain every disagreement, the export computes quadllm's model but
    for the tie). Rounding differences cannot compound here, so this measures the format, where the
    logits measure the model's sensitivity to it."""
    modules, theirs = dict(model.named_modules()), dict(exported.named_modules())
    shares, rows, agree, at_tie = {}, 0, 0, 0
    for name, x in inputs.items():
        lin = modules[name]
        want, got = lin(x), theirs[name](x)
        scale = want.abs().amax(-1).clamp_min(1e-6)
        same = ((got - want).abs().amax(-1) <= rtol * scale).flatten()
        # the quantizer's input: where its largest magnitude is negative, it sits on the format's tie
        q = lin.transform(x) if lin.transform is not None else x
        negative = (q.gather(-1, q.abs().argmax(-1, keepdim=True)) < 0).flatten()
        shares[name] = float(same.double().mean())
        rows, agree, at_tie = rows + same.numel(), agree + int(same.sum()), at_tie + int((~same & negative).sum())
    worst = min(shares, key=shares.get)
    return {"rows_agreeing": agree / rows, "disagreeing_rows_at_a_negative_extreme": at_tie / (rows - agree) if rows > agree else 1.0,
            "worst_linear": worst, "worst_share": shares[worst], "rtol": rtol}


def export_compressed_tensors(src: str | Path, out: str | Path, *, approximate_activations: bool = False,
                              check: bool | None = None, check_tokens: int = 256) -> dict[str, Any]:
    """Write checkpoint ``src`` to ``out`` in the compressed-tensors format; returns what was
    written and checked. ``check``: load the export back with compressed-tensors and compare it
    with the ``fake`` backend on the first ``check_tokens`` tokens of the embedded evaluation text,
    linear by linear (:func:`linear_agreement`) and by logits (None: when compressed-tensors is
    installed). Refusals come before any tensor is read."""
    if check_tokens < 8:
        raise ExportError(f"the check needs at least 8 tokens, got {check_tokens}")
    source, dst = Path(src).expanduser().resolve(), Path(out).expanduser().resolve()
    meta = read_meta(source)
    try:
        config = QuantConfig.from_dict(meta["quant_config"])
    except ConfigError as exc:
        raise CheckpointError(f"{source}: its quantization configuration is damaged ({exc})") from exc
    impossible, approximate = export_obstacles(config, meta["structure"])
    if impossible:
        raise ExportError(f"{source} cannot be written as compressed-tensors: {'; '.join(impossible)}")
    if approximate and not approximate_activations:
        raise ExportError(f"{source}: {'; '.join(approximate)}. Pass --approximate-activations to export with "
                          "the format's grid anyway")
    check_export_dir(source, dst)
    if check is None:
        check = ct_reader.available()
    elif check and not ct_reader.available():
        raise ExportError("checking the export needs the compressed-tensors package (pip install 'quadllm[export]'); "
                          "pass --no-check to skip it")

    model, tok, meta = load(source, dtype=torch.float32, verify=True)
    ids, origin = _check_ids(tok, check_tokens)
    refs: dict[str, torch.Tensor] = {}
    rewritten = not is_stock_config(model.config)
    if rewritten:
        if check:
            refs["source"] = model(ids).logits
        to_stock_modules(model, {k: meta[k] for k in ("quant_config", "structure")})
    linears = _layer_linears(model)
    linear_names = {name for name, _, _ in linears}
    if check:  # in the stock layout, with its fused FP16 tables: what the export holds
        logits, inputs = forward_capturing(model, ids, sorted(linear_names))
        refs["stock_layout" if rewritten else "source"] = logits
    groups = _config_groups(linears)
    schemes, transform_tensors = _transforms(linears)
    state = {k: v for k, v in storage_state_dict(model).items() if not _within(k, linear_names)}
    for name, _, lin in linears:
        state.update({f"{name}.{k}": v for k, v in _linear_tensors(lin).items()})
    state.update(transform_tensors)
    state = {k: v.contiguous() for k, v in state.items()}

    hf = model.config.to_dict()
    for key in ("auto_map", "_attn_implementation_internal", "_attn_implementation"):
        hf.pop(key, None)
    hf["quantization_config"] = ct.quantization_config(groups, schemes, ignore=["lm_head"])
    record: dict[str, Any] = {
        "format": "compressed-tensors", "library_version": __version__,
        "source": {"path": str(source), "integrity": meta.get("integrity"), "format_version": meta["format_version"]},
        "quant_config": config.to_dict(), "approximations": approximate, "check": None}
    with atomic_dir(dst) as tmp:
        write_tensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf, indent=2, default=str))
        tok.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:  # stop tokens and defaults for servers
            model.generation_config.save_pretrained(tmp)
        if check:
            exported = ct_reader.load_exported(tmp, dtype=torch.float32)
            with torch.no_grad():
                got = exported(ids).logits
            record["check"] = {"tokens": int(ids.shape[1]), "text": origin, "backend": "fake",
                               "linears": linear_agreement(model, exported, inputs),
                               **{name: logit_agreement(ref, got) for name, ref in refs.items()}}
            del exported
            log.info("compressed-tensors reload against the fake backend: %s", record["check"])
        (tmp / ct.EXPORT_FILE).write_text(json.dumps(record, indent=2))
    log.info("exported %s -> %s (compressed-tensors, %d config groups, %d transforms)", source, dst, len(groups),
             len(schemes))
    return {"export": str(dst), **{k: record[k] for k in ("approximations", "check")}}
