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


def test_a_write_that_fails_is_one_write_error_naming_the_output(tmp_path):
    from quadllm.errors import QuadllmError
    from quadllm.io.files import WriteError

    def full(tmp: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(WriteError, match=r"could not write .*out.bin: No space left on device") as ei:
        atomic_write(tmp_path / "out.bin", writer=full)
    assert isinstance(ei.value, QuadllmError) and isinstance(ei.value, OSError)
    with pytest.raises(WriteError, match="No space left"):
        with atomic_dir(tmp_path / "ckpt"):
            raise OSError(28, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def full_disk(tmp_path):
    """A 32 KB tmpfs (root only; skipped where mounting is not allowed)."""
    import subprocess

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


@pytest.mark.parametrize("precheck", [True, False], ids=["free-space-check", "write-fails"])
def test_quantize_onto_a_full_disk_is_one_line_exit_2(tmp_path, full_disk, caplog, monkeypatch, precheck):
    """Refused before any work by the free-space check, or, when the disk fills while writing (the
    check skipped here), by the write: one line, exit 2, nothing left on the disk."""
    import logging

    import torch
    from conftest import tiny_model, tiny_tokenizer

    from quadllm.cli import main

    orig = tmp_path / "orig"
    tiny_model("llama", torch.float32, hidden_size=96, intermediate_size=192).save_pretrained(orig)
    tiny_tokenizer().save_pretrained(orig)
    if not precheck:
        monkeypatch.setattr("quadllm.cli.quantize.check_free_space", lambda *a: None)
    with caplog.at_level(logging.ERROR, logger="quadllm"):
        code = main(["quantize", "--model", str(orig), "--method", "quarot", "--weights", "rtn", "--streaming", "off",
                     "--out", str(full_disk / "ckpt"), "-q"])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    expected = "kB free and the checkpoint needs about" if precheck else "No space left on device"
    assert code == 2 and len(errors) == 1 and expected in errors[0], errors
    assert "\n" not in errors[0] and list(full_disk.iterdir()) == []
