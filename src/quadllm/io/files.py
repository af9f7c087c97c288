"""Files written so that a reader never sees half of them, and SHA-256 of files.

- :func:`atomic_write`: one file (bytes, or produced by a writer callback) through a temporary
  sibling that is fsynced and renamed into place.
- :func:`atomic_dir`: a directory built in a temporary sibling and renamed into place; an existing
  directory is replaced only once the new one is complete, and never on failure.
- :func:`sha256_file`: the hash of a file's bytes, read in chunks.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from ..errors import QuadllmError

__all__ = ["WriteError", "OutputBusy", "atomic_write", "atomic_dir", "output_lock", "fsync_dir", "sha256_file",
           "cache_root"]


class WriteError(QuadllmError, OSError):
    """An output that could not be written (full disk, permissions, a read-only filesystem, a
    quota); nothing was left under its name."""


class OutputBusy(QuadllmError, RuntimeError):
    """Another process is writing the same output."""


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
        if isinstance(exc, QuadllmError):
            raise
        raise _write_error(path, exc) from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


_HELD: dict[str, int] = {}  # output path -> lock file descriptor, for the locks this process holds


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of output ``out`` (``flock`` on ``.NAME.lock`` beside it): a second process
    that asks for it fails at once with :class:`OutputBusy`. Re-entrant within a process."""
    key = str(out.absolute())
    if key in _HELD:
        yield
        return
    lock = out.parent / f".{out.name}.lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputBusy(f"{out} is being written by another quadllm process (pid {holder}); wait for it "
                                 "to finish or write elsewhere") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a lock file its previous holder unlinked while this one waited
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError as exc:
        raise _write_error(out, exc) from exc
    _HELD[key] = fd
    try:
        yield
    finally:
        del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(out: Path) -> None:
    """Remove what a killed run left beside ``out``: its temporary directory, and, when it died
    between its two renames, put the previous ``out`` back from its ``.old-`` directory."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(tmp|old)-(\d+)-.*")
    for sib in sorted(out.parent.glob(f".{glob.escape(out.name)}.*")):
        m = pattern.fullmatch(sib.name)
        if not m or _alive(int(m[2])):
            continue
        if m[1] == "old" and (sib / "ckpt").is_dir() and not out.exists():
            os.replace(sib / "ckpt", out)
        shutil.rmtree(sib, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``out``; on success it replaces ``out`` (an existing
    directory is replaced only then), on any error it is removed and ``out`` is left as it was.
    It holds :func:`output_lock` meanwhile, and first removes what a killed run left beside
    ``out``. The caller decides whether ``out`` may be replaced at all."""
    with output_lock(out):
        try:
            _clean_stale(out)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
        except OSError as exc:
            raise _write_error(out, exc) from exc
        try:
            yield tmp
            fsync_dir(tmp)
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
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


def cache_root() -> Path:
    """Where quadllm keeps what it derives from original models (``$QUADLLM_CACHE``)."""
    return Path(os.environ.get("QUADLLM_CACHE", Path.home() / ".cache" / "quadllm"))


def sha256_file(path: str | Path, digest: "hashlib._Hash | None" = None) -> str:
    """SHA-256 of a file's bytes (``digest``: an existing hash to continue, for several files)."""
    h = digest if digest is not None else hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
