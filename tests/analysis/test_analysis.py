"""The subspace math, the rank advisor, the drift check and the HTML report on tiny models."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer

from quadllm import QuantConfig, quantize
from quadllm.analysis.advisor import advise_rank
from quadllm.analysis.drift import check_drift, subspace_fit
from quadllm.analysis.report import SECTIONS, write_report
from quadllm.analysis.subspace import (
    best_energy,
    energy_captured,
    principal_angles,
    saved_subspace,
    spectrum,
    top_subspace,
)
from quadllm.arch import get_adapter
from quadllm.config import RECIPE_OFF
from quadllm.steps.calibration import residual_second_moment


def _random_moment(d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d, generator=g, dtype=torch.float64) * torch.linspace(5, 0.1, d, dtype=torch.float64)
    return x.T @ x / 200


def test_top_subspace_captures_the_most_energy():
    m = _random_moment()
    evals = spectrum(m)
    P = top_subspace(m, 3)
    assert energy_captured(m, P) == pytest.approx(best_energy(evals, 3))
    q, _ = torch.linalg.qr(torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    assert energy_captured(m, q) < best_energy(evals, 3)
    assert best_energy(evals, 12) == pytest.approx(1.0)


def test_principal_angles_reference_cases():
    eye = torch.eye(6, dtype=torch.float64)
    assert torch.allclose(principal_angles(eye[:, :2], eye[:, :2]), torch.zeros(2, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(principal_angles(eye[:, :2], eye[:, 2:4]), torch.full((2,), math.pi / 2, dtype=torch.float64))
    c, s = math.cos(0.3), math.sin(0.3)
    b = torch.stack([eye[:, 0], c * eye[:, 1] + s * eye[:, 2]], 1)
    assert torch.allclose(principal_angles(eye[:, :2], b), torch.tensor([0.0, 0.3], dtype=torch.float64), atol=1e-6)


def _quantized(seed=0, tokens=(0, 160)):
    model = tiny_model("llama", torch.float32, seed=seed)
    calib = torch.randint(*tokens, (6, 24), generator=torch.Generator().manual_seed(2))
    original = tiny_model("llama", torch.float32, seed=seed)
    quantize(model, QuantConfig(rank=4, weights="rtn", calib_samples=6, calib_seqlen=24), calib, progress=False)
    return model, original, calib


def test_saved_subspace_is_the_calibration_subspace():
    model, original, calib = _quantized()
    P = saved_subspace(model)
    moment = residual_second_moment(original, get_adapter(original), calib, progress=False)
    angles = principal_angles(P, top_subspace(moment, 4))
    assert float(angles.max()) < 1e-3
    assert subspace_fit(moment, P)["fit"] == pytest.approx(1.0, abs=1e-6)


def test_the_stock_layouts_subspace_is_read_against_the_original_table():
    from quadllm.analysis.subspace import SubspaceError
    from quadllm.io.stock_layout import to_stock_modules

    model, original, calib = _quantized()
    P = saved_subspace(model)
    to_stock_modules(model, {k: model.quadllm_info[k] for k in ("quant_config", "structure")})
    stock = saved_subspace(model, original)
    assert stock.shape == P.shape and torch.allclose(stock.T @ stock, torch.eye(4, dtype=torch.float64), atol=1e-10)
    assert float(principal_angles(P, stock).max()) < 1e-2  # the stored tables' FP16 rounding
    with pytest.raises(SubspaceError, match="original model"):
        saved_subspace(model)
    rank0 = tiny_model("llama", torch.float32)
    quantize(rank0, QuantConfig(method="quarot", weights="rtn", calib_samples=6, calib_seqlen=24), calib, progress=False)
    with pytest.raises(SubspaceError, match="rank 0"):
        saved_subspace(rank0, original)


def test_advisor_probes_every_rank_and_recommends_one():
    model = tiny_model("llama", torch.float32)
    before = [p.clone() for p in model.parameters()]
    calib, probe = random_ids(4, 24, seed=3), random_ids(2, 24, seed=4)
    advice = advise_rank(model, calib, probe, ranks=(0, 2, 4, 8), tolerance=0.1, progress=False)
    assert [r["rank"] for r in advice.rows] == [0, 2, 4, 8]
    kls = {r["rank"]: r["kl"] for r in advice.rows}
    assert advice.best == min(kls, key=kls.get)
    assert kls[advice.recommended] <= 1.1 * kls[advice.best]
    assert all(kls[r] > 1.1 * kls[advice.best] for r in kls if r < advice.recommended)
    assert "recommended" in advice.table() and f"r = {advice.recommended}" in advice.explanation()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model is untouched


def _shifted_model(seed=0):
    """A tiny model in which tokens >= 100 carry massive activations in channels 10-12 (the others in 0-1)."""
    model = tiny_model("llama", torch.float32, seed=seed)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[100:, 10:13] *= 60
        emb[100:, :2] /= 30
    return model


def test_drift_fits_same_domain_and_flags_a_different_one():
    original = _shifted_model()
    model = _shifted_model()
    g = torch.Generator().manual_seed(5)
    calib = torch.randint(0, 100, (8, 24), generator=g)
    # QUAD as published: with the default recipe this tiny model is nearly lossless (KL ~1e-5) and the
    # 2x KL rule would compare noise
    quantize(model, QuantConfig(rank=4, weights="rtn", calib_samples=8, calib_seqlen=24, **RECIPE_OFF), calib,
             progress=False)
    same = torch.randint(0, 100, (8, 24), generator=g)
    other = torch.randint(100, 160, (8, 24), generator=g)
    ok = check_drift(model, original, same, calib, same[:2], calib[:2], progress=False)
    assert ok.verdict == "fits" and not ok.reasons
    bad = check_drift(model, original, other, calib, other[:2], calib[:2], progress=False)
    assert bad.verdict == "recalibrate" and bad.reasons
    assert bad.new["fit"] < ok.new["fit"]
    assert bad.new["leftover"] > ok.new["leftover"] >= 1 - 1e-9
    assert "fit (captured / best)" in bad.table() and "saved subspace → re-estimated" in bad.table()
    # the recalibration probe: re-estimating on the other domain lowers its activation error a lot,
    # on the calibration domain it does not
    assert bad.new["probe"]["kl_recalibrated"] < bad.new["probe"]["kl_saved"]
    assert bad.new["probe"]["gain"] > 0.1 >= ok.new["probe"]["gain"]
    assert any("recalibrating on the new data" in r for r in bad.reasons)
    skipped = check_drift(model, original, same, calib, same[:2], calib[:2], gain_min=None, progress=False)
    assert "probe" not in skipped.new and skipped.thresholds["gain_min"] is None


def test_leftover_energy_reference_definition():
    m = _random_moment(d=10, seed=3)
    best = top_subspace(m, 3)
    fit = subspace_fit(m, best)
    assert fit["leftover"] == pytest.approx(1.0) and fit["fit"] == pytest.approx(1.0)
    other, _ = torch.linalg.qr(torch.randn(10, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4)))
    fit = subspace_fit(m, other)
    evals = spectrum(m)
    expected = (1 - energy_captured(m, other)) / (1 - best_energy(evals, 3))
    assert fit["leftover"] == pytest.approx(expected) and fit["leftover"] > 1


def test_recalibration_probe_with_the_calibration_subspace_has_no_gain():
    from quadllm.analysis.drift import recalibration_probe

    original = _shifted_model()
    calib = torch.randint(0, 100, (8, 24), generator=torch.Generator().manual_seed(5))
    moment = residual_second_moment(original, get_adapter(original), calib, progress=False)
    P = top_subspace(moment, 4)
    res = recalibration_probe(original, P, moment, calib[:2])
    assert res["kl_saved"] == pytest.approx(res["kl_recalibrated"], rel=1e-4)
    assert res["gain"] == pytest.approx(0.0, abs=1e-3)


def test_report_renders_every_section(tmp_path):
    model, original, calib = _quantized()
    meta = {"sizes": {"tensor_bytes": {"int4_weights": 1000, "scales": 100, "outlier_columns": 200,
                                       "embedding_and_head": 300, "other": 0}},
            "structure": {"rank": 4, "hidden_size": 48}}
    out = tmp_path / "r" / "report.html"
    data = write_report(original, tiny_tokenizer(), model, meta, QuantConfig(rank=4), calib, out, "tiny", "random",
                        progress=False)
    text = out.read_text()
    for section in SECTIONS:
        assert f"id='{section}'" in text
    assert text.count("data:image/png;base64,") == len(data["figures"]) >= 7
    assert "http://" not in text and "https://" not in text and "<script" not in text
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert set(numbers["linear_errors"]) == {"RTN", "QuaRot", "QUAD r=4"}
    assert len(numbers["precision"]) == 2 and set(numbers["precision"][0]) == set(get_adapter(model).all_linears)
    assert len(numbers["inputs_after"]["attn input (q/k/v)"][0]["chan_max"]) == 48 + 4
    for f in data["figures"].values():
        assert open(f, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # QUAD's rotation and outlier columns lower the worst channel / median ratio of the quantized part
    attn = "attn input (q/k/v)"
    assert max(r["max_over_median"] for r in numbers["inputs_after"][attn]) < \
        max(r["max_over_median"] for r in numbers["inputs_before"][attn])


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_opens_in_headless_chromium(tmp_path):
    model, original, calib = _quantized()
    out = tmp_path / "report.html"
    write_report(original, tiny_tokenizer(), model, None, QuantConfig(rank=4), calib, out, "tiny", "random",
                 progress=False)
    args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run(args + ["--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section}"' in dom.stdout
    artifacts = Path(os.environ.get("QUADLLM_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report_screenshot.png"  # kept for inspection
    r = subprocess.run(args + [f"--screenshot={shot}", "--window-size=1200,3000", out.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]


def test_drift_recalibrate_writes_a_new_checkpoint_on_the_mixture_and_compares_both(tiny_original, tmp_path, capsys):
    from quadllm.cli import main
    from quadllm.io.checkpoint import read_meta, weights_hash

    old_text, new_text = tmp_path / "old.txt", tmp_path / "new.txt"
    old_text.write_text(" ".join(f"word{i % 31}" for i in range(8000)))
    new_text.write_text(" ".join(f"zq{i % 7}x{i % 11}" for i in range(8000)))
    ckpt = tmp_path / "ckpt"
    assert main(["quantize", "--model", str(tiny_original), "--rank", "8", "--weights", "rtn", "--calib", str(old_text),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--layout", "quadllm", "--out", str(ckpt), "-q"]) == 0
    before = weights_hash(ckpt)
    small = ["--samples", "4", "--eval-windows", "1", "--seqlen", "32", "--no-probe", "-q"]
    # a verdict of "fits" writes nothing
    assert main(["drift", str(ckpt), "--data", str(new_text), "--leftover-factor", "1e9", "--kl-factor", "1e9",
                 "--fit-drop", "1", "--recalibrate", str(tmp_path / "unused"), *small]) == 0
    assert not (tmp_path / "unused").exists()
    # the input is never the output
    assert main(["drift", str(ckpt), "--data", str(new_text), "--recalibrate", str(ckpt), *small]) == 2
    out, res = tmp_path / "recal", tmp_path / "drift.json"
    code = main(["drift", str(ckpt), "--data", str(new_text), "--leftover-factor", "0", "--recalibrate", str(out),
                 "--json", str(res), *small])
    assert code == 4 and weights_hash(ckpt) == before
    meta = read_meta(out)
    assert meta["quant_config"]["calib"] == f"{old_text}*0.5+{new_text}*0.5"
    assert meta["quant_config"]["extra"]["calib_counts"] == [2, 2]
    assert {k: v for k, v in meta["quant_config"].items() if k not in ("calib", "extra")} == {
        k: v for k, v in read_meta(ckpt)["quant_config"].items() if k not in ("calib", "extra")}
    rows = json.loads(res.read_text())["recalibrated"]["comparison"]
    assert {(r["model"], r["domain"]) for r in rows} == {(m, d) for m in ("checkpoint", "recalibrated")
                                                         for d in ("new data", "reference data")}
    assert "recalibrated checkpoint:" in capsys.readouterr().out
