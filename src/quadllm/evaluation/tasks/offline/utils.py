"""Loaders for the offline copies of the zero-shot task data (``custom_dataset`` functions of the
task configurations next to this file).

Each loader reads the local copy under the data directory (see :func:`quadllm.data.default_data_dir`)
and returns the documents in the Hugging Face layout the harness's own task reads (same fields,
same order), so that the configurations can keep the harness's prompts, choices and targets.
The data directory arrives as ``data_dir`` in the task metadata (set by
:func:`quadllm.evaluation.tasks.run_tasks`); a missing file raises :class:`quadllm.data.DataError` naming it.
"""

from __future__ import annotations

import bz2
import json
import logging
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from quadllm.data.text import DATA_DIR_ENV, DataError, default_data_dir, sha256_file

log = logging.getLogger(__name__)

Doc = dict[str, Any]

#: Files of each task, relative to the data directory.
FILES: dict[str, tuple[str, ...]] = {
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
    "arc_easy": ("arc/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc/ARC-Challenge-Test.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "winogrande": ("winogrande/dev.jsonl", "winogrande/dev-labels.lst"),
    "lambada_openai": ("lambada/lambada_test.jsonl",),
    "openbookqa": ("openbookqa/test.jsonl",),
    "boolq": ("boolq/val.jsonl",),
}

#: SHA-256 of the copies described in the data directory's README (a mismatch only warns).
SHA256: dict[str, str] = {
    "piqa/valid.jsonl": "93503cc97c679e459b065c3d13e848282e44b2a25213985bed3e5d458abef72d",
    "piqa/valid-labels.lst": "b4192dc3a2a0363d9d60ccf79800cbbe2f32ebb17726efdde6970e0b8131bceb",
    "arc/ARC-Easy-Test.jsonl": "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
    "arc/ARC-Challenge-Test.jsonl": "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
    "hellaswag/hellaswag_val_full.txt.bz2": "50b637899e4263c2bc456c2dc726c95d2c8cd8e2a552ea5bd7719ce3cb03fe5b",
    "winogrande/dev.jsonl": "1aeac79cf46a3dcbe59a71ca7e5372a1490cde2b4ae2387dc56f00378104d2e8",
    "winogrande/dev-labels.lst": "5ae1e30f52a50b880515685dcfae7d57649cce256d375947cdd02f687de7e6ba",
    "lambada/lambada_test.jsonl": "4aa8d02cd17c719165fc8a7887fddd641f43fcafa4b1c806ca8abc31fabdb226",
    "openbookqa/test.jsonl": "feb2bd9bfa6161dca4c44ce90e51e8cdada83eb5061407fcdc5005e44aaf2313",
    "boolq/val.jsonl": "21acbfbd1e7908fddd9e626bc2a6101c5a5430bda3fbf74985b979af7a63b989",
}


# ------------------------------------------------------------------------ files


def task_file(task: str, rel: str, data_dir: str | Path | None) -> Path:
    """The local copy ``rel`` of ``task``'s data; :class:`DataError` naming it when missing."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if root is None:
        raise DataError(
            f"cannot load task {task!r} offline: no data directory was found (looked for "
            f"${DATA_DIR_ENV}, <cwd>/../shared/data and <repo>/../shared/data); provide the file as "
            f"<data dir>/{rel} and pass the directory with --data-dir / data_dir=... or ${DATA_DIR_ENV}, "
            "or run online to use the harness's own datasets")
    path = root / rel
    if not path.is_file():
        raise DataError(
            f"cannot load task {task!r} offline: the local file {path} does not exist; provide it "
            f"as <data dir>/{rel} and pass the directory with --data-dir / data_dir=... or "
            f"${DATA_DIR_ENV}, or run online to use the harness's own datasets")
    check_sha256(str(path.resolve()), SHA256.get(rel))
    return path


@lru_cache(maxsize=None)
def check_sha256(path: str, expected: str | None) -> None:
    if expected is not None and sha256_file(path) != expected:
        log.warning("%s differs from the copy the harness's results refer to (sha256 mismatch); "
                    "scores may not be comparable with published tables", path)


def _read_jsonl(path: Path) -> list[Doc]:
    rows = []
    try:
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    rows.append(json.loads(line))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path} is not a readable JSON-lines file ({exc}, line {lineno})") from exc
    return rows


def _read_labels(path: Path, n: int) -> list[str]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != n:
        raise DataError(f"{path} has {len(labels)} labels for {n} items; the two files do not belong together")
    return labels


def _dataset(split: str, docs: list[Doc]):
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


# ---------------------------------------------------------------------- loaders
# Each returns a DatasetDict with the split the harness evaluates, in the harness's layout.


def piqa_docs(data_dir: str | Path | None = None) -> list[Doc]:
    """PIQA validation as ``baber/piqa``: goal, sol1, sol2, label (0/1 from ``valid-labels.lst``)."""
    rows = _read_jsonl(task_file("piqa", FILES["piqa"][0], data_dir))
    labels = _read_labels(task_file("piqa", FILES["piqa"][1], data_dir), len(rows))
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(y)}
            for r, y in zip(rows, labels)]


def _arc_layout(rows: list[Doc], question_key: str) -> list[Doc]:
    return [{"id": r["id"], question_key: r["question"]["stem"],
             "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                         "label": [c["label"] for c in r["question"]["choices"]]},
             "answerKey": r["answerKey"]} for r in rows]


def arc_docs(task: str, data_dir: str | Path | None = None) -> list[Doc]:
    """ARC test as ``allenai/ai2_arc``: id, question (the stem), choices {text, label}, answerKey."""
    return _arc_layout(_read_jsonl(task_file(task, FILES[task][0], data_dir)), "question")


def openbookqa_docs(data_dir: str | Path | None = None) -> list[Doc]:
    """OpenBookQA main test as ``allenai/openbookqa``: id, question_stem, choices, answerKey."""
    return _arc_layout(_read_jsonl(task_file("openbookqa", FILES["openbookqa"][0], data_dir)), "question_stem")


def winogrande_docs(data_dir: str | Path | None = None) -> list[Doc]:
    """WinoGrande (xl) dev as ``allenai/winogrande``: sentence, option1, option2, answer
    ("1"/"2", from ``dev-labels.lst``; must agree with the file's own answers where present)."""
    rows = _read_jsonl(task_file("winogrande", FILES["winogrande"][0], data_dir))
    lst = task_file("winogrande", FILES["winogrande"][1], data_dir)
    labels = _read_labels(lst, len(rows))
    for i, (r, y) in enumerate(zip(rows, labels)):
        if y not in ("1", "2") or r.get("answer", y) != y:
            raise DataError(f"{lst}, line {i + 1}: label {y!r} does not match item {r.get('qID')} "
                            f"(answer {r.get('answer')!r}); the two files do not belong together")
    return [{"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": y}
            for r, y in zip(rows, labels)]


def lambada_docs(data_dir: str | Path | None = None) -> list[Doc]:
    """LAMBADA (OpenAI detokenized) test as ``EleutherAI/lambada_openai``: text."""
    return [{"text": r["text"]} for r in _read_jsonl(task_file("lambada_openai", FILES["lambada_openai"][0], data_dir))]


def boolq_docs(data_dir: str | Path | None = None) -> list[Doc]:
    """BoolQ validation as ``super_glue/boolq``: question, passage, idx, label (0 false, 1 true)."""
    rows = _read_jsonl(task_file("boolq", FILES["boolq"][0], data_dir))
    out = []
    for r in rows:
        label = r["label"]
        if isinstance(label, str):
            label = {"false": 0, "true": 1}[label.lower()]
        out.append({"question": r["question"], "passage": r["passage"], "idx": r["idx"], "label": int(label)})
    return out


def hellaswag_preprocess(text: str) -> str:
    """The harness's ``hellaswag/utils.py:preprocess`` (WikiHow bracket artifacts removed)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


_SENTENCE_END = re.compile(r"[.!?][\"')]*\s")


def capitalize_ctx_b(ctx: str) -> str:
    """Apply ``str.capitalize`` to the trailing sentence fragment of a HellaSwag context.

    The harness builds ``ctx_a + " " + ctx_b.capitalize()``; the text copy keeps only
    ``ctx = ctx_a + " " + ctx_b``. ``ctx_a`` is whole sentences and ``ctx_b`` an unfinished one
    (or empty), so ``ctx_b`` is taken as what follows the last sentence end when the context does
    not itself end a sentence.
    """
    if not ctx or ctx.rstrip()[-1] in ".!?":
        return ctx
    ends = list(_SENTENCE_END.finditer(ctx))
    if not ends:
        return ctx
    cut = ends[-1].end()
    return ctx[:cut] + ctx[cut:].capitalize()


def hellaswag_docs(data_dir: str | Path | None = None) -> list[Doc]:
    """HellaSwag validation after the harness's ``process_docs``: query, choices, gold, label.

    The copy is text, 6 lines an item ("activity_label: ctx", gold label, four endings), already
    stripped of the WikiHow markers by its own preprocessing; here ``ctx_b`` is capitalized as
    the harness does (see :func:`capitalize_ctx_b`) and the harness's ``preprocess`` is applied.
    """
    path = task_file("hellaswag", FILES["hellaswag"][0], data_dir)
    try:
        with bz2.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable bz2 text file ({exc})") from exc
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise DataError(f"{path} has {len(lines)} lines, not 6 an item")
    docs = []
    for i in range(0, len(lines), 6):
        head, label, endings = lines[i], lines[i + 1].strip(), lines[i + 2:i + 6]
        if label not in ("0", "1", "2", "3"):
            raise DataError(f"{path}, line {i + 2}: expected a gold label 0-3, got {label!r}")
        activity, _, ctx = head.partition(": ")
        docs.append({"activity_label": activity, "ctx": ctx, "endings": endings, "label": label,
                     "query": hellaswag_preprocess(capitalize_ctx_b(head)),
                     "choices": [hellaswag_preprocess(e) for e in endings], "gold": int(label)})
    return docs


#: task name -> (split the harness evaluates, loader of its documents)
LOADERS: dict[str, tuple[str, Callable[[str | Path | None], list[Doc]]]] = {
    "piqa": ("validation", piqa_docs),
    "arc_easy": ("test", lambda d=None: arc_docs("arc_easy", d)),
    "arc_challenge": ("test", lambda d=None: arc_docs("arc_challenge", d)),
    "hellaswag": ("validation", hellaswag_docs),
    "winogrande": ("validation", winogrande_docs),
    "lambada_openai": ("test", lambada_docs),
    "openbookqa": ("test", openbookqa_docs),
    "boolq": ("validation", boolq_docs),
}


def load_task(task: str, data_dir: str | Path | None = None, **_: Any):
    """The offline ``DatasetDict`` of ``task`` (its one split)."""
    split, loader = LOADERS[task]
    docs = loader(data_dir)
    log.info("%s: %d documents from the offline copy", task, len(docs))
    return _dataset(split, docs)


# ``custom_dataset`` entry points (the harness calls them with the task's metadata as keywords).
def _entry(task: str):
    def load(data_dir: str | Path | None = None, **kw: Any):
        return load_task(task, data_dir)

    load.__name__ = f"load_{task}"
    return load


load_piqa = _entry("piqa")
load_arc_easy = _entry("arc_easy")
load_arc_challenge = _entry("arc_challenge")
load_hellaswag = _entry("hellaswag")
load_winogrande = _entry("winogrande")
load_lambada_openai = _entry("lambada_openai")
load_openbookqa = _entry("openbookqa")
load_boolq = _entry("boolq")


# The harness's winogrande/preprocess_winogrande.py (partial evaluation: the choices are the two
# contexts, the target is the rest of the sentence).
def winogrande_doc_to_text(doc: Doc) -> int:
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc: Doc) -> str:
    idx = doc["sentence"].index("_") + 1
    return doc["sentence"][idx:].strip()


def winogrande_doc_to_choice(doc: Doc) -> list[str]:
    idx = doc["sentence"].index("_")
    return [doc["sentence"][:idx] + opt for opt in (doc["option1"], doc["option2"])]
