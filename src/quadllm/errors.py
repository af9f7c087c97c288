"""The error every user-facing failure derives from.

A :class:`QuadllmError` is a problem with the user's input or environment (a bad option, a
missing or damaged file, an unsupported model), not a bug: the command line prints its message
as one line and exits with :attr:`QuadllmError.exit_code`. Each subsystem defines its own
subclass next to the code that raises it (``ConfigError`` in :mod:`quadllm.config`,
``CheckpointError`` in :mod:`quadllm.io.checkpoint`, ...). The subclasses also derive from the
built-in error they stand for (``ValueError``, ``FloatingPointError``), so ``except ValueError``
keeps working for library users.
"""

from __future__ import annotations


class QuadllmError(Exception):
    """A failure caused by input or environment, reported as one line with ``exit_code``."""

    exit_code: int = 2
