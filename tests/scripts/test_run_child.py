"""scripts' run_child: a child `quadllm ...` process does not outlive the results script that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's bookkeeping is left


def _wait_for(pred, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.1)
    return pred()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL], ids=lambda s: s.name)
def test_child_dies_with_its_script(tmp_path, sig):
    pidfile = tmp_path / "child.pid"
    child = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    parent = tmp_path / "parent.py"
    parent.write_text(f"import sys\nsys.path.insert(0, {str(SCRIPTS)!r})\nfrom results_smollm2 import run_child\n"
                      f"run_child([sys.executable, '-c', {child!r}])\n")
    proc = subprocess.Popen([sys.executable, str(parent)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait_for(lambda: pidfile.is_file() and pidfile.read_text(), 120), proc.stderr.read()
        pid = int(pidfile.read_text())
        assert _alive(pid)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        assert _wait_for(lambda: not _alive(pid), 30), f"child {pid} outlived its script after {sig.name}"
    finally:
        proc.kill()
        proc.wait()
        if pidfile.is_file() and pidfile.read_text():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_run_child_returns_output_and_exit_code():
    sys.path.insert(0, str(SCRIPTS))
    from results_smollm2 import run_child

    r = run_child([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (r.returncode, r.stdout, r.stderr) == (3, "out\n", "err\n")
