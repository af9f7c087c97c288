"""An interrupted run leaves nothing behind and never damages a good checkpoint: Ctrl-C during
calibration, GPTQ or the final write; SIGKILL during the write (the next run cleans up); two runs
on the same ``--out`` (one wins, the other fails at once)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from quadllm.cli import main
from quadllm.io.checkpoint import weights_hash
from quadllm.io.files import output_lock


@pytest.fixture
def orig(tiny_original):
    return tiny_original


def _quantize_args(orig, out):
    return ["quantize", "--model", str(orig), "--rank", "8", "--calib-samples", "4", "--calib-seqlen", "16",
            "--streaming", "off", "--out", str(out), "-q"]


@pytest.mark.parametrize("where", ["quadllm.pipelines.in_memory.residual_second_moment",
                                   "quadllm.pipelines.recipe.gptq_layer", "quadllm.io.checkpoint.write_tensors"],
                         ids=["calibration", "gptq", "final-write"])
def test_ctrl_c_leaves_nothing_and_keeps_the_old_checkpoint(tmp_path, orig, monkeypatch, where):
    out = tmp_path / "ckpt"
    assert main(_quantize_args(orig, out)) == 0
    before = weights_hash(out)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(where, interrupted)
    assert main([*_quantize_args(orig, out), "--seed", "1"]) == 130
    assert weights_hash(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "orig"]


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import quadllm.io.checkpoint as checkpoint
    real = checkpoint.write_tensors
    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.write_tensors = write_then_die
    from quadllm.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_during_the_write_leaves_no_checkpoint_and_the_next_run_cleans_up(tmp_path, orig):
    out = tmp_path / "ckpt"
    r = subprocess.run([sys.executable, "-c", KILLED_RUN, *_quantize_args(orig, out)], capture_output=True)
    assert r.returncode == -9
    assert not out.exists()
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    assert any(name.startswith(".ckpt.tmp-") for name in stale), stale
    assert main(_quantize_args(orig, out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "orig"]


def test_killed_between_the_two_renames_the_previous_checkpoint_comes_back(tmp_path, orig):
    out = tmp_path / "ckpt"
    assert main(_quantize_args(orig, out)) == 0
    before = weights_hash(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    moved = tmp_path / f".ckpt.old-{int(dead.stdout)}-abc"
    moved.mkdir()
    out.rename(moved / "ckpt")  # what a run killed after its first rename leaves
    assert main([*_quantize_args(orig, out), "--seed", "1"]) == 0
    assert weights_hash(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "orig"]


def test_a_second_run_on_the_same_output_fails_at_once(tmp_path, orig):
    out = tmp_path / "ckpt"
    with output_lock(out):
        r = subprocess.run([sys.executable, "-m", "quadllm.cli", *_quantize_args(orig, out)], capture_output=True,
                           text=True)
    assert r.returncode == 2 and "being written by another quadllm process" in r.stderr
    assert r.stderr.strip().count("\n") == 0 or "ERROR" in r.stderr.strip().splitlines()[-1]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["orig"]
    assert main(_quantize_args(orig, out)) == 0


def test_the_lock_is_reentrant_and_removed(tmp_path):
    out = tmp_path / "x"
    with output_lock(out):
        with output_lock(out):
            assert (tmp_path / ".x.lock").is_file()
    assert not (tmp_path / ".x.lock").exists()
