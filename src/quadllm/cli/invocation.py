"""The ``quadllm`` command as a child process of this interpreter runs it, and as a user types it:
scripts run the command line in child processes and record each command they ran."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

__all__ = ["child_argv", "shown"]

#: what follows the interpreter in :func:`child_argv`'s list
_MODULE = ("-m", "quadllm.cli")


def child_argv(*args: str) -> list[str]:
    """The argument list that runs ``quadllm ARGS`` with this Python (``subprocess.run`` takes it)."""
    return [sys.executable, *_MODULE, *args]


def shown(argv: Sequence[str]) -> str:
    """A :func:`child_argv` list as a user types it: ``quadllm ARGS``, quoted where a shell needs it."""
    if tuple(argv[1:3]) != _MODULE:
        raise ValueError(f"not a quadllm command line: {list(argv[:3])}")
    return "quadllm " + shlex.join(argv[3:])
