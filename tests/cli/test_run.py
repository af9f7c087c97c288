"""``quadllm run``: a recipe's stages on a tiny model, the gates' exit code, resuming after the last
completed stage, re-running only what an edit changed, and recipes refused before any stage runs."""

from __future__ import annotations

import json
import logging

import pytest

from quadllm.cli import main
from quadllm.io.checkpoint import read_meta


@pytest.fixture
def recipe_dir(tmp_path, tiny_original):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"word{i % 31} and{i % 7}" for i in range(12000)))
    return tmp_path, tiny_original, text


def _write(path, model, text, gates="kl_max: 1.0", extra=""):
    path.write_text(f"""
model: {model}
output: {path.parent / 'out'}
seed: 1
quantize: {{rank: 8, weights: rtn, calib: {text}, calib_samples: 2, calib_seqlen: 32, layout: quadllm,
           overrides: ["layers.0.mlp.down_proj=a8"]}}
finetune: {{data: {text}, max_steps: 2, batch_size: 2, max_seqlen: 32, eval_every: 1}}
evaluate:
  perplexity: {{data: {text}, seqlen: 32, max_windows: 2}}
gates: {{{gates}}}
report: {{samples: 2, seqlen: 32, calib: {text}}}
{extra}""")
    return path


def test_a_recipe_runs_every_stage_then_resumes_and_reruns_only_what_changed(recipe_dir, caplog, capsys):
    tmp, model, text = recipe_dir
    recipe = _write(tmp / "r.yaml", model, text, gates="kl_max: 1.0, ppl_ratio_max: 100")
    assert main(["run", str(recipe), "--dry-run", "-q"]) == 0
    assert "quantize: would run" in capsys.readouterr().out and not (tmp / "out").exists()
    with caplog.at_level(logging.INFO, logger="quadllm"):
        assert main(["run", str(recipe), "-q"]) == 0
    out = tmp / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and [g["gate"] for g in summary["gates"]] == ["kl_max", "ppl_ratio_max"]
    assert summary["ran"] == ["quantize", "finetune", "evaluate", "report"]
    assert read_meta(out / "finetuned")["finetune"] and (out / "report.html").is_file()
    assert read_meta(out / "quantized")["structure"]["modules"]["layers.0.mlp.down_proj"] == "w4a8"
    assert "| kl_max" in (out / "summary.md").read_text() and "Verdict: PASS" in capsys.readouterr().out
    evaluation = json.loads((out / "evaluation.json").read_text())["perplexity"]
    assert f"{evaluation['ppl']:.3f} (FP {evaluation['reference_ppl']:.3f})" in (out / "summary.md").read_text()
    assert "| finetune | `finetuned` |" in (out / "summary.md").read_text()
    # nothing changed: nothing runs again
    assert main(["run", str(recipe), "-q"]) == 0
    assert json.loads((out / "summary.json").read_text())["ran"] == []
    # a stricter gate re-runs no stage and fails the run
    _write(recipe, model, text, gates="kl_max: 0.0")
    assert main(["run", str(recipe), "-q"]) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ran"] == [] and not summary["passed"] and not summary["gates"][0]["passed"]
    # an edited evaluation re-runs evaluate and what follows, not quantize or finetune
    recipe.write_text(recipe.read_text().replace("max_windows: 2", "max_windows: 1"))
    assert main(["run", str(recipe), "-q"]) == 5
    assert json.loads((out / "summary.json").read_text())["ran"] == ["evaluate", "report"]
    # a damaged output is not trusted: its stage and the later ones run again
    (out / "evaluation.json").write_text("{}")
    assert main(["run", str(recipe), "-q"]) == 5
    assert json.loads((out / "summary.json").read_text())["ran"] == ["evaluate", "report"]


def test_an_interrupted_run_resumes_after_its_last_completed_stage(recipe_dir, monkeypatch):
    tmp, model, text = recipe_dir
    recipe = _write(tmp / "r.yaml", model, text)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("quadllm.cli.run.run_finetune", interrupted)
    assert main(["run", str(recipe), "-q"]) == 130
    state = json.loads((tmp / "out" / "run_state.json").read_text())["stages"]
    assert list(state) == ["quantize"] and not (tmp / "out" / "finetuned").exists()
    monkeypatch.undo()
    assert main(["run", str(recipe), "-q"]) == 0
    assert json.loads((tmp / "out" / "summary.json").read_text())["ran"] == ["finetune", "evaluate", "report"]


@pytest.mark.parametrize("edit,match", [
    ("bogus: 1", "unknown sections"),
    ("gates: {kl_maxx: 1}", "unknown gate"),
    ("evaluate: {tasks: {names: [piqa]}}\ngates: {kl_max: 1}", "reads evaluate.perplexity"),
])
def test_a_bad_recipe_is_one_line_exit_2_before_any_stage(recipe_dir, caplog, edit, match):
    tmp, model, text = recipe_dir
    recipe = tmp / "bad.yaml"
    body = _write(tmp / "ok.yaml", model, text).read_text()
    if edit.startswith("gates"):
        body = body.replace("gates: {kl_max: 1.0}", edit)
    elif edit.startswith("evaluate"):
        body = body.replace(body[body.index("evaluate:"):body.index("report:")], edit + "\n")
    else:
        body += edit + "\n"
    recipe.write_text(body)
    with caplog.at_level(logging.ERROR, logger="quadllm"):
        assert main(["run", str(recipe), "-q"]) == 2
    assert match in caplog.text and not (tmp / "out").exists()


@pytest.mark.parametrize("body,match", [
    ("output: x\nquantize: {rank: -1}", "rank must be >= 0"),
    ("output: x\nquantize: {rnak: 8}", "unknown keys ['rnak']"),
    ("output: x\nfinetune: {max_steps: 2}", "finetune needs at least 'data'"),
    ("quantize: {rank: 8}", "'output'"),
    ("output: [unclosed", "not valid YAML"),
])
def test_recipe_validation_names_the_key_at_fault(tmp_path, body, match):
    from quadllm.pipelines.rollout import RecipeError, read_recipe

    (tmp_path / "r.yaml").write_text(body)
    with pytest.raises(RecipeError, match=match.replace("[", r"\[").replace("]", r"\]")):
        read_recipe(tmp_path / "r.yaml")


def test_toml_recipes_and_gate_checks(tmp_path):
    from quadllm.pipelines.rollout import check_gates, read_recipe

    (tmp_path / "r.toml").write_text('output = "o"\n[quantize]\nrank = 8\n[evaluate.perplexity]\nmax_windows = 2\n'
                                     '[gates]\nkl_max = 0.5\ntop1_min = 0.9\n')
    recipe = read_recipe(tmp_path / "r.toml")
    assert recipe.quant.rank == 8 and recipe.perplexity["max_windows"] == 2 and recipe.stages == (
        "quantize", "evaluate")
    rows = check_gates(recipe.gates, {"kl": 0.4, "top1_agreement": 0.85})
    assert [r["passed"] for r in rows] == [True, False]
    assert not check_gates({"kl_max": 1.0}, {})[0]["passed"]  # a value that was not measured fails


def test_the_example_recipes_validate():
    from pathlib import Path

    from quadllm.pipelines.rollout import read_recipe

    examples = sorted((Path(__file__).resolve().parents[2] / "examples" / "recipes").glob("*.yaml"))
    assert len(examples) == 2
    for path in examples:
        recipe = read_recipe(path)
        assert recipe.gates and recipe.perplexity and recipe.tasks and "evaluate" in recipe.stages
