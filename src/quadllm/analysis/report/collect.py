"""The numbers behind the report, measured on one calibration batch.

- :func:`input_stats`: per layer and per linear input, each channel's largest magnitude and the
  tokens' crest factor (max / RMS, what per-token quantization suffers from), on an original
  model (``nn.Linear`` inputs, norm gains included) or a QUAD model (``QuadLinear`` inputs after
  their online transforms, outlier columns first).
- :func:`linear_errors`: relative output error of every linear, quantized in isolation (RTN INT4
  weights, per-token activations) on the inputs of the exactly transformed float model, for
  RTN, QuaRot and QUAD.
- :func:`token_outliers`: the tokens with the largest residual-stream magnitudes.
- :func:`module_precisions`: what each decoder linear of a quantized model holds and computes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...arch import ArchAdapter, get_adapter
from ...config import QuantConfig
from ...core.gptq import rtn_quantize
from ...core.quantizers import dequantize_weight, fake_quant_act
from ...nn.modules import QuadLinear
from ...pipelines.in_memory import transform
from ...steps.transforms import set_act_enabled, set_activation_quant


#: The linear inputs the report looks at: one per distinct input of a decoder layer.
def input_kinds(adapter: ArchAdapter) -> dict[str, str]:
    """kind -> linear name inside a layer: the attention readers, the MLP readers, o_proj, down_proj."""
    return {"attn input (q/k/v)": adapter.attn_readers.linears[0], "o_proj input": adapter.o_proj,
            "mlp input (gate/up)": adapter.mlp_readers.linears[0], "down_proj input": adapter.down_proj}


class _Stat:
    def __init__(self) -> None:
        self.chan_max: torch.Tensor | None = None
        self.crest_sum = 0.0
        self.tokens = 0

    def add(self, x: torch.Tensor, skip: int) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        cm = x.abs().amax(0)
        self.chan_max = cm if self.chan_max is None else torch.maximum(self.chan_max, cm)
        q = x[:, skip:]
        rms = q.pow(2).mean(-1).sqrt().clamp_min(1e-12)
        self.crest_sum += float((q.abs().amax(-1) / rms).sum())
        self.tokens += x.shape[0]

    def result(self, skip: int) -> dict[str, Any]:
        cm = self.chan_max
        rest = cm[skip:]
        med = float(rest.median())
        return {"chan_max": cm.tolist(), "median": med, "max_over_median": float(rest.max()) / max(med, 1e-12),
                "crest": self.crest_sum / max(self.tokens, 1), "outlier_columns": skip}


@torch.no_grad()
def input_stats(model: nn.Module, samples: torch.Tensor, batch: int = 4) -> dict[str, list[dict[str, Any]]]:
    """``{kind: [per-layer stats]}``; for QUAD models the max-over-median and crest factor are
    those of the quantized columns (the outlier columns are kept in full precision)."""
    adapter = get_adapter(model)
    kinds = input_kinds(adapter)
    stats = {k: [_Stat() for _ in range(adapter.num_layers)] for k in kinds}
    handles, captured = [], []
    for i, layer in enumerate(adapter.layers(model)):
        for kind, name in kinds.items():
            lin = layer.get_submodule(name)
            st = stats[kind][i]
            if isinstance(lin, QuadLinear):
                lin.capture = (lambda x, st=st, r=lin.rank: st.add(x, r))
                captured.append(lin)
            else:
                handles.append(lin.register_forward_pre_hook(lambda _m, args, st=st: st.add(args[0], 0)))
    quad = bool(captured)
    if quad:
        set_act_enabled(model, False)
    try:
        for i in range(0, samples.shape[0], batch):
            model(input_ids=samples[i:i + batch], use_cache=False)
    finally:
        for h in handles:
            h.remove()
        for lin in captured:
            lin.capture = None
        if quad:
            set_act_enabled(model, True)
    out = {}
    for kind, name in kinds.items():
        rows = []
        for i, layer in enumerate(adapter.layers(model)):
            lin = layer.get_submodule(name)
            rows.append(stats[kind][i].result(lin.rank if isinstance(lin, QuadLinear) else 0))
        out[kind] = rows
    return out


class _ErrProbe:
    """Output error of one float QuadLinear when its weight (RTN INT4) and input (per token) are quantized."""

    def __init__(self, lin: QuadLinear) -> None:
        r = lin.rank
        w = lin.weight.detach().float()
        res = rtn_quantize(w, r, bits=4)
        self.wq = torch.cat([res.fp_columns.float(), dequantize_weight(res.codes, res.scales.float())], dim=1)
        self.w = w
        self.r = r
        self.act = lin.act
        self.err = 0.0
        self.ref = 0.0

    def __call__(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        y = F.linear(x, self.w)
        xr = x[..., self.r:]
        if self.act.enabled:
            xr = fake_quant_act(xr.clone(), self.act.bits, self.act.clip_ratio, self.act.sym)
        yq = F.linear(torch.cat([x[..., :self.r], xr], -1), self.wq)
        self.err += float((yq - y).pow(2).sum())
        self.ref += float(y.pow(2).sum())


@torch.no_grad()
def linear_errors(model: nn.Module, samples: torch.Tensor, rank: int, mode: str = "w4a4", seed: int = 0,
                  moment: torch.Tensor | None = None, batch: int = 4) -> dict[str, dict[str, list[float]]]:
    """``{method: {linear name: [relative error per layer]}}`` for RTN, QuaRot and QUAD (rank
    ``rank``); ``model`` (an original model) is left untouched."""
    adapter = get_adapter(model)
    out: dict[str, dict[str, list[float]]] = {}
    for label, cfg in (("RTN", QuantConfig(method="rtn", mode=mode, seed=seed)),
                       ("QuaRot", QuantConfig(method="quarot", mode=mode, seed=seed)),
                       (f"QUAD r={rank}", QuantConfig(method="quad", rank=rank, mode=mode, seed=seed))):
        m = copy.deepcopy(model)
        transform(m, cfg, samples, progress=False, moment=moment if cfg.rank else None)
        set_activation_quant(m, adapter, cfg)
        set_act_enabled(m, False)  # the stream stays exact; each probe quantizes its own copy
        probes: dict[str, list[_ErrProbe]] = {n: [] for n in adapter.all_linears}
        for layer in adapter.layers(m):
            for name in adapter.all_linears:
                lin = layer.get_submodule(name)
                probe = _ErrProbe(lin)
                lin.capture = probe
                probes[name].append(probe)
        for i in range(0, samples.shape[0], batch):
            m(input_ids=samples[i:i + batch], use_cache=False)
        out[label] = {name: [(p.err / max(p.ref, 1e-30)) ** 0.5 for p in ps] for name, ps in probes.items()}
        del m
    return out


@torch.no_grad()
def token_outliers(model: nn.Module, tokenizer, samples: torch.Tensor, top: int = 12) -> dict[str, Any]:
    """The tokens whose residual stream (at any layer's input) reaches the largest magnitude."""
    adapter = get_adapter(model)
    peak = torch.zeros(samples.shape, dtype=torch.float32)
    energy = torch.zeros(samples.shape, dtype=torch.float32)
    cur: dict[str, int] = {"b": 0, "n": 0}

    def hook(_m, args):
        h = args[0].detach().float()
        b0, n = cur["b"], h.shape[0]
        peak[b0:b0 + n] = torch.maximum(peak[b0:b0 + n], h.abs().amax(-1))
        energy[b0:b0 + n] += h.pow(2).sum(-1)

    handles = [layer.get_submodule(adapter.attn_readers.norm).register_forward_pre_hook(hook)
               for layer in adapter.layers(model)]
    try:
        for i in range(0, samples.shape[0], 4):
            cur["b"] = i
            model(input_ids=samples[i:i + 4], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    flat = peak.flatten()
    order = flat.argsort(descending=True)[:top]
    T = samples.shape[1]
    rows = []
    for idx in order.tolist():
        b, t = divmod(idx, T)
        tok = int(samples[b, t])
        rows.append({"sample": b, "position": t, "token_id": tok, "text": tokenizer.decode([tok]),
                     "peak": float(flat[idx]), "energy_share": float(energy[b, t] / energy.sum())})
    median_peak = float(flat.median())
    first = float(peak[:, 0].mean()) if T else 0.0
    return {"tokens": rows, "median_peak": median_peak, "first_position_mean_peak": first,
            "top_energy_share": float(sum(r["energy_share"] for r in rows))}


def linear_precision(lin: QuadLinear) -> str:
    """``fp`` (full-precision weight, unquantized input) or ``w<W>a<A>``, as the linear computes."""
    if not lin.quantized and not lin.act.enabled:
        return "fp"
    return f"w{lin.w_bits}a{lin.act.bits}"


def module_precisions(model: nn.Module) -> list[dict[str, str]]:
    """Per decoder layer, each linear's :func:`linear_precision`, read from the model itself."""
    adapter = get_adapter(model)
    return [{name: linear_precision(layer.get_submodule(name)) for name in adapter.all_linears}
            for layer in adapter.layers(model)]
