"""The tables of scripts/results_tasks.py from hand-made cells: chance-level flags, the average
without those tasks, item-by-item differences and the list of checkpoint builds."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
rt = pytest.importorskip("results_tasks")
FP = "SmolLM2-135M-Instruct"  # the full-precision model is the first of the models given


def _task(acc_norm: float, se: float) -> dict:
    return {"acc": acc_norm - 0.01, "acc_stderr": se, "acc_norm": acc_norm, "acc_norm_stderr": se}


def test_chance_tasks_flags_scores_within_two_standard_errors_of_guessing():
    fp = {
        "piqa": _task(0.62, 0.02),          # 0.62 > 0.5 + 0.04: above chance
        "arc_challenge": _task(0.27, 0.02),  # 0.27 <= 0.25 + 0.04: at chance
        "boolq": {"acc": 0.42, "acc_stderr": 0.02},  # below guessing (no acc_norm: acc is used)
        "winogrande": {"acc": 0.54, "acc_stderr": 0.02},  # exactly 0.5 + 2 SE counts as chance
    }
    assert rt.chance_tasks(fp) == {"arc_challenge": "acc_norm", "boolq": "acc", "winogrande": "acc"}


def test_chance_tasks_ignores_tasks_without_a_chance_level_or_a_standard_error():
    fp = {"lambada_openai": {"acc": 0.01, "acc_stderr": 0.01}, "piqa": {"acc_norm": 0.5}}
    assert rt.chance_tasks(fp) == {}


def test_chance_lines_gives_the_average_without_the_chance_tasks():
    fp, q = FP, "QuaRot W4A4"
    merged = {
        fp: {"tasks": {"piqa": _task(0.60, 0.02), "arc_easy": _task(0.40, 0.02), "boolq": {"acc": 0.45, "acc_stderr": 0.02}}},
        q: {"tasks": {"piqa": _task(0.54, 0.02), "arc_easy": _task(0.30, 0.02), "boolq": {"acc": 0.60, "acc_stderr": 0.02}}},
    }
    text = "\n".join(rt.chance_lines(merged, [fp, q], ["piqa", "arc_easy", "boolq"]))
    assert "boolq `acc`" in text and "piqa `" not in text
    # (0.54 + 0.30) / 2 = 0.42 against (0.60 + 0.40) / 2 = 0.50: 84.0% of FP
    assert "over the 2 tasks where FP is above chance (piqa, arc_easy)" in text
    assert f"{fp} 50.00" in text and "QuaRot W4A4 42.00 (84.0% of FP)" in text


def test_chance_lines_is_empty_when_fp_beats_chance_everywhere():
    merged = {FP: {"tasks": {"piqa": _task(0.70, 0.02)}}}
    assert rt.chance_lines(merged, [FP], ["piqa"]) == []


def _cell(task: str, items: str, sha: str | None = None) -> dict:
    acc = items.count("1") / len(items)
    c = {"tasks": {task: {"acc": acc, "acc_stderr": 0.1, "acc_norm": acc, "acc_norm_stderr": 0.1}},
         "items": {"acc_norm": items, "acc": items}, "wall_seconds": 1.0}
    if sha:
        c["checkpoint_sha256"] = sha
    return c


def test_paired_table_differences_match_a_hand_computation():
    a, b = "QUAD W4A4 r=64", "QuaRot W4A4"
    cells = {("piqa", FP): _cell("piqa", "1111"), ("piqa", a): _cell("piqa", "1101"),
             ("piqa", b): _cell("piqa", "1000"),
             ("arc_easy", FP): _cell("arc_easy", "1100"), ("arc_easy", a): _cell("arc_easy", "1100"),
             ("arc_easy", b): _cell("arc_easy", "1100")}
    lines, records = rt.paired_table(cells, [FP, b, a], ["piqa", "arc_easy"])
    rec = next(r for r in records if (r["a"], r["b"]) == (a, b))
    # piqa: d = [0, 1, 0, 1], mean 0.5, sample sd sqrt(1/3), se sqrt(1/3)/2; arc_easy: all zero
    assert rec["per_task"]["piqa"]["diff"] == pytest.approx(0.5)
    assert rec["per_task"]["piqa"]["se"] == pytest.approx(math.sqrt(1 / 3) / 2)
    assert rec["per_task"]["arc_easy"] == {"diff": 0.0, "se": 0.0}
    assert rec["average"]["diff"] == pytest.approx(0.25)
    assert rec["average"]["se"] == pytest.approx(math.sqrt(1 / 3) / 4)
    assert any(line.startswith(f"| {a} − {b} | +50.0 ± 28.9 | +0.0 ± 0.0 | +25.0 ± 14.4 |") for line in lines)


def test_checkpoint_lines_lists_models_scored_on_more_than_one_build():
    q, a = "QuaRot W4A4", "QUAD W4A4 r=64"
    cells = {("piqa", q): _cell("piqa", "10", "aaa"), ("boolq", q): _cell("boolq", "10", "bbb"),
             ("hellaswag", q): _cell("hellaswag", "10"),
             ("piqa", a): _cell("piqa", "10", "ccc"), ("boolq", a): _cell("boolq", "10", "ccc")}
    text = "\n".join(rt.checkpoint_lines(cells, [FP, q, a]))
    assert "QuaRot W4A4: cells from 3 builds" in text
    assert "aaa: piqa" in text and "bbb: boolq" in text and "unrecorded: hellaswag" in text
    assert a not in text
    assert rt.checkpoint_lines({("piqa", a): _cell("piqa", "1", "ccc")}, [FP, a]) == []


def test_render_leaves_out_tasks_where_fp_is_at_chance_and_names_the_model(tmp_path):
    q = "QuaRot W4A4"
    fp = "Qwen2.5-Coder-0.5B-Instruct"
    cells = {("piqa", fp): _cell("piqa", "1110"), ("piqa", q): _cell("piqa", "1100"),
             ("boolq", fp): _cell("boolq", "0110")}
    args = type("A", (), {"out": str(tmp_path / "t"), "command": "python scripts/results_tasks.py --model x",
                          "calib_samples": 32, "calib_seqlen": 512, "seed": 0, "limit": 4, "gen_limit": 2})()
    md = rt.render(cells, [fp, q], ["piqa", "boolq"], args, {"boolq": "acc"})
    assert md.startswith(f"# {fp}: tasks as % of full precision")
    assert "FP scores at chance" in md and "boolq (50.0% `acc`, chance 50%)" in md
    assert "Not yet done" not in md  # boolq is left out as at chance, not as unfinished
    assert "--model x` (complete)" in md


def test_a_cell_made_in_another_dtype_is_refused(tmp_path):
    cell = tmp_path / "piqa.json"
    cell.write_text(json.dumps({"limit": 5, "seed": 0, "tasks": {"piqa": {"acc": 0.6}}, "items": {}}))
    assert rt.load_cell(cell, 5, 0)["limit"] == 5  # cells from before --dtype ran in float32
    with pytest.raises(SystemExit, match="dtype float32"):
        rt.load_cell(cell, 5, 0, "bfloat16")


def test_further_rows_are_compared_with_quad_and_fp_and_a_finetune_with_its_base():
    row = "QUAD W4A4 r=64 + clip + o-rank 8 + smoothing"
    pairs = rt.extra_pairs([row], row)
    assert pairs[:len(rt.PAIRS)] == rt.PAIRS
    ft = rt.finetuned_title(row)
    assert pairs[len(rt.PAIRS):] == ((row, "QUAD W4A4 r=64"), (row, "FP"), (ft, row), (ft, "FP"))
    cells = {("piqa", FP): _cell("piqa", "1111"), ("piqa", row): _cell("piqa", "1101"),
             ("piqa", ft): _cell("piqa", "1111")}
    _, records = rt.paired_table(cells, [FP, row, ft], ["piqa"], pairs)
    got = {(r["a"], r["b"]): r["per_task"]["piqa"]["diff"] for r in records}
    assert got == {(row, FP): pytest.approx(-0.25), (ft, row): pytest.approx(0.25), (ft, FP): 0.0}


def test_a_row_never_run_on_a_task_group_is_named_and_left_out_of_that_group(tmp_path):
    q, row = "QUAD W4A4 r=64", "QUAD W4A4 r=64 + clip + o-rank 8 + smoothing"
    gen = {"tasks": {"gsm8k": {"exact_match,flexible-extract": 0.5}}, "items": {}, "wall_seconds": 1.0}
    cells = {("piqa", FP): _cell("piqa", "1110"), ("piqa", q): _cell("piqa", "1100"),
             ("piqa", row): _cell("piqa", "1110"), ("gsm8k", FP): gen, ("gsm8k", q): gen}
    args = type("A", (), {"out": str(tmp_path / "t"), "command": "python scripts/results_tasks.py",
                          "calib_samples": 32, "calib_seqlen": 512, "seed": 0, "limit": 4, "gen_limit": 2})()
    md = rt.render(cells, [FP, q, row], ["piqa", "gsm8k"], args)
    assert "(complete)" in md  # the row was not run on the generative tasks: nothing is missing
    zero_shot, generative = md.split("## generative")
    assert f"| {row} |" in zero_shot.split("Wall seconds")[1]
    assert f"Not run on these tasks: {row}." in generative
    assert row not in generative.replace(f"Not run on these tasks: {row}.", "")
    assert "| gsm8k | exact_match,flexible-extract | 50.00 | 50.00 | 100.0% |" in generative


def test_a_missing_cell_of_a_model_run_on_the_group_leaves_the_table_in_progress(tmp_path):
    q = "QUAD W4A4 r=64"
    gen = {"tasks": {"gsm8k": {"exact_match,flexible-extract": 0.5}}, "items": {}, "wall_seconds": 1.0}
    cells = {("piqa", FP): _cell("piqa", "1110"), ("piqa", q): _cell("piqa", "1100"), ("gsm8k", FP): gen}
    assert rt.expected_cells(cells, [FP, q], ["piqa", "gsm8k"], {}) == {
        ("piqa", FP), ("piqa", q), ("gsm8k", FP), ("gsm8k", q)}
    args = type("A", (), {"out": str(tmp_path / "t"), "command": "python scripts/results_tasks.py",
                          "calib_samples": 32, "calib_seqlen": 512, "seed": 0, "limit": 4, "gen_limit": 2})()
    assert "**in progress: 3 of 4 cells done**" in rt.render(cells, [FP, q], ["piqa", "gsm8k"], args)


def test_a_row_run_on_one_generative_task_gets_its_own_section_and_leaves_the_others_complete(tmp_path):
    q, row = "QUAD W4A4 r=64", "QUAD W4A4 r=64 + down smoothing 0.5"
    he = {"tasks": {"humaneval_chat": {"pass@1": 0.5}}, "items": {}, "wall_seconds": 1.0}
    gsm = {"tasks": {"gsm8k": {"exact_match,flexible-extract": 0.25}}, "items": {}, "wall_seconds": 1.0}
    cells = {("humaneval_chat", FP): he, ("humaneval_chat", q): he, ("humaneval_chat", row): he,
             ("gsm8k", FP): gsm, ("gsm8k", q): gsm}
    tasks = ["humaneval_chat", "gsm8k"]
    assert [label for label, _ in rt.task_groups(cells, [FP, q, row], tasks)] == [
        "zero-shot", "generative: humaneval_chat", "generative: gsm8k"]
    args = type("A", (), {"out": str(tmp_path / "t"), "command": "python scripts/results_tasks.py",
                          "calib_samples": 32, "calib_seqlen": 512, "seed": 0, "limit": 4, "gen_limit": 2})()
    md = rt.render(cells, [FP, q, row], tasks, args)
    assert "(complete)" in md and "Not yet done" not in md
    he_part, gsm_part = md.split("## generative: humaneval_chat")[1].split("## generative: gsm8k")
    assert f"| {row} |" in he_part and "| humaneval_chat | pass@1 | 50.00 | 50.00 | 100.0% | 50.00 |" in he_part
    assert f"Not run on these tasks: {row}." in gsm_part
    assert "| gsm8k | exact_match,flexible-extract | 25.00 | 25.00 | 100.0% |" in gsm_part
    del cells[("gsm8k", q)]  # no quantized model on GSM8K yet: it is unfinished, not unrun
    assert [label for label, _ in rt.task_groups(cells, [FP, q, row], tasks)] == ["zero-shot", "generative"]
    assert "**in progress: 4 of 6 cells done**" in rt.render(cells, [FP, q, row], tasks, args)
