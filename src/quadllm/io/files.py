"""Files written so that a reader never sees half of them, and SHA-256 of files.

- :func:`atomic_write`: one file (bytes, or produced by a writer callback) through a temporary
  sibling that is fsynced and renamed into place.
- :func:`atomic_dir`: a directory built in a temporary sibling and renamed into place; an existing
  directory is replaced only once the new one is complete, and never on failure.
- :func:`sha256_file`: the hash of a file's bytes, read in chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import QuadllmError

__all__ = ["WriteError", "atomic_write", "atomic_dir", "fsync_dir", "sha256_file"]


class WriteError(QuadllmError, OSError):
    """An output that could not be written (full disk, permissions, a read-only filesystem, a
    quota); nothing was left under its name."""


def _write_error(out: Path, exc: OSError) -> WriteError:
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(out) else ""
    return WriteError(f"could not write {out}: {reason}{where}; nothing was written and any earlier {out.name} "
                      "is unchanged")


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort: some filesystems refuse)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write(path: str | Path, data: bytes | str | None = None,
                 writer: Callable[[str], None] | None = None) -> Path:
    """Write ``data`` (or let ``writer(tmp_path)`` write) to ``path`` atomically.

    The file appears complete under its name or not at all; on any error the temporary file is
    removed and an existing ``path`` is left as it was."""
    if (data is None) == (writer is None):
        raise TypeError("atomic_write takes exactly one of data and writer")
    path = Path(path).expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        if writer is None:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode() if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            os.close(fd)
            writer(tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, WriteError):
            raise
        raise _write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success it replaces ``out`` (an existing
    directory is replaced only then), on any error it is removed and ``out`` is left as it was.
    The caller decides whether ``out`` may be replaced at all."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as exc:
        raise _write_error(out, exc) from exc
    try:
        yield tmp
        fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "ckpt")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        fsync_dir(out.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, QuadllmError):
            raise
        raise _write_error(out, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | Path, digest: "hashlib._Hash | None" = None) -> str:
    """SHA-256 of a file's bytes (``digest``: an existing hash to continue, for several files)."""
    h = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
