"""The sensitivity planner: budgets, the choice within them, gains measured from the changed layer on
equal to a whole forward, and plans that quantize --plan applies and the checkpoint records."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import random_ids, tiny_model

from quadllm import QuantConfig, load
from quadllm.analysis.planner import (
    Budget,
    PlanError,
    choose,
    choose_greedy,
    linear_costs,
    measure_sensitivity,
    parse_budget,
    plan_model,
    read_plan,
    set_module_precision,
    taylor_sensitivity,
)
from quadllm.arch import get_adapter
from quadllm.cli import main
from quadllm.config import ConfigError
from quadllm.pipelines.in_memory import transform
from quadllm.steps.transforms import set_activation_quant

CFG = dict(method="quad", rank=8, calib_samples=4, calib_seqlen=16)


@pytest.mark.parametrize("text,budget", [("12", Budget("modules", 12.0)), ("3modules", Budget("modules", 3.0)),
                                         ("1 module", Budget("modules", 1.0)), ("0.5bits", Budget("bits", 0.5))])
def test_budgets_parse(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize("text", ["", "many", "2.5modules", "-1", "3 bytes"])
def test_bad_budgets_are_refused(text):
    with pytest.raises(ConfigError, match="--budget"):
        parse_budget(text)


def test_choice_takes_gain_per_cost_within_the_budget_and_never_a_useless_change():
    gains = {"a": 0.5, "b": 0.4, "c": 0.3, "d": -0.1, "e": 0.0}
    costs = {"a": 0.5, "b": 0.1, "c": 0.1, "d": 0.01, "e": 0.01}
    assert choose(gains, costs, Budget("modules", 2)) == ["a", "b"]
    assert choose(gains, costs, Budget("modules", 10)) == ["a", "b", "c"]
    assert choose(gains, costs, Budget("bits", 0.2)) == ["b", "c"]  # 4 and 3 per bit before a's 1
    assert choose(gains, costs, Budget("bits", 0.65)) == ["b", "c"]
    assert choose(gains, costs, Budget("bits", 0.7)) == ["b", "c", "a"]
    assert choose(gains, costs, Budget("modules", 0)) == []


def _transformed(config: QuantConfig):
    original = tiny_model("llama", torch.float32, seed=0)
    model = copy.deepcopy(original)
    transform(model, config, random_ids(4, 16), progress=False)
    set_activation_quant(model, get_adapter(model), config)
    return original, model


def test_costs_are_the_extra_bits_per_activation_and_add_up_to_the_targets():
    config = QuantConfig(**CFG)
    _, model = _transformed(config)
    costs = linear_costs(model, config, "a8")
    assert len(costs) == 2 * 7 and sum(costs.values()) == pytest.approx(4.0)
    assert sum(linear_costs(model, config, "fp").values()) == pytest.approx(12.0)
    mixed = QuantConfig(**CFG, mode="w4a4a8")  # o_proj and down_proj are at 8 bits already
    assert sum(linear_costs(model, mixed, "a8").values()) < 4.0
    assert linear_costs(model, mixed, "a8")["layers.0.mlp.down_proj"] == 0.0


def test_gains_measured_from_the_changed_layer_equal_a_whole_forward():
    config = QuantConfig(**CFG)
    original, model = _transformed(config)
    probe = random_ids(2, 12, seed=7)
    ref = _reference(original, probe)
    with torch.no_grad():

        def kl() -> float:
            got = [model(input_ids=w[None]).logits.log_softmax(-1) for w in probe]
            return sum(float((r.exp() * (r - g)).sum(-1).sum()) for r, g in zip(ref, got)) / probe.numel()

        base, gains = measure_sensitivity(model, ref, probe, config, "fp", progress=False)
        assert base == pytest.approx(kl(), rel=1e-6)
        for key in ("layers.1.self_attn.k_proj", "layers.0.mlp.down_proj"):
            set_module_precision(model, key, "fp", config)
            assert base - gains[key] == pytest.approx(kl(), rel=1e-5, abs=1e-9)
            set_module_precision(model, key, None, config)
        assert kl() == pytest.approx(base, rel=1e-6)  # every linear back as it was


def _reference(original, windows) -> list[torch.Tensor]:
    with torch.no_grad():
        return [original(input_ids=w[None]).logits.log_softmax(-1) for w in windows]


def _kl(original, model, windows) -> float:
    with torch.no_grad():
        total = 0.0
        for w in windows:
            r = original(input_ids=w[None]).logits.double().log_softmax(-1)
            g = model(input_ids=w[None]).logits.double().log_softmax(-1)
            total += float((r.exp() * (r - g)).sum())
    return total / windows.numel()


def test_taylor_gain_is_half_the_directional_derivative_of_the_kl():
    """The reference definition: -½ d/dε KL(output_j + ε e_j) at ε = 0, by central differences in
    float64, e_j the change of linear j's output when its input gets the target. Only linear j's
    input is quantized, so the KL is smooth in ε (no rounding after it for the step to cross)."""
    config = QuantConfig(**CFG)
    original, model = _transformed(config)
    original, model = original.double(), model.double()
    probe = random_ids(2, 12, seed=7)
    ref = _reference(original, probe)
    quantized = {n: m.act for n, m in model.named_modules() if hasattr(m, "act_clip_ratio")}
    for key in ("layers.0.self_attn.o_proj", "layers.1.mlp.gate_proj", "layers.0.mlp.down_proj"):
        for n, m in model.named_modules():
            if n in quantized:
                m.act = quantized[n] if n == "model." + key else dataclasses.replace(quantized[n], bits=16)
        base, gains = taylor_sensitivity(model, ref, probe, config, "a8", progress=False)
        assert base == pytest.approx(_kl(original, model, probe), rel=1e-9)
        lin = model.get_submodule("model." + key)
        saved = lin.act
        set_module_precision(model, key, "a8", config)
        target, lin.act = lin.act, saved

        def shifted(eps: float) -> float:
            def hook(module, args, output):
                module.act = target
                alt = module.forward(*args)
                module.act = saved
                return output + eps * (alt - output)
            handle = lin.register_forward_hook(hook)
            try:
                return _kl(original, model, probe)
            finally:
                handle.remove()

        eps = 1e-3
        derivative = (shifted(eps) - shifted(-eps)) / (2 * eps)
        assert abs(derivative) > 1e-9
        assert gains[key] == pytest.approx(-0.5 * derivative, rel=1e-3)


def test_taylor_gains_rank_linears_like_the_exact_ones():
    config = QuantConfig(**CFG)
    original, model = _transformed(config)
    probe = random_ids(4, 32, seed=7)
    ref = _reference(original, probe)
    b1, exact = measure_sensitivity(model, ref, probe, config, "a8", progress=False)
    b2, taylor = taylor_sensitivity(model, ref, probe, config, "a8", progress=False)
    assert b1 == pytest.approx(b2, rel=1e-6)
    keys = sorted(exact)
    pair = torch.tensor([[exact[k] for k in keys], [taylor[k] for k in keys]])
    assert float(torch.corrcoef(pair)[0, 1]) > 0.6
    assert max(taylor, key=taylor.get) in sorted(exact, key=exact.get)[-3:]


def test_greedy_choice_in_steps_is_a_prefix_and_leaves_the_model_as_it_was():
    config = QuantConfig(**CFG)
    original, model = _transformed(config)
    lin = model.get_submodule("model.layers.0.self_attn.o_proj")
    lin.act = dataclasses.replace(lin.act, clip_ratio=0.83)  # a checkpoint's own clip
    probe = random_ids(2, 16, seed=3)
    ref = _reference(original, probe)
    before = _kl(original, model, probe)
    long = choose_greedy(model, ref, probe, config, "fp", Budget("modules", 6), step=2)
    short = choose_greedy(model, ref, probe, config, "fp", Budget("modules", 4), step=2)
    assert long.rounds == 3 and len(long.chosen) == 6 and long.chosen[:4] == short.chosen
    once = choose_greedy(model, ref, probe, config, "fp", Budget("modules", 6), step=0)
    assert once.rounds == 1 and once.chosen == choose(once.gains, {}, Budget("modules", 6))
    assert long.chosen[:2] == once.chosen[:2]  # the first step is the one measurement's best
    assert lin.act.clip_ratio == 0.83 and _kl(original, model, probe) == pytest.approx(before, rel=1e-9)


def test_a_plan_lowers_the_measured_kl_and_says_what_it_predicted():
    config = QuantConfig(**CFG)
    original = tiny_model("llama", torch.float32, seed=0)
    plan = plan_model(original, config, random_ids(4, 16), random_ids(2, 16, seed=3), random_ids(2, 16, seed=4),
                      Budget("modules", 4), "fp", step=2, progress=False)
    assert len(plan.chosen) == 4 and plan.rounds == 2 and plan.predicted_kl == pytest.approx(
        max(0.0, plan.base_kl - sum(plan.chosen_gains[k] for k in plan.chosen)))
    assert plan.check["kl_after"] < plan.check["kl_before"]
    assert QuantConfig(**CFG, overrides=plan.overrides).module_setting("reader", plan.chosen[0]).act_bits in (16, 8)


def test_plan_then_quantize_with_the_plan(tiny_original, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and{i % 13}" for i in range(6000)))
    plan_file = tmp_path / "plan.json"
    assert main(["plan", str(tiny_original), "--budget", "3", "--rank", "8", "--calib", str(text),
                 "--calib-samples", "2", "--probe-samples", "1", "--check-samples", "1", "--seqlen", "64",
                 "--out", str(plan_file), "-q"]) == 0
    plan = json.loads(plan_file.read_text())
    assert len(plan["overrides"]) == 3 and "predicted" in capsys.readouterr().out
    assert main(["quantize", "--model", str(tiny_original), "--rank", "8", "--weights", "rtn", "--calib", str(text),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--plan", str(plan_file),
                 "--override", "layers.0.self_attn.q_proj=skip", "--out", str(tmp_path / "q"), "-q"]) == 0
    _, _, meta = load(tmp_path / "q")
    table = meta["structure"]["modules"]
    assert sorted(k for k, v in table.items() if v == "w4a8") == sorted(
        o.split("=")[0] for o in plan["overrides"] if o.split("=")[0] != "layers.0.self_attn.q_proj")
    assert table["layers.0.self_attn.q_proj"] == "fp"  # the command line's override comes after the plan's
    assert meta["quant_config"]["extra"]["plan"]["modules"] == 3


def test_bad_plan_files_are_one_line_errors(tmp_path):
    with pytest.raises(PlanError, match="no such file"):
        read_plan(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="not a readable JSON"):
        read_plan(bad)
    bad.write_text(json.dumps({"overrides": ["*=a8"]}))
    with pytest.raises(PlanError, match="not a quadllm plan"):
        read_plan(bad)
    bad.write_text(json.dumps({"format": "quadllm-plan", "overrides": "*=a8"}))
    with pytest.raises(PlanError, match="list of PATTERN=SETTING"):
        read_plan(bad)


def test_plan_a_checkpoint_as_it_loads(tiny_original, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"word{i % 97} and{i % 13}" for i in range(6000)))
    ckpt = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_original), "--rank", "8", "--weights", "rtn", "--calib", str(text),
                 "--calib-samples", "2", "--calib-seqlen", "32", "--out", str(ckpt), "-q"]) == 0
    model, _, _ = load(ckpt)
    before = {n: m.act for n, m in model.named_modules() if hasattr(m, "act_clip_ratio")}
    plan_file = tmp_path / "plan.json"
    assert main(["plan", str(ckpt), "--budget", "4", "--remeasure-every", "2", "--probe-samples", "1",
                 "--check-samples", "1", "--seqlen", "64", "--out", str(plan_file), "-q"]) == 0
    out = capsys.readouterr().out
    assert "KL (the checkpoint)" in out and "measured" in out
    plan = json.loads(plan_file.read_text())
    assert plan["checkpoint"] == str(ckpt) and plan["estimate"] == "taylor" and plan["rounds"] == 2
    assert len(plan["overrides"]) == 4 and plan["check"]["kl_after"] < plan["check"]["kl_before"]
    assert plan["windows"]["calib"] == 0 and plan["calib"].endswith("calib.txt")  # the checkpoint's source
    # planning reads the checkpoint and writes nothing into it
    again, _, _ = load(ckpt)
    assert {n: m.act for n, m in again.named_modules() if hasattr(m, "act_clip_ratio")} == before
    assert main(["plan", str(ckpt), "--budget", "4", "--remeasure-every", "-1", "--out", str(tmp_path / "p2.json"),
                 "-q"]) == 2 and not (tmp_path / "p2.json").exists()
