"""Fine-tuning data: files or hub data sets turned into token sequences with loss masks.

Accepted ``--data`` forms (:func:`load_training_set`):

* a ``.jsonl`` file whose records are, each on its own,
    - Alpaca instructions: ``instruction``, optional ``input``, ``output``;
    - chats: ``messages`` (a list of ``{"role", "content"}``), rendered with the model's chat
      template; the loss covers the assistant turns;
    - GSM8K problems: ``question`` / ``answer``;
    - plain documents: ``text`` (language-model loss on every token);
* a ``.txt`` file, or a named text (``wikitext2`` = ``wiki.valid.tokens``, ``ptb``, ``pydoc``, ``pysource``;
  never a test split): language-model loss on windows of ``max_seqlen`` tokens;
* any other name is looked up on the Hugging Face hub with ``datasets`` (train split) when it is
  installed and reachable, with the same record forms.

Prompt/response records (Alpaca, GSM8K) become a user turn and an assistant turn of the chat
template when the tokenizer has one, and the Alpaca prompt format otherwise. Unless
``train_on_prompt``, labels are ``-100`` (ignored) on every token that is not part of a response.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from .text import KNOWN_NAMES, DataError, hub_usable, load_text, tokenize_all

log = logging.getLogger(__name__)

IGNORE = -100

ALPACA_PROMPT = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


@dataclass
class Example:
    input_ids: torch.Tensor  # [T] long
    labels: torch.Tensor  # [T] long, IGNORE where no loss

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels[1:] != IGNORE).sum())


@dataclass
class TrainingSet:
    examples: list[Example]
    kinds: dict[str, int]  # record kind -> count
    origin: str
    skipped: int = 0  # records with no trainable token left after truncation
    notes: list[str] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)

    def describe(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        return f"{len(self.examples)} sequences ({kinds}; {self.n_tokens} tokens) from {self.origin}"


# ------------------------------------------------------------------------- records


def _record_kind(obj: Any, where: str) -> str:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return "chat"
    if "instruction" in obj and "output" in obj:
        return "alpaca"
    if "question" in obj and "answer" in obj:
        return "gsm8k"
    if "text" in obj:
        return "text"
    raise DataError(f"{where}: no usable fields; found {sorted(obj)}; expected 'instruction'[+'input']+'output' "
                    "(Alpaca), 'messages' (chat), 'question'+'answer' (GSM8K) or 'text'")


def _str_field(obj: dict, key: str, where: str, default: str | None = None) -> str:
    value = obj.get(key, default)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(obj: dict, where: str) -> list[dict[str, str]]:
    msgs = obj["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: the chat has no assistant turn to learn from")
    return out


def alpaca_prompt(instruction: str, inp: str = "") -> str:
    """The Alpaca prompt (with or without an input block) that precedes the response."""
    if inp.strip():
        return ALPACA_PROMPT.format(ctx=", paired with an input that provides further context",
                                    instruction=instruction, input_block=f"### Input:\n{inp}\n\n")
    return ALPACA_PROMPT.format(ctx="", instruction=instruction, input_block="")


def _prompt_response(obj: dict, kind: str, where: str) -> tuple[str, str, str, str]:
    """(user text for a chat template, raw prompt for the Alpaca format, response, kind)."""
    if kind == "gsm8k":
        q, a = _str_field(obj, "question", where), _str_field(obj, "answer", where)
        return q, f"Question: {q}\nAnswer: ", a, kind
    instruction = _str_field(obj, "instruction", where)
    inp = _str_field(obj, "input", where, default="")
    user = instruction if not inp.strip() else f"{instruction}\n\n{inp}"
    return user, alpaca_prompt(instruction, inp), _str_field(obj, "output", where), kind


# ------------------------------------------------------------------------ tokenize


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _encode_spans(tokenizer: Any, text: str, spans: list[tuple[int, int]], train_all: bool,
                  max_seqlen: int) -> Example:
    """Tokenize ``text`` (which already holds its special tokens) and keep labels on tokens that
    lie inside one of the character ``spans`` (all tokens when ``train_all``)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)
    if train_all:
        labels = ids.clone()
    else:
        labels = torch.full_like(ids, IGNORE)
        for i, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and any(a < e and b > s for s, e in spans):  # the token overlaps a response
                labels[i] = ids[i]
    return Example(ids[:max_seqlen], labels[:max_seqlen])


def _chat_example(tokenizer: Any, messages: list[dict[str, str]], train_all: bool, max_seqlen: int) -> Example:
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        after = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (after.startswith(before) and full.startswith(after)):
            raise DataError("the chat template does not render conversations incrementally; "
                            "cannot tell assistant turns apart (use --train-on-prompt)")
        spans.append((len(before), len(after)))
    return _encode_spans(tokenizer, full, spans, train_all, max_seqlen)


def _pair_example(tokenizer: Any, user: str, prompt: str, response: str, train_all: bool,
                  max_seqlen: int) -> Example:
    if has_chat_template(tokenizer):
        return _chat_example(tokenizer, [{"role": "user", "content": user},
                                         {"role": "assistant", "content": response}], train_all, max_seqlen)
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    text = bos + prompt + response + eos
    return _encode_spans(tokenizer, text, [(len(bos) + len(prompt), len(text))], train_all, max_seqlen)


def text_examples(tokenizer: Any, text: str, max_seqlen: int, min_tokens: int = 16) -> list[Example]:
    """Non-overlapping windows of ``max_seqlen`` tokens of ``text`` (a last window shorter than
    ``min_tokens`` is dropped), each with a language-model loss on every token."""
    ids = tokenize_all(tokenizer, text)
    out = []
    for start in range(0, len(ids), max_seqlen):
        chunk = ids[start:start + max_seqlen]
        if len(chunk) >= min_tokens:
            out.append(Example(chunk.clone(), chunk.clone()))
    return out


def records_to_set(records: Iterable[Any], tokenizer: Any, max_seqlen: int, origin: str,
                   train_on_prompt: bool = False) -> TrainingSet:
    """Turn records (dicts in any of the accepted forms) into a :class:`TrainingSet`."""
    examples: list[Example] = []
    kinds: dict[str, int] = {}
    texts: list[str] = []
    skipped = 0
    for n, obj in enumerate(records, start=1):
        where = f"{origin}, record {n}"
        kind = _record_kind(obj, where)
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind == "text":
            texts.append(_str_field(obj, "text", where))
            continue
        if kind == "chat":
            ex = _chat_example(tokenizer, _messages(obj, where), train_on_prompt, max_seqlen)
        else:
            user, prompt, response, _ = _prompt_response(obj, kind, where)
            ex = _pair_example(tokenizer, user, prompt, response, train_on_prompt, max_seqlen)
        if ex.n_loss_tokens == 0:
            skipped += 1
            continue
        examples.append(ex)
    if texts:
        examples.extend(text_examples(tokenizer, "\n\n".join(texts), max_seqlen))
    if not examples:
        raise DataError(f"{origin}: no training sequence left (every response was cut off by --max-seqlen "
                        f"{max_seqlen}, or the data is empty)")
    if skipped:
        log.warning("%d records skipped: their prompt fills all %d tokens of --max-seqlen", skipped, max_seqlen)
    return TrainingSet(examples, kinds, origin, skipped)


def _read_jsonl(path: Path) -> list[Any]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text: {exc}") from exc
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}, line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    return records


def _hub_records(name: str) -> list[Any]:
    try:
        import datasets  # noqa: F401
    except ImportError as exc:
        raise DataError(f"{name!r} is not a file nor one of {', '.join(KNOWN_NAMES)}; loading it from the "
                        "Hugging Face hub needs `pip install datasets`") from exc
    if not hub_usable():
        raise DataError(f"{name!r} is not a file nor one of {', '.join(KNOWN_NAMES)}, and the Hugging Face hub "
                        "is not reachable; pass a local .jsonl or .txt file")
    try:
        ds = datasets.load_dataset(name, split="train")
    except Exception as exc:  # noqa: BLE001 - the hub's errors are many; report them in one form
        raise DataError(f"could not load {name!r} from the Hugging Face hub: {exc}") from exc
    return [dict(r) for r in ds]


def source_kind(spec: str) -> str:
    """What ``--data`` names: ``"jsonl"`` (a records file), ``"text"`` (any other file, or a named
    text) or ``"hub"`` (a hub data set name); :class:`DataError` for anything else."""
    if not isinstance(spec, str) or not spec.strip():
        raise DataError("--data is required: a .jsonl (Alpaca, chat, GSM8K or text records) or text file, "
                        f"one of {', '.join(KNOWN_NAMES)}, or a hub data set name")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".jsonl":
        if not path.is_file():
            raise DataError(f"training data file not found: {path}")
        return "jsonl"
    if path.is_file() or spec.strip().lower() in KNOWN_NAMES:  # any other file is plain text, whatever its suffix
        return "text"
    if path.exists():
        raise DataError(f"{path} is a directory; pass a .jsonl file, a text file, or a data set name")
    if path.suffix or spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # a path, not a hub name
        raise DataError(f"training data file not found: {path}")
    return "hub"


def check_training_source(spec: str, data_dir: str | Path | None = None) -> None:
    """What can be checked of ``--data`` without a tokenizer: a file exists and reads, a named
    text is there. (A hub data set name is only checked when it is loaded.)"""
    kind = source_kind(spec)
    if kind == "jsonl":
        _read_jsonl(Path(spec).expanduser())
    elif kind == "text":
        load_text(spec, "calib", data_dir=data_dir)


def load_training_set(spec: str, tokenizer: Any, max_seqlen: int = 512, train_on_prompt: bool = False,
                      data_dir: str | Path | None = None, limit: int | None = None) -> TrainingSet:
    """Load and tokenize fine-tuning data (see the module docstring for the accepted forms)."""
    kind = source_kind(spec)
    if max_seqlen < 16:
        raise DataError(f"--max-seqlen must be at least 16, got {max_seqlen}")
    if kind == "text":
        src = load_text(spec, "calib", data_dir=data_dir)
        tset = TrainingSet(text_examples(tokenizer, src.text, max_seqlen), {"text": 1}, src.origin)
        if not tset.examples:
            raise DataError(f"{src.origin} holds fewer than 16 tokens")
        if limit is not None:
            tset.examples = tset.examples[:limit]
        return tset
    if kind == "jsonl":
        path = Path(spec).expanduser()
        records, origin = _read_jsonl(path), str(path)
    else:
        records, origin = _hub_records(spec), f"hub:{spec} (train)"
    if limit is not None:
        records = records[:limit]
    return records_to_set(records, tokenizer, max_seqlen, origin, train_on_prompt)


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (IGNORE on padding)."""
    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = e.input_ids
        labels[i, :n] = e.labels
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
