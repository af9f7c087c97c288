"""scripts/attention_dtype_probe.py: a small run, its table and its refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
probe = pytest.importorskip("attention_dtype_probe")


def test_a_small_probe_times_each_dtype_and_measures_its_error(monkeypatch):
    monkeypatch.setattr(probe, "SHAPES", [("t", 4, 2, 16, 3)])
    rows = probe.probe([8, 24], rounds=2, seed=0)
    assert [r["tokens"] for r in rows] == [8, 24]
    r = rows[1]
    assert list(r["ms_per_layer"]) == ["float32", "bfloat16", "bfloat16 with casts"]
    assert r["speedup_vs_float32"]["float32"] == 1.0
    err = r["relative_error_vs_float64"]
    assert err["float32"] < 1e-5 < err["bfloat16"] < 2e-2  # bfloat16 keeps 8 bits of mantissa
    md = probe.render(rows, {"invocation": "python scripts/attention_dtype_probe.py", "date": "d", "machine": "m",
                             "threads": 2, "rounds": 2})
    assert f"| t | 24 | {r['ms_per_layer']['float32']} | " in md


def test_the_reference_is_causal_grouped_attention():
    """The probed call against attention written out: softmax(q kᵀ / sqrt(d) + causal mask) v, with
    each KV head serving its group of query heads."""
    import torch

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    kk, vv = k[:, [0, 0, 1, 1]], v[:, [0, 0, 1, 1]]
    scores = q @ kk.transpose(-1, -2) / 8 ** 0.5
    scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(probe.attention(q, k, v), scores.softmax(-1) @ vv, atol=1e-6)


@pytest.mark.parametrize("argv", [["--lengths", "a,b"], ["--lengths", "0"], ["--rounds", "0"]])
def test_bad_options_are_one_line_errors(argv, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["attention_dtype_probe.py", *argv, "--out", str(tmp_path / "o")])
    assert probe.main() == 2
    assert capsys.readouterr().err.startswith("error:")
    assert not (tmp_path / "o.md").exists()
