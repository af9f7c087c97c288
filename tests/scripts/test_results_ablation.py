"""The ablation table's cost columns (scripts/results_smollm2.py): the online work a checkpoint's
configuration adds, the timing of checkpoints in turns, and the cells built from both."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import quantize_tiny, tiny_model, tiny_tokenizer

from quadllm.io.checkpoint import save

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
rs = pytest.importorskip("results_smollm2")


def test_structure_cost_counts_the_learned_transforms():
    fp = tiny_model("llama", torch.float32)  # d=48 (6x8), d_ff=96 (8x12), 3 heads of 16, 5 readers
    c = rs.structure_cost(fp, {"quant_config": {"rank": 8, "o_rank": 2, "learn_transform": 4}})
    per_layer = 5 * 48 * (6 + 8 + 1) + 96 * (8 + 12 + 1) + 42 * (6 + 7 + 1)  # o_proj: 48 - 3 * 2 quantized inputs
    assert c["online_macs_per_token"] == 2 * per_layer
    w4a16 = rs.structure_cost(fp, {"quant_config": {"rank": 8, "learn_transform": 4, "mode": "w4a16"}})
    assert w4a16["online_macs_per_token"] == 0


def test_structure_cost_counts_the_down_proj_split():
    fp = tiny_model("llama", torch.float32)  # d=48, d_ff=96, 2 layers, q 48 / k,v 16 outputs
    linear = 2 * (48 * (48 + 16 + 16) + 48 * 48 + 3 * 48 * 96)
    c = rs.structure_cost(fp, {"quant_config": {"rank": 8, "down_rank": 4, "o_rank": 2}})
    assert c == {"rank": 8, "down_rank": 4, "o_columns": 6, "online_macs_per_token": 2 * 2 * 4 * 96,
                 "online_share": round(2 * 2 * 4 * 96 / linear, 5)}
    assert rs.structure_cost(fp, {"quant_config": {"rank": 8}})["online_macs_per_token"] == 0  # old checkpoints
    int8 = rs.structure_cost(fp, {"quant_config": {"rank": 8, "o_rank": 2, "o_rank_bits": 8}})
    assert int8["o_columns"] == 6 and int8["o_bits"] == 8


def test_time_rows_times_every_model_and_the_cells_are_ratios_to_the_first():
    models = {"base": quantize_tiny("llama", rank=8, weights="rtn"),
              "split": quantize_tiny("llama", rank=8, weights="rtn", down_rank=4)}
    t = rs.time_rows(models, 160, 16, 2)
    assert set(t) == {"base", "split"}
    assert all(set(v) == {"prefill_ms", "o_proj_ms", "down_proj_ms"} and min(v.values()) > 0 for v in t.values())
    speed = {"rows": {"base": {"rank": 8, "down_rank": 0, "online_macs_per_token": 0, "online_share": 0.0,
                               "prefill_ms": 10.0, "o_proj_ms": 1.0, "down_proj_ms": 2.0},
                      "split": {"rank": 8, "down_rank": 4, "o_columns": 6, "online_macs_per_token": 1_500_000, "online_share": 0.021,
                                "prefill_ms": 11.0, "o_proj_ms": 1.0, "down_proj_ms": 3.0}}}
    assert rs.ablation_cells("base", [speed]) == "8 | 0 | 1.00 | 1.00 | 1.00 |"
    assert rs.ablation_cells("split", [speed]) == "8 + o 6 + down 4 | 1.50 M (2.1%) | 1.10 | 1.00 | 1.50 |"
    assert rs.ablation_cells("FP", [speed]) == rs.ablation_cells("split", []) == "- | - | - | - | - |"


def test_a_later_timing_run_replaces_the_rows_it_timed_and_keeps_the_others():
    def run(rows: dict, command: str) -> dict:
        return {"rows": {n: {"rank": 8, "down_rank": 0, "online_macs_per_token": 0, "online_share": 0.0,
                             "prefill_ms": p, "o_proj_ms": 1.0, "down_proj_ms": 1.0} for n, p in rows.items()},
                "command": command}

    meta = {"speed": run({"base": 10.0, "a": 12.0, "b": 9.0}, "first")}
    rs.merge_speed(meta, run({"base": 20.0, "c": 30.0, "a": 20.0}, "second"))
    runs = rs.speed_runs(meta)
    assert [r["command"] for r in runs] == ["second", "first"]  # the first still holds b
    assert rs.ablation_cells("a", runs).split(" | ")[2] == "1.00"  # from the newer run, against its base
    assert rs.ablation_cells("c", runs).split(" | ")[2] == "1.50"
    assert rs.ablation_cells("b", runs).split(" | ")[2] == "0.90"  # the older run, against its own base
    rs.merge_speed(meta, run({"base": 20.0, "b": 20.0}, "third"))
    assert [r["command"] for r in rs.speed_runs(meta)] == ["third", "second"]  # nothing left of the first


def test_time_rows_times_a_plain_bfloat16_model():
    """The bfloat16 reference of the cost columns is the float model itself (plain linears)."""
    t = rs.time_rows({"bf16": tiny_model("llama", torch.bfloat16)}, 160, 16, 1)
    assert set(t["bf16"]) == {"prefill_ms", "o_proj_ms", "down_proj_ms"} and min(t["bf16"].values()) > 0


def test_a_reused_checkpoint_must_have_been_made_with_the_rows_configuration(tmp_path):
    model = quantize_tiny(method="quad", rank=8, a_clip_search=False, o_rank=0, down_smooth=0.0, weights="rtn")
    model.quadllm_info["quant_config"]["extra"] = {"calib_origin": "wiki.valid.tokens"}  # as the CLI records it
    save(model, tiny_tokenizer(), tmp_path / "ckpt")
    argv = ["quantize", "--method", "quad", "--rank", "8", "--weights", "rtn", "--calib-samples", "4",
            "--calib-seqlen", "16", "--out", "x"]
    rs.check_reused("row", tmp_path / "ckpt", rs.expected_config([*argv, *rs.PAPER]))  # the same: no error
    with pytest.raises(SystemExit, match="a_clip_search=False.*the row now gives.*a_clip_search=True"):
        rs.check_reused("row", tmp_path / "ckpt", rs.expected_config(argv))  # today's defaults differ


def test_results_name_no_machine_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("QUADLLM_CACHE", str(tmp_path / "cache"))
    obj = {"a": str(rs.ROOT / "runs" / "x"), "b": str(rs.ROOT.parent / "shared" / "data"),
           "c": str(tmp_path / "cache" / "models" / "m.gguf")}
    assert rs.portable(obj) == {"a": "./runs/x", "b": "../shared/data", "c": "$QUADLLM_CACHE/models/m.gguf"}


def test_a_row_that_names_its_calibration_keeps_it(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(rs, "run_cli_cached", lambda name, cmd, out, force: seen.setdefault(name, cmd))
    args = rs.argparse.Namespace(model="default", work=str(tmp_path), calib_samples=4, calib_seqlen=16, seed=0,
                                 data_dir=None, force=False)
    rows = dict(rs.ABLATION_ROWS)
    for name in ("QUAD W4A4 r=64", "QUAD W4A4 r=64 (code calibration)"):
        rs.quantize_row(name, rows[name], args)
    plain, code = seen["QUAD W4A4 r=64"], seen["QUAD W4A4 r=64 (code calibration)"]
    assert plain[plain.index("--calib") + 1] == rs.CALIB and plain.count("--calib") == 1
    assert code[code.index("--calib") + 1] == rs.CODE_CALIB and code.count("--calib") == 1

    def rest(cmd):  # everything but the calibration and the output directory
        drop = {cmd.index("--calib"), cmd.index("--calib") + 1, cmd.index("--out"), cmd.index("--out") + 1}
        return [a for i, a in enumerate(cmd) if i not in drop]

    assert rest(code) == rest(plain)
    # and a table says so only when it has such a row
    assert rs.calibration_source(["QUAD W4A4 r=64"]) == "`wiki.valid.tokens`"
    assert "`--calib pysource`" in rs.calibration_source(["QUAD W4A4 r=64", "QUAD W4A4 r=64 (code calibration)"])
