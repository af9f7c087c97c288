"""Calibration selection: the mixture grid, the moment of a mixture as the weighted moments, the
choice of the candidate whose outliers the target shares, and the command's files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer

from quadllm.analysis.calibration_select import mixture_grid, mixture_spec, select_calibration
from quadllm.arch import get_adapter
from quadllm.cli import main
from quadllm.config import QuantConfig
from quadllm.data.samples import calibration_samples
from quadllm.data.text import load_text
from quadllm.steps.calibration import residual_second_moment


def test_the_grid_holds_every_mixture_of_the_step():
    assert mixture_grid(2, 4) == [(0.0, 1.0), (0.25, 0.75), (0.5, 0.5), (0.75, 0.25), (1.0, 0.0)]
    grid = mixture_grid(3, 4)
    assert len(grid) == 15 and all(sum(w) == pytest.approx(1.0) for w in grid)
    assert mixture_spec(["a", "b"], (0.75, 0.25)) == "a*0.75+b*0.25" and mixture_spec(["a", "b"], (0.0, 1.0)) == "b"


def test_a_mixtures_moment_is_the_weighted_moments_of_equal_window_counts():
    model = tiny_model("llama", torch.float32, seed=0)
    adapter = get_adapter(model)
    a, b = random_ids(4, 16, seed=1), random_ids(4, 16, seed=2)
    ma, mb = (residual_second_moment(model, adapter, x, progress=False) for x in (a, b))
    both = residual_second_moment(model, adapter, torch.cat([a, b]), progress=False)
    assert torch.allclose(both, 0.5 * ma + 0.5 * mb, rtol=1e-6, atol=1e-9)


def _shifted_model():
    """Tokens >= 100 carry massive activations in channels 10-12."""
    model = tiny_model("llama", torch.float32, seed=0)
    with torch.no_grad():
        model.get_input_embeddings().weight[100:, 10:13] *= 60
    return model


def test_the_candidate_sharing_the_targets_outliers_is_chosen():
    model = _shifted_model()
    g = torch.Generator().manual_seed(3)
    low, high = torch.randint(0, 100, (6, 24), generator=g), torch.randint(100, 160, (6, 24), generator=g)
    target, probe = torch.randint(100, 160, (4, 24), generator=g), torch.randint(100, 160, (2, 24), generator=g)
    sel = select_calibration(model, {"low": low, "high": high}, target, probe, rank=2, steps=2, probes=3,
                             progress=False)
    assert sel.chosen[1] > 0 and sel.spec in ("high", "low*0.5+high*0.5")
    by = {tuple(r["weights"]): r for r in sel.rows}
    assert by[(0.0, 1.0)]["leftover"] < by[(1.0, 0.0)]["leftover"]
    assert sum(r.get("kl") is not None for r in sel.rows) == 2 and "← chosen" in sel.table()  # not "low" alone


def test_calibrate_select_writes_a_calibration_set_quantize_reads(tiny_original, tmp_path, capsys):
    a, b, target = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "target.txt"
    a.write_text(" ".join(f"word{i % 31}" for i in range(6000)))
    b.write_text(" ".join(f"zq{i % 7}x{i % 11}" for i in range(6000)))
    target.write_text(" ".join(f"zq{i % 5}x{i % 13}" for i in range(6000)))
    out = tmp_path / "calib.jsonl"
    assert main(["calibrate-select", str(tiny_original), "--candidates", f"{a},{b}", "--target", str(target),
                 "--rank", "8", "--samples", "2", "--probe-samples", "1", "--seqlen", "32", "--steps", "2",
                 "--probes", "2", "--windows", "6", "--out", str(out), "-q"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    selection = json.loads((tmp_path / "calib.selection.json").read_text())
    assert len(records) == 6 == sum(selection["windows_written"]) and "chosen:" in capsys.readouterr().out
    assert sorted({r["source"] for r in records}) == sorted(
        n for n, w in zip(selection["candidates"], selection["chosen"]) if w > 0)
    config = QuantConfig(calib=str(out), calib_samples=2, calib_seqlen=16)
    assert calibration_samples(tiny_tokenizer(), config).shape == (2, 16)
    assert load_text(str(out), "calib").text
    assert main(["calibrate-select", "--candidates", f"{a},{a}", "--target", str(target), "--out", str(out),
                 "-q"]) == 2
