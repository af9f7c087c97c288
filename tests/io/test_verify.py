"""Checkpoints record the size and SHA-256 of every weight file when written; ``load`` checks sizes
and headers always and the hashes when the files are small (or when asked); ``quadllm verify``
checks everything."""

from __future__ import annotations

import json

import pytest
from conftest import quantize_tiny, tiny_tokenizer

from quadllm import CheckpointError, load, save
from quadllm.cli import main
from quadllm.io.checkpoint import WEIGHTS_FILE, read_meta, verify_files


@pytest.fixture
def ckpt(tmp_path):
    save(quantize_tiny("llama", method="quad", rank=8, weights="rtn"), tiny_tokenizer(), tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _flip_a_data_byte(path):
    data = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    data[header + (len(data) - header) // 2] ^= 0x01  # one bit of one tensor: the numbers stay finite
    path.write_bytes(bytes(data))


def test_the_record_is_written_and_verifies(ckpt, capsys):
    meta = read_meta(ckpt)
    assert set(meta["files"]) == {WEIGHTS_FILE, "config.json"} and meta["files"][WEIGHTS_FILE]["bytes"] > 0
    assert verify_files(ckpt, meta)["checked"] == "sha256"  # a small checkpoint is hashed by default
    assert main(["verify", str(ckpt)]) == 0 and json.loads(capsys.readouterr().out)["ok"] is True


def test_a_flipped_bit_that_stays_finite_is_caught(ckpt, caplog):
    _flip_a_data_byte(ckpt / WEIGHTS_FILE)
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load(ckpt)
    assert load(ckpt, verify=False)[2]["verified"]["checked"] == "sizes and headers"  # what verify=False skips
    assert main(["verify", str(ckpt), "-q"]) == 2 and "SHA-256 differs" in caplog.text


def test_an_edited_config_is_caught(ckpt):
    cfg = ckpt / "config.json"
    hf = json.loads(cfg.read_text())
    hf["rms_norm_eps"] = 0.1  # loads, with other numbers, were it not recorded
    cfg.write_text(json.dumps(hf, indent=2))
    with pytest.raises(CheckpointError, match="config.json is damaged"):
        load(ckpt)
    meta_file = ckpt / "quadllm_config.json"
    meta = json.loads(meta_file.read_text())
    meta["quant_config"]["a_clip"] = 0.5
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="settings differ"):
        load(ckpt, verify=False)


def test_a_truncated_file_is_caught_without_hashing(ckpt):
    f = ckpt / WEIGHTS_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        load(ckpt, verify=False)


def test_a_checkpoint_without_a_record_still_loads(ckpt, capsys):
    meta_file = ckpt / "quadllm_config.json"
    meta = json.loads(meta_file.read_text())
    del meta["files"]
    meta_file.write_text(json.dumps(meta))
    assert load(ckpt)[2]["verified"]["checked"] == "nothing"
    assert main(["verify", str(ckpt)]) == 0 and json.loads(capsys.readouterr().out)["ok"] is None
