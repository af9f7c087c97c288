"""The sensitivity planner: which decoder linears to give more activation precision, within a budget.

The model is transformed exactly (QUAD's basis, online transforms) and its linear inputs are
quantized per token as the mode says while the weights stay in full precision, as the rank
advisor does. On probe windows (disjoint from the calibration windows and from the windows the
plan is checked on) each linear in turn gets the target precision (``a8`` or ``fp``) alone, the
rest staying as they are; its *gain* is how much the KL divergence from the original model drops.
Layers before the changed one do not change, so their outputs are computed once and each probe
runs from the changed layer on.

The plan takes the linears with the largest gain per unit of cost until the budget is spent:
``N`` modules (each costs 1), or extra bits per activation (each costs the extra bits of its input
width, relative to all quantized inputs). The KL it predicts assumes the gains add up; the KL it
measures comes from the model with every chosen linear changed, on the check windows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..config import ConfigError, QuantConfig, module_key, parse_setting
from ..io.files import sha256_file
from ..evaluation.perplexity import kl_per_position
from ..nn.modules import QuadLinear
from ..pipelines.in_memory import transform
from ..steps.calibration import capture_layer_inputs, run_layer
from ..steps.transforms import set_activation_quant

log = logging.getLogger(__name__)

__all__ = ["Budget", "Plan", "PlanError", "parse_budget", "read_plan", "with_plan", "choose", "linear_costs", "measure_sensitivity", "plan_model",
           "set_module_precision", "PLAN_TARGETS"]

#: what a plan may give the chosen linears
PLAN_TARGETS = ("a8", "fp")


class PlanError(ConfigError):
    """A plan file that cannot be applied, with the reason."""


def read_plan(path: str | Path) -> tuple[list[str], dict[str, Any]]:
    """The overrides a plan file (``quadllm plan --out``) holds, and what to record about it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanError(f"plan {path}: no such file (make one with quadllm plan)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanError(f"plan {path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != "quadllm-plan":
        raise PlanError(f"plan {path}: not a quadllm plan (no \"format\": \"quadllm-plan\")")
    overrides = data.get("overrides")
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise PlanError(f"plan {path}: \"overrides\" must be a list of PATTERN=SETTING strings")
    return overrides, {"file": path.name, "sha256": sha256_file(path), "target": data.get("target"),
                       "budget": data.get("budget"), "modules": len(overrides)}


def with_plan(config: QuantConfig, path: str | Path) -> QuantConfig:
    """``config`` with a plan file's overrides before its own (so the configuration's win) and the
    plan recorded in ``extra["plan"]``: what ``quantize --plan`` and a recipe's ``plan`` do."""
    overrides, record = read_plan(path)
    return dataclasses.replace(config, overrides=[*overrides, *config.overrides], extra={**config.extra, "plan": record})


@dataclass(frozen=True)
class Budget:
    """``modules``: at most ``value`` linears; ``bits``: at most ``value`` extra bits per quantized
    activation, averaged over every quantized linear input element of a token."""

    kind: str
    value: float

    def describe(self) -> str:
        return f"{self.value:g} modules" if self.kind == "modules" else f"{self.value:g} extra bits per activation"


def parse_budget(text: str) -> Budget:
    """``12`` or ``12modules`` (a count of linears), ``0.5bits`` (extra bits per activation)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(modules?|bits?)?\s*", str(text))
    if m is None:
        raise ConfigError(f"--budget {text!r}: expected a number of modules (12, 12modules) or extra bits per "
                          "activation (0.5bits)")
    value, unit = float(m.group(1)), (m.group(2) or "modules")
    if unit.startswith("module"):
        if value != int(value):
            raise ConfigError(f"--budget {text!r}: a number of modules is a whole number")
        return Budget("modules", float(int(value)))
    return Budget("bits", value)


def linear_costs(model: nn.Module, config: QuantConfig, target: str) -> dict[str, float]:
    """Per decoder linear (:func:`~quadllm.config.module_key`) whose input is quantized: the extra
    bits per token the target costs it, over all quantized input bits per token of the model
    (summing to the mean extra bits per activation)."""
    adapter = get_adapter(model)
    bits = parse_setting(target, config.w_bits).act_bits
    extra: dict[str, float] = {}
    total = 0.0
    for i, layer in enumerate(adapter.layers(model)):
        for name in adapter.all_linears:
            lin: QuadLinear = layer.get_submodule(name)
            spec = config.act_spec(adapter.role(name), module_key(i, name))
            if not spec.enabled:
                continue
            width = lin.in_features - lin.rank
            total += width
            extra[module_key(i, name)] = (bits - spec.bits) * width
    return {k: v / total for k, v in extra.items()} if total else {}


def set_module_precision(model: nn.Module, key: str, target: str | None, config: QuantConfig) -> None:
    """Give one decoder linear's input the target's precision (``a8``: 8 bits at clip 1; ``fp``: not
    quantized), or (``target`` None) back the configuration's."""
    adapter = get_adapter(model)
    _, index, name = key.split(".", 2)
    lin: QuadLinear = adapter.layers(model)[int(index)].get_submodule(name)
    spec = config.act_spec(adapter.role(name), key)
    if target is not None:
        bits = parse_setting(target, config.w_bits).act_bits
        spec = dataclasses.replace(spec, bits=bits, clip_ratio=1.0 if bits < 16 else spec.clip_ratio,
                                   outlier_bits=spec.outlier_bits if bits < 16 else 16)
    lin.act = spec


@torch.no_grad()
def _logprobs_from(model: nn.Module, start: int, hidden: list[torch.Tensor],
                   kwargs: list[dict[str, Any]]) -> list[torch.Tensor]:
    """The model's log-probabilities, running decoder layers ``start`` on from their inputs."""
    adapter = get_adapter(model)
    layers = adapter.layers(model)
    out = []
    for h, kw in zip(hidden, kwargs):
        for layer in layers[start:]:
            h = run_layer(layer, h, kw)
        out.append(adapter.head(model)(adapter.final_norm(model)(h)).float().log_softmax(-1))
    return out


def _kl(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    total = sum(float(kl_per_position(r, g).sum()) for r, g in zip(ref, got))
    return total / sum(r.shape[0] * r.shape[1] for r in ref)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, reference: list[torch.Tensor], probe: torch.Tensor, config: QuantConfig,
                        target: str, progress: bool = True) -> tuple[float, dict[str, float]]:
    """``(KL of the configuration, {linear: KL drop when that linear alone gets the target})`` on
    ``probe`` windows, against ``reference`` log-probabilities; ``model`` is the transformed model with
    its activation quantizers set (left as it was)."""
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter, probe, batch=1)
    layer_inputs: list[list[torch.Tensor]] = [inputs.hidden]
    for layer in adapter.layers(model)[:-1]:
        layer_inputs.append([run_layer(layer, h, kw) for h, kw in zip(layer_inputs[-1], inputs.kwargs)])
    base = _kl(reference, _logprobs_from(model, 0, layer_inputs[0], inputs.kwargs))
    costs = linear_costs(model, config, target)
    gains: dict[str, float] = {}
    for key in tqdm(list(costs), desc=f"sensitivity ({target})", unit="linear", disable=not progress):
        index = int(key.split(".")[1])
        set_module_precision(model, key, target, config)
        try:
            gains[key] = base - _kl(reference, _logprobs_from(model, index, layer_inputs[index], inputs.kwargs))
        finally:
            set_module_precision(model, key, None, config)
    return base, gains


def choose(gains: dict[str, float], costs: dict[str, float], budget: Budget) -> list[str]:
    """The linears to change: by gain per unit of cost (gain alone for a module count), best first,
    while the budget lasts; linears whose change does not lower the KL are never chosen."""
    def cost(key: str) -> float:
        return 1.0 if budget.kind == "modules" else costs[key]

    order = sorted((k for k in gains if gains[k] > 0), key=lambda k: (-gains[k] / max(cost(k), 1e-12), k))
    chosen, spent = [], 0.0
    for key in order:
        if spent + cost(key) <= budget.value + 1e-12:
            chosen.append(key)
            spent += cost(key)
    return chosen


@dataclass
class Plan:
    """What ``quadllm plan`` decided and why; ``overrides`` is what ``quantize --plan`` applies."""

    target: str
    budget: Budget
    chosen: list[str]
    gains: dict[str, float]
    costs: dict[str, float]
    base_kl: float
    predicted_kl: float
    check: dict[str, float] = field(default_factory=dict)

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={self.target}" for key in self.chosen]

    @property
    def extra_bits(self) -> float:
        return sum(self.costs[k] for k in self.chosen)

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "budget": dataclasses.asdict(self.budget), "overrides": self.overrides,
                "chosen": self.chosen, "extra_bits_per_activation": self.extra_bits, "base_kl": self.base_kl,
                "predicted_kl": self.predicted_kl, "check": self.check, "gains": self.gains, "costs": self.costs}


@torch.no_grad()
def plan_model(model: nn.Module, config: QuantConfig, calib: torch.Tensor, probe: torch.Tensor,
               check: torch.Tensor, budget: Budget, target: str = "a8", progress: bool = True) -> Plan:
    """Plan ``model`` (an original model, left untouched) under ``config``: the moment from
    ``calib``, the gains on ``probe``, the plan's KL measured on ``check`` (all disjoint windows)."""
    if target not in PLAN_TARGETS:
        raise ConfigError(f"target {target!r} is not one of {', '.join(PLAN_TARGETS)}")
    m = copy.deepcopy(model)
    transform(m, config, calib, progress=False)
    set_activation_quant(m, get_adapter(m), config)
    reference = [model(input_ids=w[None]).logits.float().log_softmax(-1) for w in probe]
    base, gains = measure_sensitivity(m, reference, probe, config, target, progress)
    costs = linear_costs(m, config, target)
    chosen = choose(gains, costs, budget)
    predicted = max(0.0, base - sum(gains[k] for k in chosen))
    check_ref = [model(input_ids=w[None]).logits.float().log_softmax(-1) for w in check]
    before = _kl(check_ref, [m(input_ids=w[None]).logits.float().log_softmax(-1) for w in check])
    for key in chosen:
        set_module_precision(m, key, target, config)
    after = _kl(check_ref, [m(input_ids=w[None]).logits.float().log_softmax(-1) for w in check])
    log.info("plan: %d linears to %s (%.3f extra bits per activation); KL on the probe %.4f -> %.4f predicted; "
             "on the check windows %.4f -> %.4f measured", len(chosen), target, sum(costs[k] for k in chosen),
             base, predicted, before, after)
    return Plan(target, budget, chosen, gains, costs, base, predicted,
                {"windows": int(check.shape[0]), "kl_before": before, "kl_after": after})
