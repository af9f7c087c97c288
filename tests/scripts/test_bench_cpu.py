"""scripts/bench_cpu.py --models: issue 22's targets read off the records, and the Markdown of them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
bc = pytest.importorskip("bench_cpu")

LLAMA = "llama.cpp Q4_1 (source GGUF)"


def _r(variant, phase, batch, tokens, tps, compiled=False, **extra):
    return {"variant": variant, "phase": phase, "batch": batch, "tokens": tokens, "tokens_per_s": tps,
            "compiled": compiled, **extra}


RECORDS = [_r("bf16", "prefill", 1, 2048, 1000.0), _r("bf16", "decode", 1, 128, 40.0),
           _r("bf16", "decode", 1, 128, 50.0, True),
           _r(bc.QUAD_FAST, "prefill", 1, 2048, 700.0), _r(bc.QUAD_FAST, "decode", 1, 128, 30.0, of_bound=0.1),
           _r(bc.QUAD_FAST, "decode", 1, 128, 80.0, True, of_bound=0.3),
           _r(bc.QUAD_FAST, "decode", 8, 128, 300.0, True, of_bound=0.9),
           _r(LLAMA, "decode", 1, 128, 100.0)]


def test_targets_judge_the_fastest_batch1_decode_and_the_2048_prefill():
    got = [(t["measured"], t["goal"], t["met"]) for t in bc.model_targets(RECORDS, LLAMA)]
    # the compiled row (80 tok/s) is the fastest at batch 1; batch 8's share of the bound is not used
    assert got == [(0.8, 1.0, False), (2.0, 1.5, True), (1.6, None, None), (0.3, 0.5, False), (0.7, 1.2, False)]
    missing = bc.model_targets(RECORDS[:3], None)
    assert all(t["measured"] is None and t["met"] is None for t in missing)


def test_the_int4_head_variant_gets_its_own_decode_targets():
    head4 = [_r(bc.quad_variant("int4"), "decode", 1, 128, 120.0, True, of_bound=0.4), _r(bc.quad_variant("int4"), "decode", 1, 128, 40.0)]
    targets = bc.model_targets(RECORDS + head4, LLAMA)
    mine = [(t["measured"], t["met"]) for t in targets if bc.quad_variant("int4") in t["target"]]
    assert mine == [(1.2, True), (3.0, True), (2.4, None), (0.4, False)]
    assert all("(compiled)" in t["target"] for t in targets if bc.quad_variant("int4") in t["target"])


def test_models_markdown_has_every_row_and_target():
    res = {"checkpoint": "runs/x", "model": "Tiny", "bandwidth_gbs": 20.0, "weight_mb_per_step": {"bf16": 10.0},
           "records": RECORDS, "targets": bc.model_targets(RECORDS, LLAMA),
           "decode_profile": {"self_ms_per_step": 5.0, "operator_calls_per_step": 300,
                              "top": [{"op": "aten::mm", "self_ms_per_call": 1.0, "share": 0.2, "calls_per_call": 3}]}}
    md = bc.models_markdown([res], {"command": "python scripts/bench_cpu.py --models runs/x", "date": "2026-12-07",
                                    "machine": "test", "seconds": 10})
    table = [line for line in md.splitlines() if line.startswith(("| bf16", f"| {bc.QUAD_FAST}", "| llama.cpp"))]
    assert len(table) == len(RECORDS)
    assert "| 0.80x | 1.0x | no |" in md and "| 2.00x | 1.5x | yes |" in md and "aten::mm" in md
