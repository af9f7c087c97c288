"""scripts/int4_gemv_probe.py: its table (the kernel itself: tests/backends/test_vnni.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
probe = pytest.importorskip("int4_gemv_probe")


def test_the_table_shows_every_row():
    row = {"model": "SmolLM2", "linear": "down", "k": 1536, "n": 576, "rows": 1, "setting": "streamed", "exact": True,
           "torch_op_sums_exact": False, "vnni_us": 20.0, "torch_int4pack_us": 40.0, "speedup": 2.0,
           "vnni_weight_gbs": 22.1, "torch_weight_gbs": 11.05}
    md = probe.render([row], {"invocation": "python scripts/int4_gemv_probe.py", "date": "2026-12-07", "machine": "m",
                              "stream_mb": 256.0})
    assert "| SmolLM2 | down | 1536 | 576 | 1 | streamed | 20.0 | 40.0 | 2.0x | 22.1 | 11.05 | True | False |" in md
    assert "256 MB of copies" in md


def test_a_small_probe_runs_and_its_kernel_is_exact(monkeypatch):
    if probe.vnni_unavailable_reason() is not None:
        pytest.skip(f"the VNNI kernel does not run here: {probe.vnni_unavailable_reason()}")
    monkeypatch.setattr(probe, "SHAPES", [("t", "x", 130, 10)])
    monkeypatch.setattr(probe, "timed", lambda fn, calls: [fn(0), fn(calls - 1)] and 1.0)
    rows = probe.probe([1, 3], seed=0, stream_mb=0.01)
    assert [(r["rows"], r["setting"]) for r in rows] == [(1, "cached"), (1, "streamed"), (3, "cached"), (3, "streamed")]
    assert all(r["exact"] for r in rows)
