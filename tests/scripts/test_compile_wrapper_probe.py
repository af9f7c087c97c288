"""scripts/compile_wrapper_probe.py: a small run on a tiny model and its table (the wrappers' equal
logits and the fallback: tests/backends/test_compiled.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import quantize_tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
probe = pytest.importorskip("compile_wrapper_probe")
from quadllm.backends.int4 import int4pack_available  # noqa: E402


@pytest.mark.skipif(not int4pack_available(), reason="torch's CPU INT4 GEMM does not run here")
def test_a_small_probe_times_both_wrappers_and_finds_the_same_logits(monkeypatch):
    monkeypatch.setattr(probe, "load", lambda ckpt: (quantize_tiny("llama", weights="rtn", method="quad", rank=8),))
    monkeypatch.setattr(probe, "NEW", 4)
    row = probe.probe_model("tiny", batch=2, steps=3, rounds=2, seed=0)
    assert row["logits_equal"] is True
    assert set(row["ms_per_step"]) == {"cpp", "python"} and all(v > 0 for v in row["ms_per_step"].values())
    assert row["speedup_cpp"] == pytest.approx(row["ms_per_step"]["python"] / row["ms_per_step"]["cpp"], rel=1e-2)
    assert all(v > 0 for v in row["compile_s"].values())
    md = probe.render([row], {"invocation": "python scripts/compile_wrapper_probe.py --models tiny", "date": "d",
                              "machine": "m", "seconds": 1, "rounds": 2, "steps": 3, "fresh_cache": True})
    assert f"| `tiny` | 2 | {row['ms_per_step']['cpp']} | {row['ms_per_step']['python']} | " in md
    assert "empty at the start" in md


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["compile_wrapper_probe.py", "--models", str(tmp_path / "none"),
                                      "--out", str(tmp_path / "out")])
    assert probe.main() == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert not (tmp_path / "out.md").exists()
