"""scripts/head_cost.py: each head's change against the stored head, and its table."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
hc = pytest.importorskip("head_cost")


def _eval(head, ppl, kl):
    return {"ppl": ppl, "kl": kl, "top1_agreement": 0.7, "reference_ppl": 20.0, "windows": 8, "seqlen": 2048,
            "backend": "cpu-int4", "head": head}


def test_rows_compare_each_head_with_the_stored_one_and_render_them():
    results = {"runs/a": {"float": _eval("float", 25.0, 0.30), "int4": _eval("int4", 25.5, 0.31)},
               "runs/b": {"int8": _eval("int8", 30.0, 0.2)}}
    table = hc.rows(results)
    assert [(r["checkpoint"], r["head"]) for r in table] == [("runs/a", "float"), ("runs/a", "int4"), ("runs/b", "int8")]
    assert table[1]["ppl_change"] == pytest.approx(0.02) and table[1]["kl_change"] == pytest.approx(0.01)
    assert "ppl_change" not in table[2]  # no stored-head row to compare with
    md = hc.render(table, [hc.shown(hc.command("runs/a", "int4", 8))])
    assert "| runs/a | int4 | 25.5000 | +2.00% | 0.31000 | +0.01000 |" in md
    assert "`quadllm eval runs/a --data wikitext2 --max-windows 8 --reference --backend cpu-int4 --head int4`" in md
    assert "| runs/b | int8 | 30.0000 | - |" in md


def test_an_unknown_head_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["head_cost.py", "--heads", "int3", "--models", "runs/none"])
    assert hc.main() == 2
    assert "unknown head precision 'int3'" in capsys.readouterr().err
