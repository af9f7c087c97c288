"""The sensitivity planner: budgets, the choice within them, gains measured from the changed layer on
equal to a whole forward, and plans that quantize --plan applies and the checkpoint records."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import random_ids, tiny_model

from quadllm import QuantConfig, load
from quadllm.analysis.planner import (
    Budget,
    PlanError,
    choose,
    linear_costs,
    measure_sensitivity,
    parse_budget,
    plan_model,
    read_plan,
    set_module_precision,
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
    with torch.no_grad():
        ref = [original(input_ids=w[None]).logits.log_softmax(-1) for w in probe]

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


def test_a_plan_lowers_the_measured_kl_and_says_what_it_predicted():
    config = QuantConfig(**CFG)
    original = tiny_model("llama", torch.float32, seed=0)
    plan = plan_model(original, config, random_ids(4, 16), random_ids(2, 16, seed=3), random_ids(2, 16, seed=4),
                      Budget("modules", 4), "fp", progress=False)
    assert len(plan.chosen) == 4 and plan.predicted_kl == pytest.approx(
        max(0.0, plan.base_kl - sum(plan.gains[k] for k in plan.chosen)))
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
