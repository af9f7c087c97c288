"""Every argument, path, data source, output directory and the free space are checked before a
model is loaded: a bad one costs no loading time."""

from __future__ import annotations

import collections
import logging

import pytest

from quadllm.cli import main


@pytest.fixture
def tiny_dir(tiny_original):
    return tiny_original


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any model fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    for target in ("quadllm.cli.quantize.load_model", "quadllm.cli.common.load_model", "quadllm.cli.common.load",
                   "quadllm.cli.quantize.quantize_streaming"):
        monkeypatch.setattr(target, forbidden)


def _run(argv, caplog) -> tuple[int, str]:
    with caplog.at_level(logging.ERROR, logger="quadllm"):
        code = main(argv)
    return code, " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)


def test_quantize_checks_calibration_data_first(tiny_dir, tmp_path, no_loading, caplog):
    code, msg = _run(["quantize", "--model", str(tiny_dir), "--calib", str(tmp_path / "missing.txt"),
                      "--out", str(tmp_path / "q"), "-q"], caplog)
    assert code == 2 and "missing.txt" in msg


def test_quantize_checks_the_output_first(tiny_dir, tmp_path, no_loading, caplog):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    code, msg = _run(["quantize", "--model", str(tiny_dir), "--out", str(tmp_path / "notes"), "-q"], caplog)
    assert code == 2 and "refusing to overwrite" in msg and (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


def test_quantize_checks_the_free_space_first(tiny_dir, tmp_path, no_loading, caplog, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr("quadllm.cli.common.shutil.disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    code, msg = _run(["quantize", "--model", str(tiny_dir), "--method", "quarot", "--weights", "rtn",
                      "--out", str(tmp_path / "q"), "-q"], caplog)
    assert code == 2 and "kB free" in msg and "the checkpoint needs about" in msg


def test_quantize_checks_the_rank_against_the_config_first(tiny_dir, tmp_path, no_loading, caplog):
    code, msg = _run(["quantize", "--model", str(tiny_dir), "--rank", "49", "--out", str(tmp_path / "q"), "-q"], caplog)
    assert code == 2 and "larger than the hidden size 48" in msg


@pytest.mark.parametrize("override,match", [("layers.9.*=skip", "names no module of this model"),
                                            ("*.o_proj=a5", "activations at 5 bits"),
                                            ("*.o_proj", "PATTERN=SETTING")])
def test_quantize_checks_the_overrides_against_the_model_first(tiny_dir, tmp_path, no_loading, caplog, override,
                                                               match):
    code, msg = _run(["quantize", "--model", str(tiny_dir), "--rank", "8", "--override", "*.down_proj=a8",
                      "--override", override, "--out", str(tmp_path / "q"), "-q"], caplog)
    assert code == 2 and match in msg and not (tmp_path / "q").exists()


def test_eval_checks_data_and_reference_first(tiny_dir, tmp_path, no_loading, caplog):
    code, msg = _run(["eval", str(tiny_dir), "--data", str(tmp_path / "nope.raw"), "-q"], caplog)
    assert code == 2 and "nope.raw" in msg
    code, msg = _run(["eval", str(tiny_dir), "--reference", str(tmp_path / "no-model"), "-q"], caplog)
    assert code == 2 and "no-model" in msg


def test_compare_checks_every_model_path_first(tiny_dir, tmp_path, no_loading, caplog):
    code, msg = _run(["compare", str(tiny_dir), str(tmp_path / "absent"), "--data", "pydoc",
                      "--out", str(tmp_path / "c.md"), "-q"], caplog)
    assert code == 2 and "absent" in msg


def test_finetune_checks_its_data_and_output_first(tmp_path, monkeypatch, caplog):
    def forbidden(*args, **kwargs):
        raise AssertionError("the base was loaded before the inputs were checked")

    monkeypatch.setattr("quadllm.finetune.job.load", forbidden)
    base = tmp_path / "base"
    base.mkdir()
    code, msg = _run(["finetune", str(base), "--data", str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "o"),
                      "-q"], caplog)
    assert code == 2 and "train.jsonl" in msg
    code, msg = _run(["finetune", str(base), "--data", "pydoc", "--adapter-only", "--out", str(tmp_path / "o.bin"),
                      "-q"], caplog)
    assert code == 2 and ".safetensors" in msg


def test_advise_rank_and_drift_check_their_data_first(tmp_path, no_loading, monkeypatch, caplog):
    monkeypatch.setattr("quadllm.cli.analysis.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    code, msg = _run(["advise-rank", "--calib", str(tmp_path / "c.txt"), "-q"], caplog)
    assert code == 2 and "c.txt" in msg
