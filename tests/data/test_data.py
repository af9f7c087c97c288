"""Tests for quadllm.data (offline, fast)."""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest
import torch

from quadllm.data import text as data
from quadllm.data.text import (
    DataError,
    TextSource,
    default_data_dir,
    load_text,
    sample_calibration,
    sha256_file,
    tokenize_windows,
)

DATA_DIR = default_data_dir()
WIKI_TEST_SHA256 = "173c87a53759e0201f33e0ccf978e510c2042d7f2cb78229d9a50d79b9e7dd08"
WIKI_VALID_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"
PTB_TEST_SHA256 = "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"


def _need(rel: str) -> Path:
    """Return the offline data file ``rel`` or skip the test with a clear reason."""
    if DATA_DIR is None:
        pytest.skip("offline data directory ../shared/data not found (set QUADLLM_DATA_DIR)")
    path = DATA_DIR / rel
    if not path.is_file():
        pytest.skip(f"offline data file {path} not present")
    return path


# ----------------------------------------------------------------- tokenizers


class CharTokenizer:
    """Fake tokenizer: one token per character (ord), optional BOS, HF call signature."""

    def __init__(self, bos: int | None = None, model_max_length: int = 8) -> None:
        self.bos = bos
        self.model_max_length = model_max_length
        self.seen_max_lengths: list[int] = []

    def __call__(self, text: str, return_tensors: str | None = None) -> dict[str, torch.Tensor]:
        assert return_tensors == "pt"
        self.seen_max_lengths.append(self.model_max_length)
        ids = ([self.bos] if self.bos is not None else []) + [ord(c) for c in text]
        return {"input_ids": torch.tensor([ids], dtype=torch.long)}


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A tiny word-level Hugging Face fast tokenizer built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the quick brown fox jumps over lazy dog a b c d e f g h".split()
    vocab = {"[UNK]": 0, "[BOS]": 1}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]", model_max_length=16
    )


# ----------------------------------------------------------------- pydoc default


def test_pydoc_default_calib_eval_disjoint(caplog):
    with caplog.at_level(logging.INFO, logger="quadllm.data"):
        calib = load_text(None, "calib")
        ev = load_text(None, "eval")
    assert isinstance(calib, TextSource) and isinstance(ev, TextSource)
    assert calib.name == ev.name == "pydoc"
    assert "pydoc_data.topics" in calib.origin and "calibration" in calib.origin
    assert "evaluation" in ev.origin
    assert len(calib.text) > 100_000 and len(ev.text) > 20_000
    assert any("pydoc_data.topics" in r.getMessage() for r in caplog.records)

    from pydoc_data.topics import topics

    keys = sorted(topics)
    eval_keys = keys[::5]
    calib_keys = [k for i, k in enumerate(keys) if i % 5]
    assert set(eval_keys).isdisjoint(calib_keys)
    assert set(eval_keys) | set(calib_keys) == set(keys)
    assert ev.text == "\n\n".join(topics[k] for k in eval_keys)
    # the topics repeat some paragraphs verbatim (e.g. "else" is part of "compound"):
    # the calibration part drops those, so the two parts share no paragraph
    calib_pars = {p.strip() for p in calib.text.split("\n\n")}
    eval_pars = {p.strip() for p in ev.text.split("\n\n") if p.strip()}
    assert not calib_pars & eval_pars
    full_calib = {p.strip() for k in calib_keys for p in topics[k].split("\n\n") if p.strip()}
    assert calib_pars == full_calib - eval_pars
    assert load_text("pydoc", "eval") == ev
    assert load_text("PyDoc", "calib") == calib


def test_pysource_is_stdlib_code_split_by_module():
    import importlib.util

    calib, ev = load_text("pysource", "calib"), load_text("PySource", "eval")
    assert calib.name == ev.name == "pysource"
    assert "calibration part" in calib.origin and "evaluation part" in ev.origin
    names = sorted(data.PYSOURCE_MODULES)
    files = {n: Path(importlib.util.find_spec(n).origin).read_text(encoding="utf-8") for n in names}
    eval_names = names[::5]
    assert ev.text == "\n\n".join(files[n] for n in eval_names)
    assert calib.text == "\n\n".join(files[n] for i, n in enumerate(names) if i % 5)
    assert "def " in calib.text and len(calib.text) > 500_000  # enough for 128 x 2048 tokens of calibration
    for n in names:
        assert (n in eval_names) == (n in ev.origin.split("(")[1].split(")")[0].split(", "))


def test_pysource_without_the_standard_library_source(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # a frozen or .pyc-only Python
    with pytest.raises(DataError, match="source files of Python's standard library.*pass a .txt/.jsonl"):
        load_text("pysource", "calib")


def test_bad_split():
    with pytest.raises(DataError, match="split"):
        load_text(None, "train")


# ----------------------------------------------------------------- wikitext2 / ptb


def test_wikitext2_eval_convention():
    path = _need("wikitext2/wiki.test.raw")
    assert sha256_file(path) == WIKI_TEST_SHA256
    src = load_text("wikitext2", "eval", data_dir=DATA_DIR, allow_download=False)
    assert src.name == "wikitext2" and str(path) in src.origin

    # independent reconstruction of the Hugging Face rows from the raw bytes
    raw = path.read_bytes().decode("utf-8")
    lines = raw.split("\n")
    assert lines[-1] == ""  # file ends with a newline
    rows = [ln + "\n" for ln in lines[:-1]]
    rows = [r if r.strip() else "" for r in rows]
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n" and rows[2] == ""
    assert src.text == "\n\n".join(rows)
    assert src.text.startswith("\n\n = Robert Boulter = \n\n\n\n\n")


def test_wikitext2_calib_is_valid_split():
    path = _need("wikitext2/wiki.valid.tokens")
    assert sha256_file(path) == WIKI_VALID_SHA256
    src = load_text("wikitext2", "calib", data_dir=DATA_DIR, allow_download=False)
    assert src.text == path.read_text(encoding="utf-8")
    assert "Robert Boulter" not in src.text  # not the test split
    assert str(path) in src.origin


def test_wikitext2_default_data_dir_env(monkeypatch):
    _need("wikitext2/wiki.test.raw")
    monkeypatch.setenv("QUADLLM_DATA_DIR", str(DATA_DIR))
    assert default_data_dir() == DATA_DIR
    src = load_text("wikitext2", "eval", allow_download=False)
    assert src.text.startswith("\n\n = Robert Boulter = \n")


def test_default_data_dir_env_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("QUADLLM_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("QUADLLM_DATA_DIR", "")
    result = default_data_dir()
    assert result is None or result.is_dir()


def test_ptb_eval_convention():
    path = _need("ptb/ptb.test.txt")
    assert sha256_file(path) == PTB_TEST_SHA256
    src = load_text("ptb", "eval", data_dir=DATA_DIR, allow_download=False)
    sentences = [ln.strip() for ln in path.read_text(encoding="utf-8").split("\n")[:-1]]
    assert len(sentences) == 3761
    assert src.text == " ".join(sentences)
    assert src.text.startswith("no it was n't black monday but while")


def test_ptb_calib_offline_refused(tmp_path):
    with pytest.raises(DataError, match="no offline copy of the PTB train split"):
        load_text("ptb", "calib", data_dir=tmp_path, allow_download=False)


def test_missing_wikitext_file_names_path(tmp_path):
    with pytest.raises(DataError) as ei:
        load_text("wikitext2", "eval", data_dir=tmp_path, allow_download=False)
    msg = str(ei.value)
    assert str(tmp_path / "wikitext2" / "wiki.test.raw") in msg
    assert "QUADLLM_DATA_DIR" in msg and "--data-dir" in msg
    with pytest.raises(DataError) as ei:
        load_text("wikitext2", "calib", data_dir=tmp_path, allow_download=False)
    assert str(tmp_path / "wikitext2" / "wiki.valid.tokens") in str(ei.value)


def test_missing_wikitext_without_datasets_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError) as ei:
        load_text("wikitext2", "eval", data_dir=tmp_path, allow_download=True)
    msg = str(ei.value)
    assert str(tmp_path / "wikitext2" / "wiki.test.raw") in msg
    assert "`datasets`" in msg


def _fake_datasets(monkeypatch, table, calls, fail=False):
    mod = types.ModuleType("datasets")

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        if fail:
            raise ConnectionError("offline")
        return {"text": table[split]} if path == "wikitext" else {"sentence": table[split]}

    mod.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", mod)


def test_wikitext_download_fallback(tmp_path, monkeypatch):
    calls: list = []
    table = {"train": ["", " = A = \n", "", " x y \n"], "test": ["", " = T = \n"]}
    _fake_datasets(monkeypatch, table, calls)
    ev = load_text("wikitext2", "eval", data_dir=tmp_path)
    calib = load_text("wikitext2", "calib", data_dir=tmp_path)
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test"),
                     ("wikitext", "wikitext-2-raw-v1", "train")]
    assert ev.text == "\n\n = T = \n" and calib.text == "\n\n".join(table["train"])
    assert "Hugging Face" in ev.origin


def test_ptb_download_fallback_and_failure(tmp_path, monkeypatch):
    calls: list = []
    table = {"train": ["a b", "c"], "test": ["x y", "z"]}
    _fake_datasets(monkeypatch, table, calls)
    assert load_text("ptb", "eval", data_dir=tmp_path).text == "x y z"
    assert load_text("ptb", "calib", data_dir=tmp_path).text == "a b c"
    assert calls[-1] == ("ptb_text_only", "penn_treebank", "train")

    _fake_datasets(monkeypatch, table, calls, fail=True)
    with pytest.raises(DataError) as ei:
        load_text("wikitext2", "eval", data_dir=tmp_path)
    assert "failed" in str(ei.value)
    assert str(tmp_path / "wikitext2" / "wiki.test.raw") in str(ei.value)


# ----------------------------------------------------------------- files


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_txt_file(tmp_path, caplog):
    p = tmp_path / "corpus.txt"
    p.write_text("hello\nworld\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="quadllm.data"):
        src = load_text(str(p), "calib")
    assert src.text == "hello\nworld\n" and src.name == "corpus.txt" and src.origin == str(p)
    assert any(r.levelno == logging.WARNING and "calib" in r.getMessage() for r in caplog.records)
    assert load_text(str(p), "eval").text == src.text


def test_jsonl_text_gsm8k_alpaca(tmp_path):
    p = _write_jsonl(tmp_path / "t.jsonl", [{"text": "one"}, {"text": "two", "meta": 1}])
    assert load_text(str(p), "calib").text == "one\n\ntwo"

    p = _write_jsonl(tmp_path / "g.jsonl", [
        {"question": "What is 2+2?", "answer": "It is 4.\n#### 4"},
        {"question": "Q2", "answer": "A2"},
    ])
    assert load_text(str(p), "calib").text == "What is 2+2?\nIt is 4.\n#### 4\n\nQ2\nA2"

    p = _write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add.", "input": "1 and 2", "output": "3"},
        {"instruction": "Greet.", "input": "", "output": "Hi"},
    ])
    assert load_text(str(p), "calib").text == "Add.\n1 and 2\n3\n\nGreet.\nHi"


def test_real_gsm8k_train_jsonl():
    path = _need("gsm8k/train.jsonl")
    src = load_text(str(path), "calib")
    first = json.loads(path.read_text(encoding="utf-8").split("\n", 1)[0])
    assert src.text.startswith(first["question"] + "\n" + first["answer"] + "\n\n")
    assert src.text.count("####") == 7473


def test_jsonl_unknown_fields(tmp_path):
    p = _write_jsonl(tmp_path / "u.jsonl", [{"text": "ok"}, {"foo": 1, "bar": 2}])
    with pytest.raises(DataError) as ei:
        load_text(str(p), "calib")
    msg = str(ei.value)
    assert "line 2" in msg and "'bar'" in msg and "'foo'" in msg


def test_jsonl_malformed_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_text(str(p), "eval")
    assert "line 4" in str(ei.value) and str(p) in str(ei.value)


def test_directory_spec(tmp_path):
    with pytest.raises(DataError, match="is a directory; pass a .txt or .jsonl file"):
        load_text(str(tmp_path), "calib")


def test_unknown_name_or_missing_path(tmp_path):
    with pytest.raises(DataError) as ei:
        load_text("c4-nonexistent", "calib")
    msg = str(ei.value)
    for name in ("pydoc", "wikitext2", "ptb", ".txt", ".jsonl"):
        assert name in msg
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError) as ei:
        load_text(str(missing), "calib")
    assert str(missing) in str(ei.value)


def test_any_other_file_is_utf8_text_whatever_its_suffix(tmp_path):
    for name in ("x.csv", "wiki.valid.tokens", "wiki.test.raw", "notes"):
        p = tmp_path / name
        p.write_text(" = Title = \n caf\u00e9 text\n", encoding="utf-8")
        assert load_text(str(p), "calib").text == " = Title = \n caf\u00e9 text\n"
    bad = tmp_path / "latin1.tokens"
    bad.write_bytes("ok text, then caf".encode() + b"\xe9 and more")
    with pytest.raises(DataError, match=r"not valid UTF-8 text: byte 0xe9 at offset 17"):
        load_text(str(bad), "calib")


def test_empty_file(tmp_path):
    e = tmp_path / "empty.txt"
    e.write_text("  \n", encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        load_text(str(e), "calib")


def test_sha256_file(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"abc")
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    with pytest.raises(DataError, match="not found"):
        sha256_file(tmp_path / "missing")


# ----------------------------------------------------------------- tokenizing


def test_tokenize_windows_shapes_and_tail():
    tok = CharTokenizer(bos=1, model_max_length=8)
    text = "abcdefghij" * 3  # 30 chars + BOS = 31 tokens
    w = tokenize_windows(tok, text, seqlen=10)
    assert w.dtype == torch.long and w.shape == (3, 10)  # tail of 1 dropped
    flat = [1] + [ord(c) for c in text]
    assert w.flatten().tolist() == flat[:30]
    assert tokenize_windows(tok, text, seqlen=10, max_windows=2).tolist() == w[:2].tolist()
    assert tokenize_windows(tok, text, seqlen=10, max_windows=99).shape == (3, 10)
    assert tokenize_windows(tok, text, seqlen=31).shape == (1, 31)
    # tokenized once, with the length limit lifted, and the limit restored afterwards
    assert all(m > 10**9 for m in tok.seen_max_lengths)
    assert tok.model_max_length == 8


def test_tokenize_windows_too_short():
    tok = CharTokenizer()
    with pytest.raises(DataError, match="only 5 tokens"):
        tokenize_windows(tok, "abcde", seqlen=6)
    with pytest.raises(DataError, match="seqlen"):
        tokenize_windows(tok, "abcde", seqlen=0)


def test_tokenize_windows_hf_no_length_warning(hf_tokenizer):
    text = " ".join(["the quick brown fox jumps over the lazy dog"] * 20)  # 180 words
    records: list[logging.LogRecord] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Grab(level=logging.WARNING)
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    try:
        w = tokenize_windows(hf_tokenizer, text, seqlen=16)
    finally:
        tf_logger.removeHandler(handler)
    assert w.shape == (180 // 16, 16)
    assert not [r for r in records if "sequence length" in r.getMessage()]
    assert hf_tokenizer.model_max_length == 16
    expected = hf_tokenizer(text)["input_ids"]
    assert w.flatten().tolist() == expected[: w.numel()]


def test_sample_calibration_deterministic():
    tok = CharTokenizer()
    text = "".join(chr(0x100 + i) for i in range(500))  # token i+256 at position i
    a = sample_calibration(tok, text, n_samples=8, seqlen=32, seed=0)
    b = sample_calibration(tok, text, n_samples=8, seqlen=32, seed=0)
    c = sample_calibration(tok, text, n_samples=8, seqlen=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # each row is a contiguous window starting in [0, n - seqlen - 1]
    for row in a:
        start = int(row[0]) - 0x100
        assert 0 <= start <= 500 - 32 - 1
        assert row.tolist() == list(range(0x100 + start, 0x100 + start + 32))
    # the GPTQ convention: starts are randint(0, n - seqlen) with the seeded generator
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, 500 - 32, (8,), generator=g)
    assert (a[:, 0] - 0x100).tolist() == starts.tolist()


def test_sample_calibration_minimal_and_too_short():
    tok = CharTokenizer()
    s = sample_calibration(tok, "abcdef", n_samples=3, seqlen=5, seed=3)  # 6 tokens: start 0
    assert s.tolist() == [[ord(c) for c in "abcde"]] * 3
    with pytest.raises(DataError) as ei:
        sample_calibration(tok, "abcde", n_samples=1, seqlen=5, seed=0)
    msg = str(ei.value)
    assert "only 5 tokens" in msg and "reduce seqlen" in msg and "at most 4" in msg
    with pytest.raises(DataError, match="n_samples"):
        sample_calibration(tok, "abcdef", n_samples=0, seqlen=5, seed=0)


def test_sample_calibration_hf_on_pydoc(hf_tokenizer):
    text = load_text(None, "calib").text
    s = sample_calibration(hf_tokenizer, text, n_samples=4, seqlen=64, seed=42)
    assert s.shape == (4, 64)
    assert torch.equal(s, sample_calibration(hf_tokenizer, text, 4, 64, 42))


def test_module_exports():
    for name in data.__all__:
        assert hasattr(data, name)


def test_default_uses_the_papers_data_when_the_hub_is_usable(monkeypatch):
    import quadllm.data.text as qd

    monkeypatch.setattr(qd, "hub_reachable", lambda timeout=2.0: True)
    calls: list = []
    table = {"train": ["", " = A = \n"], "test": ["", " = T = \n"]}
    _fake_datasets(monkeypatch, table, calls)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert load_text(None, "eval").text == "\n\n = T = \n"
    assert load_text(None, "calib").text == "\n\n = A = \n"
    assert calls == [("wikitext", "wikitext-2-raw-v1", "test"), ("wikitext", "wikitext-2-raw-v1", "train")]


def test_default_falls_back_to_embedded_text(monkeypatch):
    import quadllm.data.text as qd

    monkeypatch.setattr(qd, "hub_reachable", lambda timeout=2.0: True)
    calls: list = []
    _fake_datasets(monkeypatch, {}, calls, fail=True)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    src = load_text(None, "eval")
    assert src.name == "pydoc" and len(calls) == 1
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_text(None, "calib").name == "pydoc" and len(calls) == 1  # offline: not even tried


def test_unreachable_hub_falls_back_without_trying(monkeypatch):
    calls: list = []
    _fake_datasets(monkeypatch, {}, calls)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    assert load_text(None, "eval").name == "pydoc" and calls == []


def test_a_jsonl_file_that_is_not_utf8_names_the_offset(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="byte 0xe9 at offset 30"):
        load_text(str(p), "calib")


def test_training_data_reads_any_text_file(tmp_path):
    from conftest import tiny_tokenizer

    from quadllm.data.training import load_training_set

    p = tmp_path / "wiki.valid.tokens"
    p.write_text("some words of plain text. " * 20, encoding="utf-8")
    tset = load_training_set(str(p), tiny_tokenizer(), max_seqlen=32)
    assert tset.examples and tset.origin == str(p)


# ---------------------------------------------------------------------- mixtures


def test_mixture_specs_parse_with_equal_or_given_weights():
    from quadllm.data.text import parse_mixture

    assert parse_mixture("wikitext2+pysource") == [("wikitext2", 0.5), ("pysource", 0.5)]
    assert parse_mixture("wikitext2*3+pysource") == [("wikitext2", 0.75), ("pysource", 0.25)]
    for bad in ("wikitext2*x+pysource", "+pysource", "wikitext2*0+pysource", "a*-1+b"):
        with pytest.raises(DataError, match="mixture"):
            parse_mixture(bad)


@pytest.mark.parametrize("n,shares,counts", [(8, (0.5, 0.5), [4, 4]), (7, (0.5, 0.5), [4, 3]),
                                             (10, (0.75, 0.25), [8, 2]), (3, (1 / 3, 1 / 3, 1 / 3), [1, 1, 1]),
                                             (1, (0.25, 0.75), [0, 1])])
def test_mixture_counts_deal_every_window(n, shares, counts):
    from quadllm.data.text import mixture_counts

    assert mixture_counts(n, shares) == counts and sum(counts) == n


def test_a_mixture_draws_each_parts_share_of_windows_from_that_part_alone(tmp_path):
    from quadllm.config import QuantConfig
    from quadllm.data.samples import calibration_samples
    from quadllm.data.text import load_text

    from conftest import tiny_tokenizer

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(" ".join(["alpha"] * 3000))
    b.write_text(" ".join(["omega"] * 3000))
    tok = tiny_tokenizer()
    src = load_text(f"{a}*3+{b}", "calib")
    assert len(src.parts) == 2 and src.shares == (0.75, 0.25) and "mixture of 75%" in src.origin
    config = QuantConfig(calib=f"{a}*3+{b}", calib_samples=8, calib_seqlen=16, seed=4)
    samples = calibration_samples(tok, config)
    ids = {name: set(tok(" ".join([name] * 20))["input_ids"]) for name in ("alpha", "omega")}
    kinds = ["alpha" if set(row.tolist()) <= ids["alpha"] else "omega" if set(row.tolist()) <= ids["omega"] else "?"
             for row in samples]
    assert sorted(kinds) == ["alpha"] * 6 + ["omega"] * 2 and config.extra["calib_counts"] == [6, 2]
    assert torch.equal(samples, calibration_samples(tok, QuantConfig(calib=f"{a}*3+{b}", calib_samples=8,
                                                                     calib_seqlen=16, seed=4)))
    with pytest.raises(DataError, match="a mixture is a calibration set"):
        load_text(f"{a}+{b}", "eval")
