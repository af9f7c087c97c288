"""The speed table of scripts/cost_model.py from hand-made benchmark records."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
cm = pytest.importorskip("cost_model")


def test_cost_tables_ratios_to_bfloat16():
    recs = [{"variant": v, "phase": ph, "batch": 1, "tokens": t, "median_ms": ms, "tokens_per_s": 1.0,
             "speedup_vs_fp32": 1.0} for v, ph, t, ms in (("fp32", "prefill", 8, 40.0), ("bf16", "prefill", 8, 10.0),
                                                          ("cpu-int8", "prefill", 8, 20.0), ("fp32", "decode", 4, 5.0))]
    rows = {(r["variant"], r["phase"]): r["speedup_vs_bf16"] for r in cm.bench_rows(recs)}
    assert rows[("cpu-int8", "prefill")] == 0.5 and rows[("fp32", "prefill")] == 0.25
    assert rows[("fp32", "decode")] is None  # no bfloat16 figure for that phase
