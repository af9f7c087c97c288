"""quadllm.cli.invocation: the child process's argument list runs the command line, and is shown
as a user types it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quadllm.cli.invocation import child_argv, shown


def test_child_argv_runs_quadllm_with_this_python():
    argv = child_argv("--help")
    assert argv[0] == sys.executable
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert "quantize" in out


def test_shown_is_the_command_a_user_types_quoted_for_a_shell():
    assert shown(child_argv("eval", "runs/a b", "--rows", "x,y")) == "quadllm eval 'runs/a b' --rows x,y"
    with pytest.raises(ValueError, match="not a quadllm command line"):
        shown(["python", "scripts/x.py"])
