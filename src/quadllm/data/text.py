"""Text sources for calibration and perplexity evaluation.

This module turns a short *spec* (``None``, ``"pydoc"``, ``"pysource"``, ``"wikitext2"``,
``"ptb"`` or a path to a ``.txt`` / ``.jsonl`` file) into one plain string of text, and
turns text into token tensors the way the GPTQ / QuaRot / QUAD papers do:

* evaluation: tokenize the whole text once, cut it into non-overlapping windows of
  ``seqlen`` tokens and drop the tail (:func:`tokenize_windows`);
* calibration: tokenize once and draw ``n_samples`` random windows of ``seqlen``
  tokens with a seeded generator (:func:`sample_calibration`).

Offline copies of public data sets live in a *data directory* (see
:func:`default_data_dir`), laid out as ``wikitext2/wiki.test.raw``,
``wikitext2/wiki.valid.tokens`` and ``ptb/ptb.test.txt``.  Calibration never
uses a test split: offline, ``wiki.valid.tokens`` stands in for the WikiText-2
train split.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import logging
import math
import os
import platform
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import torch

from ..errors import QuadllmError
from ..io import files

logger = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "TextSource",
    "DATA_DIR_ENV",
    "SPLITS",
    "KNOWN_NAMES",
    "default_data_dir",
    "load_text",
    "sha256_file",
    "tokenize_windows",
    "sample_calibration",
]

#: Environment variable naming the offline data directory.
DATA_DIR_ENV = "QUADLLM_DATA_DIR"

#: Accepted values of the ``split`` argument of :func:`load_text`.
SPLITS = ("calib", "eval")

#: Accepted data set names of :func:`load_text` (besides file paths).
KNOWN_NAMES = ("pydoc", "pysource", "wikitext2", "ptb")
#: joins the parts of a calibration mixture: ``wikitext2+pysource``, ``wikitext2*3+code.jsonl``
MIXTURE_SEP = "+"

# Relative locations inside the data directory.
WIKITEXT2_CALIB_FILE = Path("wikitext2") / "wiki.valid.tokens"
WIKITEXT2_EVAL_FILE = Path("wikitext2") / "wiki.test.raw"
PTB_EVAL_FILE = Path("ptb") / "ptb.test.txt"

_PYDOC_EVAL_EVERY = 5  # sorted key index i with i % 5 == 0 -> eval part
#: Pure-Python standard-library modules whose source is the embedded *code* text (``"pysource"``):
#: long, stable modules of ordinary application code, present in every CPython since 3.8.
PYSOURCE_MODULES = (
    "argparse", "ast", "bisect", "calendar", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "difflib", "email.message", "enum", "fnmatch", "fractions", "functools", "gettext", "glob", "heapq",
    "http.client", "inspect", "ipaddress", "json.decoder", "json.encoder", "logging", "optparse", "pathlib",
    "pprint", "queue", "random", "shlex", "shutil", "statistics", "string", "subprocess", "tarfile",
    "tempfile", "textwrap", "tokenize", "typing", "urllib.parse", "zipfile",
)
_HUGE_MAX_LENGTH = int(1e30)


class DataError(QuadllmError, ValueError):
    """A data problem (missing file, malformed input, text too short, ...).

    The message always says what went wrong and what to pass instead.
    """


@dataclass(frozen=True)
class TextSource:
    """A loaded text and where it came from.

    Attributes:
        name: short name of the source (``"pydoc"``, ``"wikitext2"``, ``"ptb"`` or a
            file name).
        text: the full text.
        origin: human-readable description of where the text came from (file path,
            Hugging Face data set and split, or the embedded source).
    """
    name: str
    text: str
    origin: str
    #: a mixture (``"A+B"``): its sources and their shares of the calibration windows
    parts: tuple["TextSource", ...] = ()
    shares: tuple[float, ...] = ()

    def __repr__(self) -> str:  # keep reprs short: the text may be megabytes long
        return (
            f"TextSource(name={self.name!r}, origin={self.origin!r}, "
            f"text=<{len(self.text)} chars>)"
        )


# --------------------------------------------------------------------------- paths


def default_data_dir() -> Path | None:
    """Return the offline data directory, or ``None`` if there is none.

    Resolution order:

    1. the environment variable ``QUADLLM_DATA_DIR`` if set and non-empty (returned
       even if it does not exist, so that errors name the directory the user chose);
    2. ``<cwd>/../shared/data`` if it exists;
    3. ``<repo root>/../shared/data`` if it exists, where the repository root is
       found from this file's location (``src/quadllm/data/text.py`` -> ``parents[3]``).
    """
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            logger.warning("%s=%s is not an existing directory", DATA_DIR_ENV, path)
        return path
    candidates = [Path.cwd() / ".." / "shared" / "data"]
    here = Path(__file__).resolve()
    if len(here.parents) > 3:
        candidates.append(here.parents[3] / ".." / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    return None


def sha256_file(path: str | Path) -> str:
    """The hex SHA-256 digest of a data file (:class:`DataError` when it cannot be read)."""
    path = Path(path)
    try:
        return files.sha256_file(path)
    except FileNotFoundError as exc:
        raise DataError(f"cannot checksum {path}: file not found") from exc
    except IsADirectoryError as exc:
        raise DataError(f"cannot checksum {path}: it is a directory, pass a file") from exc


# ------------------------------------------------------------------------ loading


def _accepted_forms() -> str:
    return (
        "accepted: None or 'pydoc' (embedded offline text from Python's pydoc_data), "
        "'pysource' (embedded offline code: the source of Python standard-library modules), "
        "'wikitext2', 'ptb' (offline copies in the data directory, given by --data-dir "
        f"or ${DATA_DIR_ENV}, or downloaded with the `datasets` library), "
        "or a path to an existing .jsonl file (one JSON object a line with 'text', or "
        "'question'+'answer' (GSM8K), or 'instruction'[+'input']+'output' (Alpaca)) or to "
        "any other file, read as UTF-8 text as it is (.txt, wiki.test.raw, wiki.valid.tokens, ...)"
    )


def _not_utf8(path: Path, exc: UnicodeDecodeError, offset: int = 0) -> DataError:
    """The error for a file that is not UTF-8: where, and which byte (``offset``: of the chunk)."""
    at = offset + exc.start
    return DataError(f"{path} is not valid UTF-8 text: byte 0x{exc.object[exc.start]:02x} at offset {at} "
                     f"({exc.reason}); pass a text file in UTF-8")


def _read_utf8(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc


def _read_lines(path: Path) -> list[str]:
    """The file's lines, each keeping its newline, split exactly as iterating an open
    text file does (only on ``\\n`` / ``\\r\\n`` / ``\\r``, like the Hugging Face
    loading scripts, unlike :meth:`str.splitlines`)."""
    return list(io.StringIO(_read_utf8(path), newline=None))


def _load_pydoc(split: str) -> TextSource:
    try:
        from pydoc_data.topics import topics  # ships with CPython
    except ImportError as exc:  # pragma: no cover - stripped-down Python builds only
        raise DataError(
            "the embedded default text needs Python's bundled module pydoc_data.topics, "
            "which this Python lacks; pass 'wikitext2' or a .txt/.jsonl file instead"
        ) from exc
    keys = sorted(topics)
    eval_keys = [k for i, k in enumerate(keys) if i % _PYDOC_EVAL_EVERY == 0]
    if split == "eval":
        chosen = eval_keys
        text = "\n\n".join(topics[k] for k in chosen)
    else:
        # Some topics repeat paragraphs of others word for word; drop from the calibration
        # part every paragraph that also occurs in the evaluation part, so the two share no text.
        held_out = {p.strip() for k in eval_keys for p in topics[k].split("\n\n") if p.strip()}
        chosen = [k for i, k in enumerate(keys) if i % _PYDOC_EVAL_EVERY != 0]
        paragraphs = [p for k in chosen for p in topics[k].split("\n\n") if p.strip() and p.strip() not in held_out]
        text = "\n\n".join(paragraphs)
    part = "evaluation" if split == "eval" else "calibration"
    origin = (
        f"pydoc_data.topics (Python's bundled documentation), {part} part "
        f"(CPython {platform.python_version()})"
    )
    logger.info(
        "using embedded text: %s (%d of %d topics, %d chars)",
        origin, len(chosen), len(keys), len(text),
    )
    return TextSource(name="pydoc", text=text, origin=origin)


def _load_pysource(split: str) -> TextSource:
    """Python source code of :data:`PYSOURCE_MODULES`, read from their files (``find_spec`` imports only
    their parent packages), split by module as ``"pydoc"`` is split by topic: every 5th module
    (sorted) is the eval part."""

    found = []
    for name in sorted(PYSOURCE_MODULES):
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py") and Path(origin).is_file():
            found.append((name, Path(origin)))
    if len(found) < _PYDOC_EVAL_EVERY:
        raise DataError(
            f"the embedded code text needs the source files of Python's standard library, and this "
            f"Python has only {len(found)} of {len(PYSOURCE_MODULES)}; pass a .txt/.jsonl file of code instead")
    chosen = [(n, f) for i, (n, f) in enumerate(found) if (i % _PYDOC_EVAL_EVERY == 0) == (split == "eval")]
    text = "\n\n".join(_read_utf8(f) for _, f in chosen)
    part = "evaluation" if split == "eval" else "calibration"
    origin = (f"Python standard-library source ({', '.join(n for n, _ in chosen)}), {part} part "
              f"(CPython {platform.python_version()})")
    logger.info("using embedded code text: %d of %d modules, %d chars", len(chosen), len(found), len(text))
    return TextSource(name="pysource", text=text, origin=origin)


def _resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    return default_data_dir()


def _missing_local_message(name: str, split: str, expected: Path | None, rel: Path,
                           why: str) -> str:
    where = (
        f"the local file {expected} does not exist"
        if expected is not None
        else f"no data directory was found (looked for ${DATA_DIR_ENV}, "
        f"<cwd>/../shared/data and <repo>/../shared/data)"
    )
    return (
        f"cannot load {name!r} split {split!r}: {where}, and {why}. "
        f"Provide the file as <data dir>/{rel.as_posix()} and pass the directory with "
        f"--data-dir / data_dir=... or ${DATA_DIR_ENV}, or pass a .txt/.jsonl file instead."
    )


def hub_usable() -> bool:
    """Whether the default may try the Hugging Face hub: `datasets` installed and not offline."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or \
            os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        have = importlib.util.find_spec("datasets") is not None
    except ValueError:  # a module object without a spec (already imported, or a stand-in)
        have = sys.modules.get("datasets") is not None
    return have and hub_reachable()


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP check of the hub endpoint, so an offline machine falls back at once instead
    of waiting for the download library's retries (checked once per endpoint and process)."""
    return _endpoint_reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"), timeout)


@functools.lru_cache(maxsize=8)
def _endpoint_reachable(endpoint: str, timeout: float) -> bool:
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        logger.info("the Hugging Face hub (%s) is not reachable; using offline data", endpoint)
        return False


def _hf_load(name: str, hf_args: tuple[str, str], hf_split: str, field: str, sep: str,
             fail: Callable[[str], str]) -> TextSource:
    """Fetch a Hugging Face data set split and join its ``field`` with ``sep``.

    ``fail(why)`` builds the :class:`DataError` message when ``datasets`` is missing
    or the download fails.
    """
    try:
        from datasets import load_dataset  # optional dependency, imported lazily
    except ImportError as exc:
        raise DataError(
            fail("the `datasets` library (needed to download it) is not installed")
        ) from exc
    hf_desc = f"Hugging Face datasets {hf_args[0]}/{hf_args[1]} split={hf_split!r}"
    logger.info("%s: no local copy, downloading %s", name, hf_desc)
    try:
        ds = load_dataset(*hf_args, split=hf_split)
        rows = list(ds[field])
    except Exception as exc:  # network, hub or cache errors come in many types
        raise DataError(fail(f"downloading {hf_desc} failed ({exc!r})")) from exc
    text = sep.join(rows)
    logger.info("using %s (%d rows, %d chars)", hf_desc, len(rows), len(text))
    return TextSource(name=name, text=text, origin=hf_desc)


def _wikitext2_eval_text(path: Path) -> str:
    """The papers' WikiText-2 test text from ``wiki.test.raw``.

    Rows are the file's lines, each keeping its trailing newline; whitespace-only
    lines become ``''`` (as in Hugging Face ``wikitext-2-raw-v1``); rows are joined
    with ``"\\n\\n"``.
    """
    rows = ["" if not line.strip() else line for line in _read_lines(path)]
    return "\n\n".join(rows)


def _ptb_text(path: Path) -> str:
    """PTB text as GPTQ/QuaRot build it: stripped lines joined with a space."""
    return " ".join(line.strip() for line in _read_lines(path))


def _load_wikitext2(split: str, data_dir: Path | None, allow_download: bool) -> TextSource:
    rel = WIKITEXT2_EVAL_FILE if split == "eval" else WIKITEXT2_CALIB_FILE
    local = data_dir / rel if data_dir is not None else None
    if local is not None and local.is_file():
        if split == "eval":
            text = _wikitext2_eval_text(local)
            origin = f"{local} (rows joined with '\\n\\n', blank lines as '')"
        else:
            text = _read_utf8(local)
            origin = f"{local} (validation split standing in for train)"
        logger.info("using wikitext2 %s text from %s (%d chars)", split, local, len(text))
        return TextSource(name="wikitext2", text=text, origin=origin)
    if not allow_download:
        raise DataError(
            _missing_local_message("wikitext2", split, local, rel, "downloading is disabled")
        )
    hf_split = "test" if split == "eval" else "train"
    return _hf_load(
        "wikitext2", ("wikitext", "wikitext-2-raw-v1"), hf_split, "text", "\n\n",
        lambda why: _missing_local_message("wikitext2", split, local, rel, why),
    )


def _load_ptb(split: str, data_dir: Path | None, allow_download: bool) -> TextSource:
    if split == "eval":
        local = data_dir / PTB_EVAL_FILE if data_dir is not None else None
        if local is not None and local.is_file():
            text = _ptb_text(local)
            logger.info("using ptb eval text from %s (%d chars)", local, len(text))
            return TextSource(name="ptb", text=text,
                              origin=f"{local} (stripped lines joined with ' ')")
        if not allow_download:
            raise DataError(
                _missing_local_message("ptb", split, local, PTB_EVAL_FILE,
                                       "downloading is disabled")
            )
        return _hf_load(
            "ptb", ("ptb_text_only", "penn_treebank"), "test", "sentence", " ",
            lambda why: _missing_local_message("ptb", split, local, PTB_EVAL_FILE, why),
        )
    # calib: there is no offline PTB train copy, and the test split must never be used.
    no_copy = (
        "there is no offline copy of the PTB train split (calibration never uses the "
        "test split ptb/ptb.test.txt)"
    )

    def fail(why: str) -> str:
        return (
            f"cannot load 'ptb' for calibration: {no_copy}, and {why}; "
            "calibrate on 'wikitext2' or 'pydoc', or pass a .txt/.jsonl file"
        )

    if not allow_download:
        raise DataError(fail("downloading is disabled"))
    return _hf_load("ptb", ("ptb_text_only", "penn_treebank"), "train", "sentence", " ", fail)


def _jsonl_document(obj: Any, path: Path, lineno: int) -> str:
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}, line {lineno}: expected a JSON object, got {type(obj).__name__}"
        )

    def field(key: str) -> str:
        value = obj[key]
        if not isinstance(value, str):
            raise DataError(
                f"{path}, line {lineno}: field {key!r} must be a string, "
                f"got {type(value).__name__}"
            )
        return value

    if "text" in obj:
        return field("text")
    if "question" in obj and "answer" in obj:
        return field("question") + "\n" + field("answer")
    if "instruction" in obj:
        parts = [field("instruction")]
        for key in ("input", "output"):
            if key in obj and field(key).strip():
                parts.append(field(key))
        return "\n".join(parts)
    raise DataError(
        f"{path}, line {lineno}: no usable text field; found fields {sorted(obj)}; "
        "expected 'text', or 'question'+'answer' (GSM8K), "
        "or 'instruction'[+'input']+'output' (Alpaca)"
    )


def _load_jsonl(path: Path) -> str:
    docs: list[str] = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}, line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
            ) from exc
        docs.append(_jsonl_document(obj, path, lineno))
    return "\n\n".join(docs)


def _load_file(path: Path, split: str) -> TextSource:
    """A ``.jsonl`` file's records, or any other file as UTF-8 text (the suffix does not matter:
    ``wiki.valid.tokens`` and ``wiki.test.raw`` are plain text)."""
    if path.suffix.lower() == ".jsonl":
        text = _load_jsonl(path)
        kind = "JSON lines file"
    else:
        text = _read_utf8(path)
        kind = "text file"
    if not text.strip():
        raise DataError(f"{path} contains no text; pass a non-empty text or .jsonl file")
    logger.warning(
        "using the whole %s %s as the %r text (a file has no splits: make sure it is "
        "not a test set if you calibrate on it)", kind, path, split,
    )
    return TextSource(name=path.name, text=text, origin=str(path))


def load_text(
    spec: str | None,
    split: str,
    data_dir: str | Path | None = None,
    allow_download: bool = True,
) -> TextSource:
    """Load the calibration or evaluation text named by ``spec``.

    Args:
        spec: what to load:

            * ``None``: with the ``datasets`` library installed and no ``HF_HUB_OFFLINE``,
              the papers' default (WikiText-2 train for calibration, test for
              evaluation, from the hub); otherwise, or when that fails, ``"pydoc"``.
            * ``"pydoc"``: the embedded offline text, Python's
              ``pydoc_data.topics.topics`` (values in sorted key order, joined with
              ``"\\n\\n"``), split by key: every 5th key (sorted index ``i % 5 == 0``)
              is the ``"eval"`` part, the other keys the ``"calib"`` part; paragraphs
              that recur verbatim in the eval part (some topics repeat others, e.g.
              ``"else"`` inside ``"compound"``) are dropped from the calib part, so the
              two share no text. The text differs between CPython versions (the
              version is recorded in ``origin``).
            * ``"pysource"``: embedded offline *code*, the source files of
              :data:`PYSOURCE_MODULES` (Python's standard library) in sorted module order
              joined with ``"\\n\\n"``, split by module as ``"pydoc"`` by key (every 5th is
              the ``"eval"`` part). For code models: calibrate on the domain served. The
              text differs between CPython versions (recorded in ``origin``).
            * ``"wikitext2"``: calib = ``<data_dir>/wikitext2/wiki.valid.tokens`` as is
              (standing in for the train split); eval =
              ``<data_dir>/wikitext2/wiki.test.raw`` with the papers' convention
              (lines keep their ``"\\n"``, whitespace-only lines become ``''``, rows
              joined with ``"\\n\\n"``).  Without the local file, and if
              ``allow_download``, Hugging Face ``wikitext-2-raw-v1`` (train / test).
            * ``"ptb"``: eval = ``<data_dir>/ptb/ptb.test.txt``, stripped lines joined
              with ``" "`` (GPTQ convention), else Hugging Face ``ptb_text_only``
              test; calib only by download (train split).
            * a path to a ``.txt`` file (used as is) or a ``.jsonl`` file (documents
              from ``text``, GSM8K ``question``/``answer`` or Alpaca
              ``instruction``/``input``/``output``, joined with ``"\\n\\n"``).
        split: ``"calib"`` or ``"eval"``.
        data_dir: the offline data directory; defaults to :func:`default_data_dir`.
        allow_download: whether named data sets missing locally may be fetched with
            the ``datasets`` library.

    Returns:
        The text and where it came from.

    Raises:
        DataError: unknown spec, missing or malformed file, failed download, etc.
    """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if spec is None:
        if allow_download and hub_usable():
            try:
                return _hf_load("wikitext2", ("wikitext", "wikitext-2-raw-v1"),
                                "train" if split == "calib" else "test", "text", "\n\n", lambda why: why)
            except DataError as exc:
                logger.warning("the papers' default (WikiText-2 from the hub) is unavailable (%s); "
                               "falling back to the embedded text", exc)
        return _load_pydoc(split)
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"invalid data spec {spec!r}; {_accepted_forms()}")
    if MIXTURE_SEP in spec and not Path(spec).expanduser().exists():
        return _load_mixture(spec, split, data_dir, allow_download)
    name = spec.strip().lower()
    if name == "pydoc":
        return _load_pydoc(split)
    if name == "pysource":
        return _load_pysource(split)
    if name == "wikitext2":
        return _load_wikitext2(split, _resolve_data_dir(data_dir), allow_download)
    if name == "ptb":
        return _load_ptb(split, _resolve_data_dir(data_dir), allow_download)
    path = Path(spec).expanduser()
    if path.is_dir():
        raise DataError(
            f"{path} is a directory; pass a .txt or .jsonl file inside it instead "
            f"(to point at the offline data directory use --data-dir / ${DATA_DIR_ENV} "
            "together with a name such as 'wikitext2')"
        )
    if not path.exists():
        raise DataError(
            f"unknown data set name or nonexistent file {spec!r} "
            f"(known names: {', '.join(KNOWN_NAMES)}); {_accepted_forms()}"
        )
    return _load_file(path, split)


def parse_mixture(spec: str) -> list[tuple[str, float]]:
    """``"A+B"`` (equal shares) or ``"A*3+B"`` (weights): the sources and their shares (summing to 1)."""
    parts = []
    for item in spec.split(MIXTURE_SEP):
        name, star, weight = item.strip().rpartition("*") if "*" in item else (item.strip(), "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise DataError(f"mixture {spec!r}: weight {weight!r} of {name!r} is not a number") from None
        if not name or not (w > 0 and math.isfinite(w)):
            raise DataError(f"mixture {spec!r}: each part is a data spec with an optional positive weight "
                            "(e.g. 'wikitext2*3+pysource')")
        parts.append((name.strip(), w))
    total = sum(w for _, w in parts)
    return [(name, w / total) for name, w in parts]


def _load_mixture(spec: str, split: str, data_dir: str | Path | None, allow_download: bool) -> TextSource:
    if split != "calib":
        raise DataError(f"{spec!r}: a mixture is a calibration set; evaluate on each source alone")
    parts = parse_mixture(spec)
    sources = tuple(load_text(name, split, data_dir, allow_download) for name, _ in parts)
    origin = " + ".join(f"{share:.0%} {src.origin}" for (_, share), src in zip(parts, sources))
    return TextSource(name=MIXTURE_SEP.join(src.name for src in sources), text="\n\n".join(src.text for src in sources),
                      origin=f"mixture of {origin}", parts=sources, shares=tuple(share for _, share in parts))


def mixture_counts(n: int, shares: tuple[float, ...]) -> list[int]:
    """``n`` windows dealt out by ``shares`` (largest remainder; ties to the earlier part)."""
    exact = [n * s for s in shares]
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


# --------------------------------------------------------------------- tokenizing


def tokenize_all(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize ``text`` once with the tokenizer's default special tokens -> 1-D ids.

    The "sequence longer than model_max_length" warning is suppressed by lifting the
    tokenizer's ``model_max_length`` for the duration of the call (we window the ids
    ourselves, so that limit does not apply).
    """
    has_max = hasattr(tokenizer, "model_max_length")
    old_max = getattr(tokenizer, "model_max_length", None)
    if has_max:
        try:
            tokenizer.model_max_length = _HUGE_MAX_LENGTH
        except (AttributeError, TypeError):  # read-only on exotic tokenizers
            has_max = False
    try:
        enc = tokenizer(text, return_tensors="pt")
    finally:
        if has_max:
            tokenizer.model_max_length = old_max
    ids = enc["input_ids"]
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise DataError(
                f"tokenizer returned a batch of {ids.shape[0]} sequences for one text"
            )
        ids = ids[0]
    elif ids.dim() != 1:
        raise DataError(f"tokenizer returned input_ids of shape {tuple(ids.shape)}")
    return ids


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}")


def tokenize_windows(
    tokenizer: Any,
    text: str,
    seqlen: int,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into non-overlapping windows.

    The whole text is tokenized with the tokenizer's default special tokens
    (``tokenizer(text, return_tensors="pt").input_ids``, so Llama-style tokenizers add
    one BOS at the start, as in the papers), cut into consecutive windows of
    ``seqlen`` tokens, and the tail shorter than a window is dropped.

    Args:
        tokenizer: a Hugging Face tokenizer (or any callable with that signature).
        text: the evaluation text.
        seqlen: tokens per window.
        max_windows: keep only the first ``max_windows`` windows if given.

    Returns:
        LongTensor of shape ``[n_windows, seqlen]``.

    Raises:
        DataError: if the text has fewer than ``seqlen`` tokens, or bad arguments.
    """
    _check_positive("seqlen", seqlen)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    ids = tokenize_all(tokenizer, text)
    n_tokens = int(ids.numel())
    n_windows = n_tokens // seqlen
    if n_windows == 0:
        raise DataError(
            f"the text has only {n_tokens} tokens, fewer than one window of seqlen={seqlen}; "
            "reduce seqlen or use a longer text"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seqlen].reshape(n_windows, seqlen).clone()
    logger.debug(
        "tokenized %d tokens into %d windows of %d (tail of %d dropped)",
        n_tokens, n_windows, seqlen, n_tokens - (n_tokens // seqlen) * seqlen,
    )
    return windows


def sample_calibration(
    tokenizer: Any,
    text: str,
    n_samples: int,
    seqlen: int,
    seed: int,
) -> torch.Tensor:
    """Draw random calibration windows, GPTQ style.

    Tokenizes ``text`` once, then for each sample draws a start ``i`` uniformly in
    ``[0, n_tokens - seqlen - 1]`` (inclusive; ``torch.Generator().manual_seed(seed)``)
    and takes ``ids[i : i + seqlen]``.  Windows may overlap.  Deterministic for a seed.

    Returns:
        LongTensor of shape ``[n_samples, seqlen]``.

    Raises:
        DataError: if the text has fewer than ``seqlen + 1`` tokens, or bad arguments.
    """
    _check_positive("n_samples", n_samples)
    _check_positive("seqlen", seqlen)
    ids = tokenize_all(tokenizer, text)
    n_tokens = int(ids.numel())
    if n_tokens < seqlen + 1:
        raise DataError(
            f"the calibration text has only {n_tokens} tokens but seqlen={seqlen} needs at "
            f"least {seqlen + 1}; reduce seqlen (to at most {max(n_tokens - 1, 0)}) "
            "or use a longer calibration text"
        )
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n_tokens - seqlen, (n_samples,), generator=gen)
    offsets = torch.arange(seqlen)
    samples = ids[starts[:, None] + offsets[None, :]]
    logger.debug(
        "sampled %d calibration windows of %d from %d tokens (seed %d)",
        n_samples, seqlen, n_tokens, seed,
    )
    return samples
