"""lm-evaluation-harness's own command line scores a quadllm checkpoint as ``quadllm eval --tasks`` does:
``lm_eval --model hf ... trust_remote_code=True`` (stock layout, through transformers) and
``quadllm lm-eval --model quadllm`` (any checkpoint, any backend), offline through ``--include_path``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
from conftest import stock_checkpoint

import quadllm
from quadllm.cli import main as cli_main
from quadllm.data.text import default_data_dir
from quadllm.evaluation.tasks.harness import OFFLINE_DIR, run_tasks
from quadllm.integrations.lm_evaluation import MODEL_NAME, QuadllmLM, harness_argv

pytestmark = pytest.mark.skipif(default_data_dir() is None, reason="needs ../shared/data (the offline task copies)")

LIMIT = 3
TASK_ARGS = ["--tasks", "piqa", "--limit", str(LIMIT), "--batch_size", "3", "--log_samples"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return stock_checkpoint(tmp_path_factory.mktemp("lm_eval") / "ckpt", "llama")


def _reference(ckpt, backend: str = "fake") -> list[float]:
    """Per-item log-likelihoods of every choice, as ``quadllm eval --tasks piqa`` scores them."""
    model, tok, _ = quadllm.load(ckpt)
    quadllm.place(model, backend)
    res = run_tasks(model, tok, ["piqa"], limit=LIMIT, batch_size=3, offline=True)
    return _loglikelihoods(res["samples"]["piqa"])


def _loglikelihoods(samples) -> list[float]:
    """Every choice's log-likelihood, item by item."""
    by_doc = sorted(samples, key=lambda s: s["doc_id"])
    assert [s["doc_id"] for s in by_doc] == list(range(LIMIT))
    return [float(r[0]) for s in by_doc for r in s["filtered_resps"]]


def _samples_written(out) -> list[dict]:
    (path,) = out.rglob("samples_piqa_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _offline_env(tmp_path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "HF_MODULES_CACHE": str(tmp_path / "modules"), "QUADLLM_DATA_DIR": str(default_data_dir())}


def test_the_harness_command_line_with_model_hf_scores_like_quadllm_eval(ckpt, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={ckpt},trust_remote_code=True,dtype=float32",
           *TASK_ARGS, "--include_path", str(OFFLINE_DIR), "--output_path", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_offline_env(tmp_path), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = _loglikelihoods(_samples_written(out))
    assert got == pytest.approx(_reference(ckpt), rel=1e-6)


@pytest.mark.parametrize("backend", ["fake", "cpu-int8"])
def test_quadllm_lm_eval_with_model_quadllm_scores_like_quadllm_eval(ckpt, tmp_path, monkeypatch, backend):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "out"
    rc = cli_main(["lm-eval", "--model", MODEL_NAME, "--model_args", f"pretrained={ckpt},backend={backend}",
                   *TASK_ARGS, "--output_path", str(out)])  # no --include_path: added offline
    assert rc == 0
    assert _loglikelihoods(_samples_written(out)) == pytest.approx(_reference(ckpt, backend), rel=1e-6)


def test_a_missing_checkpoint_is_one_error_before_any_task_work(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc = cli_main(["lm-eval", "--model", MODEL_NAME, "--model_args", f"pretrained={tmp_path / 'nothing'}",
                   "--tasks", "piqa", "--limit", "1"])
    assert rc == 2
    assert "nothing" in caplog.text


def test_offline_the_task_configurations_join_unless_named():
    assert harness_argv(["--tasks", "piqa"], offline=True) == ["--tasks", "piqa", "--include_path", str(OFFLINE_DIR)]
    assert harness_argv(["--tasks", "piqa"], offline=False) == ["--tasks", "piqa"]
    own = ["--include_path=/my/tasks", "--tasks", "x"]
    assert harness_argv(own, offline=True) == own


def test_the_model_type_is_registered_and_declared_as_an_entry_point():
    from lm_eval.api.registry import get_model

    assert get_model(MODEL_NAME) is QuadllmLM
    (ep,) = [e for e in entry_points(group="lm_eval.models") if e.name == MODEL_NAME]
    assert ep.load() is QuadllmLM
