"""Atomic writes and file hashes."""

from __future__ import annotations

import hashlib

import pytest

from quadllm.io.files import atomic_dir, atomic_write, sha256_file


def test_atomic_write_replaces_only_when_complete(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write(path, "first")
    assert path.read_text() == "first"

    def broken(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(path, writer=broken)
    assert path.read_text() == "first" and sorted(p.name for p in path.parent.iterdir()) == ["out.json"]
    atomic_write(path, b"second")
    assert path.read_bytes() == b"second"
    with pytest.raises(TypeError):
        atomic_write(path)


def test_atomic_dir_keeps_the_old_directory_on_failure(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(out) as tmp:
            (tmp / "a").write_text("2")
            raise KeyboardInterrupt
    assert (out / "a").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_sha256_file_is_hashlib_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 20000  # several read chunks
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    h = hashlib.sha256()
    sha256_file(tmp_path / "f", h)
    assert sha256_file(tmp_path / "f", h) == hashlib.sha256(data + data).hexdigest()
