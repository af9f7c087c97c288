"""The sensitivity planner: which decoder linears to give more activation precision, within a budget.

The model planned is either a quantized checkpoint as it loads (GPTQ weights, its own clips), or an
original model transformed exactly (QUAD's basis, online transforms) with its linear inputs
quantized per token as the mode says and its weights in full precision, as the rank advisor does.
On probe windows (disjoint from the windows the plan is checked on) each linear's *gain* is how much
the KL divergence from the original model drops when that linear alone gets the target precision
(``a8`` or ``fp``):

- ``taylor`` (default): from one forward and backward pass per window, every linear at once (see
  :func:`taylor_sensitivity`);
- ``exact``: one forward per linear, from the changed layer on (the layers before it computed once).

The plan takes the linears with the largest gain per unit of cost until the budget is spent:
``N`` modules (each costs 1), or extra bits per activation (each costs the extra bits of its input
width, relative to all quantized inputs). Gains measured one at a time do not add up, so with
``step`` the choice is made ``step`` linears at a time, the gains measured again with the chosen
ones changed. The KL it predicts adds the gains; the KL it measures comes from the model with
every chosen linear changed, on the check windows.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..arch import get_adapter
from ..config import ActSpec, ConfigError, QuantConfig, module_key, parse_setting
from ..io.files import sha256_file
from ..evaluation.perplexity import kl_per_position
from ..nn.modules import QuadLinear
from ..pipelines.in_memory import transform
from ..steps.calibration import capture_layer_inputs, run_layer
from ..steps.transforms import set_activation_quant

log = logging.getLogger(__name__)

__all__ = ["Budget", "Greedy", "Plan", "PlanError", "parse_budget", "read_plan", "with_plan", "choose", "choose_greedy",
           "linear_costs", "measure_sensitivity", "taylor_sensitivity", "plan_model", "plan_quantized",
           "set_module_precision", "target_spec", "ESTIMATORS", "PLAN_TARGETS"]

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


def target_spec(model: nn.Module, key: str, target: str | None, config: QuantConfig) -> ActSpec:
    """The input spec of one decoder linear at the target's precision (``a8``: 8 bits at clip 1;
    ``fp``: not quantized), or (``target`` None) the configuration's."""
    name = key.split(".", 2)[2]
    spec = config.act_spec(get_adapter(model).role(name), key)
    if target is None:
        return spec
    bits = parse_setting(target, config.w_bits).act_bits
    return dataclasses.replace(spec, bits=bits, clip_ratio=1.0 if bits < 16 else spec.clip_ratio,
                               outlier_bits=spec.outlier_bits if bits < 16 else 16)


def set_module_precision(model: nn.Module, key: str, target: str | None, config: QuantConfig) -> None:
    """Give one decoder linear's input :func:`target_spec`."""
    _linear(model, key).act = target_spec(model, key, target, config)


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
        out.append(_wide(adapter.head(model)(adapter.final_norm(model)(h))).log_softmax(-1))
    return out


def _wide(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (log-probabilities and their differences need it; float64 stays)."""
    return x if x.dtype == torch.float64 else x.float()


def _kl(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    total = sum(float(kl_per_position(r, g).sum()) for r, g in zip(ref, got))
    return total / sum(r.shape[0] * r.shape[1] for r in ref)


def _linear(model: nn.Module, key: str) -> QuadLinear:
    _, index, name = key.split(".", 2)
    return get_adapter(model).layers(model)[int(index)].get_submodule(name)


@torch.no_grad()
def measure_sensitivity(model: nn.Module, reference: list[torch.Tensor], probe: torch.Tensor, config: QuantConfig,
                        target: str, exclude: Iterable[str] = (), progress: bool = True) -> tuple[float, dict[str, float]]:
    """``(KL of the model as it is, {linear: KL drop when that linear alone gets the target})`` on
    ``probe`` windows, against ``reference`` log-probabilities, measured exactly (one forward from
    the changed layer on per linear); ``model`` is a transformed model with its activation quantizers
    set (left as it was); the linears in ``exclude`` are not measured."""
    adapter = get_adapter(model)
    inputs = capture_layer_inputs(model, adapter, probe, batch=1)
    layer_inputs: list[list[torch.Tensor]] = [inputs.hidden]
    for layer in adapter.layers(model)[:-1]:
        layer_inputs.append([run_layer(layer, h, kw) for h, kw in zip(layer_inputs[-1], inputs.kwargs)])
    base = _kl(reference, _logprobs_from(model, 0, layer_inputs[0], inputs.kwargs))
    skip = set(exclude)
    gains: dict[str, float] = {}
    for key in tqdm([k for k in linear_costs(model, config, target) if k not in skip],
                    desc=f"sensitivity ({target}, exact)", unit="linear", disable=not progress):
        index = int(key.split(".")[1])
        lin = _linear(model, key)
        saved = lin.act  # a checkpoint's own spec (its searched clip), not the configuration's
        set_module_precision(model, key, target, config)
        try:
            gains[key] = base - _kl(reference, _logprobs_from(model, index, layer_inputs[index], inputs.kwargs))
        finally:
            lin.act = saved
    return base, gains


def taylor_sensitivity(model: nn.Module, reference: list[torch.Tensor], probe: torch.Tensor, config: QuantConfig,
                       target: str, exclude: Iterable[str] = (), progress: bool = True) -> tuple[float, dict[str, float]]:
    """Like :func:`measure_sensitivity`, every gain from one forward and backward pass per window.

    With ``e_j`` the change of linear j's output when its input gets the target precision and ``g_j``
    the gradient of the KL with respect to that output (straight through the quantizers), the KL is
    near-quadratic in the output errors, ``KL ≈ ½ EᵀHE`` with ``g = HE``; when the linears' errors are
    uncorrelated, ``g_j·e_j ≈ e_jᵀHe_j``, so changing linear j alone lowers the KL by about
    ``-½ g_j·e_j``. That is the gain, summed over the probe tokens."""
    skip = set(exclude)
    keys = [k for k in linear_costs(model, config, target) if k not in skip]
    targets = {key: target_spec(model, key, target, config) for key in keys}
    sums = dict.fromkeys(keys, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)

    def watch(key: str):
        def hook(module: QuadLinear, args: tuple, output: torch.Tensor) -> None:
            if not output.requires_grad:
                return
            with torch.no_grad():
                saved = module.act
                module.act = targets[key]
                try:
                    delta = module.forward(*args) - output
                finally:
                    module.act = saved

            def add(grad: torch.Tensor) -> None:
                sums[key] -= 0.5 * float((_wide(grad) * _wide(delta)).sum())
            output.register_hook(add)
        return hook

    handles = [_linear(model, k).register_forward_hook(watch(k)) for k in keys]
    handles.append(model.get_input_embeddings().register_forward_hook(
        lambda module, args, output: output.detach().requires_grad_(True)))
    total, tokens = 0.0, 0
    try:
        for window, ref in tqdm(list(zip(probe, reference)), desc=f"sensitivity ({target}, taylor)", unit="window",
                                disable=not progress):
            with torch.enable_grad():
                logits = model(input_ids=window[None]).logits
            with torch.no_grad():  # d KL(p ‖ softmax(z)) / dz = softmax(z) - p: no graph over the vocabulary
                logp = _wide(logits.detach()).log_softmax(-1)
                total += float(kl_per_position(ref, logp).sum())
                grad = (logp.exp_() - ref.exp()).to(logits.dtype)
                del logp
            logits.backward(grad)
            del logits, grad  # before the next window's graph
            tokens += ref.shape[0] * ref.shape[1]
    finally:
        for h in handles:
            h.remove()
        for p in params:
            p.requires_grad_(True)
    return total / tokens, {k: v / tokens for k, v in sums.items()}


#: how each linear's gain is measured: one forward per linear, or one forward and backward per window
ESTIMATORS = {"taylor": taylor_sensitivity, "exact": measure_sensitivity}


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
class Greedy:
    """The linears chosen in order, each with the gain measured when it was chosen; ``base_kl`` and
    ``gains`` are the first measurement's (every linear, nothing changed yet)."""

    base_kl: float
    gains: dict[str, float]
    chosen: list[str]
    chosen_gains: dict[str, float]
    rounds: int


def choose_greedy(model: nn.Module, reference: list[torch.Tensor], probe: torch.Tensor, config: QuantConfig,
                  target: str, budget: Budget, estimate: str = "taylor", step: int = 0,
                  progress: bool = True) -> Greedy:
    """Choose within ``budget`` by :func:`choose`, ``step`` linears at a time (0: all at once), the
    chosen ones changed and every other gain measured again before the next ``step``: gains
    measured one at a time do not add up, and those measured with the chosen linears changed are
    the ones the next choice needs. The first ``k * step`` linears are the plan for a budget of
    ``k * step`` modules. ``model`` is left as it was."""
    if estimate not in ESTIMATORS:
        raise ConfigError(f"estimate {estimate!r} is not one of {', '.join(ESTIMATORS)}")
    measure = ESTIMATORS[estimate]
    costs = linear_costs(model, config, target)
    saved = {k: _linear(model, k).act for k in costs}
    chosen: list[str] = []
    chosen_gains: dict[str, float] = {}
    spent, rounds = 0.0, 0
    first: tuple[float, dict[str, float]] | None = None
    try:
        while True:
            left = [k for k in costs if k not in chosen_gains]
            room = budget.value - spent
            if not left or room < min(1.0 if budget.kind == "modules" else costs[k] for k in left) - 1e-12:
                break
            base, gains = measure(model, reference, probe, config, target, exclude=chosen, progress=progress)
            rounds += 1
            first = first or (base, gains)
            pick = choose(gains, costs, Budget(budget.kind, room))
            pick = pick[:step] if step > 0 else pick
            if not pick:
                break
            for key in pick:
                set_module_precision(model, key, target, config)
                chosen.append(key)
                chosen_gains[key] = gains[key]
                spent += 1.0 if budget.kind == "modules" else costs[key]
            if step <= 0:
                break
    finally:
        for key, spec in saved.items():
            _linear(model, key).act = spec
    if first is None:  # nothing fits the budget: the model as it is
        first = measure(model, reference, probe, config, target, progress=progress)
    return Greedy(first[0], first[1], chosen, chosen_gains, rounds)


@dataclass
class Plan:
    """What ``quadllm plan`` decided and why; ``overrides`` is what ``quantize --plan`` applies.
    ``gains`` are the first measurement's; ``chosen_gains`` each chosen linear's gain when it was
    chosen (the prediction adds these)."""

    target: str
    budget: Budget
    chosen: list[str]
    gains: dict[str, float]
    costs: dict[str, float]
    base_kl: float
    predicted_kl: float
    check: dict[str, float] = field(default_factory=dict)
    estimate: str = "taylor"
    step: int = 0
    chosen_gains: dict[str, float] = field(default_factory=dict)
    rounds: int = 1

    @property
    def overrides(self) -> list[str]:
        return [f"{key}={self.target}" for key in self.chosen]

    @property
    def extra_bits(self) -> float:
        return sum(self.costs[k] for k in self.chosen)

    def predicted(self, chosen: list[str]) -> float:
        """The KL predicted for a prefix of the choice: the first measurement's less the gains added."""
        return max(0.0, self.base_kl - sum(self.chosen_gains[k] for k in chosen))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "budget": dataclasses.asdict(self.budget), "overrides": self.overrides,
                "chosen": self.chosen, "extra_bits_per_activation": self.extra_bits, "base_kl": self.base_kl,
                "predicted_kl": self.predicted_kl, "check": self.check, "estimate": self.estimate,
                "remeasure_every": self.step, "rounds": self.rounds, "chosen_gains": self.chosen_gains,
                "gains": self.gains, "costs": self.costs}


def _logprobs(model: nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_wide(model(input_ids=w[None]).logits).log_softmax(-1) for w in windows]


def plan_quantized(model: nn.Module, original: nn.Module, config: QuantConfig, probe: torch.Tensor,
                   check: torch.Tensor, budget: Budget, target: str = "a8", estimate: str = "taylor", step: int = 0,
                   progress: bool = True) -> Plan:
    """Plan ``model``, a transformed model with its activation quantizers set (a loaded checkpoint, or
    :func:`plan_model`'s), left as it was: the gains on ``probe``, the plan's KL measured on ``check``
    against ``original``."""
    if target not in PLAN_TARGETS:
        raise ConfigError(f"target {target!r} is not one of {', '.join(PLAN_TARGETS)}")
    greedy = choose_greedy(model, _logprobs(original, probe), probe, config, target, budget, estimate, step, progress)
    costs = linear_costs(model, config, target)
    check_ref = _logprobs(original, check)
    before = _kl(check_ref, _logprobs(model, check))
    saved = {k: _linear(model, k).act for k in greedy.chosen}
    try:
        for key in greedy.chosen:
            set_module_precision(model, key, target, config)
        after = _kl(check_ref, _logprobs(model, check))
    finally:
        for key, spec in saved.items():
            _linear(model, key).act = spec
    plan = Plan(target, budget, greedy.chosen, greedy.gains, costs, greedy.base_kl, 0.0,
                {"windows": int(check.shape[0]), "kl_before": before, "kl_after": after}, estimate, step,
                greedy.chosen_gains, greedy.rounds)
    plan.predicted_kl = plan.predicted(plan.chosen)
    log.info("plan: %d linears to %s (%.3f extra bits per activation; %s gains, %d measurements); KL on the probe "
             "%.4f -> %.4f predicted; on the check windows %.4f -> %.4f measured", len(plan.chosen), target,
             plan.extra_bits, estimate, greedy.rounds, plan.base_kl, plan.predicted_kl, before, after)
    return plan


def plan_model(model: nn.Module, config: QuantConfig, calib: torch.Tensor, probe: torch.Tensor,
               check: torch.Tensor, budget: Budget, target: str = "a8", estimate: str = "taylor", step: int = 0,
               progress: bool = True) -> Plan:
    """Plan an original ``model`` (left untouched) under ``config``, activations only (weights in full
    precision): the moment from ``calib``, then :func:`plan_quantized` (all windows disjoint)."""
    if target not in PLAN_TARGETS:
        raise ConfigError(f"target {target!r} is not one of {', '.join(PLAN_TARGETS)}")
    m = copy.deepcopy(model)
    with torch.no_grad():
        transform(m, config, calib, progress=False)
    set_activation_quant(m, get_adapter(m), config)
    return plan_quantized(m, model, config, probe, check, budget, target, estimate, step, progress)
