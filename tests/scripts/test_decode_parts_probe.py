"""scripts/decode_parts_probe.py: a small run and its table (the kernels: tests/backends/test_vnni.py,
tests/backends/test_head.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
probe = pytest.importorskip("decode_parts_probe")
from quadllm.backends.vnni import vnni_unavailable_reason  # noqa: E402


def test_a_small_probe_runs_and_its_table_shows_every_row(monkeypatch):
    if vnni_unavailable_reason() is not None:
        pytest.skip(f"the VNNI kernels do not run here: {vnni_unavailable_reason()}")
    monkeypatch.setattr(probe, "HEADS", [("t", 300, 48)])
    monkeypatch.setattr(probe, "OUTLIERS", [("t", "x", 40, 9)])
    monkeypatch.setattr(probe, "timed", lambda fn, calls: [fn(0), fn(calls - 1)] and 2.0)
    rows = probe.probe_heads([1, 3], seed=0, stream_mb=0.01) + probe.probe_outliers([2], seed=0, stream_mb=0.01)
    assert [(r["part"], r["rows"]) for r in rows] == [("head", 1), ("head", 3), ("outliers", 2)]
    assert all(r["w8a8_kernels_equal"] for r in rows[:2]) and rows[2]["f16_max_abs_error_vs_float64"] < 1e-5
    assert list(rows[0]["us"]) == ["int8", "w8a8 vnni", "w8a8 torch._int_mm"]
    md = probe.render(rows, {"invocation": "python scripts/decode_parts_probe.py", "date": "2026-12-07",
                             "machine": "m", "stream_mb": 0.01})
    assert "| t | 300 x 48 | 3 | 2 | 2.0 | 2.0 | 2.0 | 1.0x | 1.0x |" in md
    assert "| t | x 40 x 9 | 2 | 6 | 2.0 | 2.0 | 1.0x |" in md
    assert "equal logits on every head shape: True" in md
