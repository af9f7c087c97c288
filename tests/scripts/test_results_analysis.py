"""The error-by-linear-type table of scripts/results_analysis.py from a hand-made report."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
ra = pytest.importorskip("results_analysis")


def test_error_by_type_averages_the_layers_and_compares_quad_with_quarot():
    errors = {"RTN": {"q_proj": [1.0, 3.0], "o_proj": [2.0, 2.0]},
              "QuaRot": {"q_proj": [0.2, 0.4], "o_proj": [0.1, 0.3]},
              "QUAD r=64": {"q_proj": [0.1, 0.2], "o_proj": [0.2, 0.2]}}
    table = ra.error_by_type(errors)
    assert table["q_proj"] == pytest.approx({"RTN": 2.0, "QuaRot": 0.3, "QUAD r=64": 0.15})
    lines = ra.error_lines(table)
    assert "| linear | RTN | QuaRot | QUAD r=64 | QUAD r=64 / QuaRot |" in lines
    assert "| q_proj | 2.0000 | 0.3000 | 0.1500 | 0.50 |" in lines
    assert "| o_proj | 2.0000 | 0.2000 | 0.2000 | 1.00 |" in lines
    assert ra.error_lines(None) == []

