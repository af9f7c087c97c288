"""GSM8K exact match, scored as lm-evaluation-harness 0.4.13 scores its ``gsm8k`` task.

Prompts:

- **plain tokenizers** (no chat template): the harness's default, 5-shot: ``"Question: {q}\\nAnswer:
  {full answer}"`` for 5 examples of the TRAIN split, joined by blank lines, then ``"Question:
  {q}\\nAnswer:"``. The examples are drawn as the harness's sampler draws them: one
  ``random.Random(seed)``, and ``rnd.sample(train, 5)`` for each test item in order. Same
  prompts as ``lm_eval --tasks gsm8k --fewshot_random_seed SEED``.
- **chat tokenizers**: zero-shot, the harness's text ``"Question: {q}\\nAnswer:"`` as the only
  user message, rendered with the tokenizer's chat template and a generation prompt. Same
  prompts as ``lm_eval --tasks gsm8k --apply_chat_template --num_fewshot 0``.

Greedy generation (:mod:`quadllm.evaluation.tasks.generation`) of at most 256 tokens, stopping at
``"Question:"``, ``"</s>"``, ``"<|im_end|>"`` or end of sequence. Two answers are read from
each output, with the harness's filters: ``strict-match`` (the first ``#### N``) and
``flexible-extract`` (the last number); each is compared with the number after ``####`` in the
reference after the harness's normalization (commas and dollar signs removed, one trailing
period removed, lower case). Metrics: ``exact_match,strict-match`` and
``exact_match,flexible-extract`` (fractions). ``limit`` takes the first N test items (the
harness's ``--limit``).

Data: ``gsm8k/test.jsonl`` and ``gsm8k/train.jsonl`` (``question``, ``answer``) in the data
directory (``data_dir``, ``$QUADLLM_DATA_DIR`` or ``../shared/data``).
"""

from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

from torch import nn

from ...data.text import DATA_DIR_ENV, DataError, default_data_dir
from .generation import generate
from .offline.utils import check_sha256

log = logging.getLogger(__name__)

FILES = {"test": "gsm8k/test.jsonl", "train": "gsm8k/train.jsonl"}
SHA256 = {"test": "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
          "train": "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"}
NUM_FEWSHOT = 5
MAX_NEW_TOKENS = 256
STOP = ("Question:", "</s>", "<|im_end|>")
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
#: The harness's ``regexes_to_ignore`` for exact_match, applied in this order.
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
INVALID = "[invalid]"
METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def load_split(split: str, data_dir: str | Path | None = None) -> list[dict[str, str]]:
    """The GSM8K ``split`` ("test" or "train") from the local copy, in file order."""
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    rel = FILES[split]
    if root is None or not (root / rel).is_file():
        where = f"the file {root / rel} does not exist" if root is not None else "no data directory was found"
        raise DataError(f"cannot load GSM8K {split}: {where}; provide it as <data dir>/{rel} (jsonl with "
                        f"'question' and 'answer', from openai/grade-school-math) and pass the directory "
                        f"with --data-dir / data_dir=... or ${DATA_DIR_ENV}")
    check_sha256(str((root / rel).resolve()), SHA256[split])  # a mismatch only warns
    docs = []
    with open(root / rel, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                docs.append({"question": str(doc["question"]), "answer": str(doc["answer"])})
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"{root / rel}:{lineno}: not a GSM8K record ({exc!r})") from exc
    return docs


def uses_chat(tokenizer, chat: bool | None = None) -> bool:
    """Whether prompts go through the chat template (``chat=None``: when the tokenizer has one)."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


def question_text(doc: dict[str, str]) -> str:
    return f"Question: {doc['question']}\nAnswer:"


def fewshot_prompts(docs: list[dict[str, str]], train: list[dict[str, str]], seed: int = 0,
                    num_fewshot: int = NUM_FEWSHOT) -> list[str]:
    """The harness's plain-text few-shot prompts for ``docs`` (in order: the draws depend on it)."""
    rnd = random.Random(seed)
    prompts = []
    for doc in docs:
        shots = rnd.sample(train, num_fewshot) if num_fewshot else []
        prompts.append("".join(f"{question_text(s)} {s['answer']}\n\n" for s in shots) + question_text(doc))
    return prompts


def chat_prompts(tokenizer, docs: list[dict[str, str]]) -> list[str]:
    """Zero-shot prompts through the tokenizer's chat template."""
    return [tokenizer.apply_chat_template([{"role": "user", "content": question_text(d)}], tokenize=False,
                                          add_generation_prompt=True) for d in docs]


def extract_strict(output: str) -> str:
    """The harness's ``strict-match`` filter: the first ``#### N``, else ``[invalid]``."""
    m = STRICT.findall(output)
    return m[0].strip() if m else INVALID


def extract_flexible(output: str) -> str:
    """The harness's ``flexible-extract`` filter: the last number-like string, else ``[invalid]``."""
    m = FLEXIBLE.findall(output)
    if not m:
        return INVALID
    groups = [g for g in m[-1] if g]
    return groups[0].strip() if groups else INVALID


def normalize(text: str) -> str:
    """The harness's exact_match normalization (``regexes_to_ignore``, then ``ignore_case``)."""
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def is_correct(extracted: str, reference_answer: str) -> bool:
    """Exact match of an extracted answer with a reference answer (the full GSM8K ``answer``)."""
    return normalize(extracted) == normalize(reference_answer)


def score(output: str, reference_answer: str) -> dict[str, Any]:
    """Both filters' answers and exact matches for one output."""
    strict, flexible = extract_strict(output), extract_flexible(output)
    return {"extracted": {"strict-match": strict, "flexible-extract": flexible},
            METRICS[0]: float(is_correct(strict, reference_answer)),
            METRICS[1]: float(is_correct(flexible, reference_answer))}


def run_gsm8k(model: nn.Module, tokenizer, *, limit: int | None = None, seed: int = 0,
              data_dir: str | Path | None = None, batch_size: int = 8, max_new_tokens: int = MAX_NEW_TOKENS,
              chat: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Score ``model`` on the first ``limit`` GSM8K test items (all when None).

    Returns ``{"metrics": {"exact_match,strict-match", "exact_match,flexible-extract", "n"},
    "samples": [{"doc_id", "question", "target", "prompt", "output", "extracted", <metrics>}],
    "prompt_format": "chat-0shot" | "5shot", "seconds"}``.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    docs = load_split("test", data_dir)[:limit]
    use_chat = uses_chat(tokenizer, chat)
    if use_chat:
        prompts, fmt = chat_prompts(tokenizer, docs), "chat-0shot"
    else:
        prompts, fmt = fewshot_prompts(docs, load_split("train", data_dir), seed), f"{NUM_FEWSHOT}shot"
    log.info("gsm8k: %d items, %s prompts, up to %d new tokens", len(docs), fmt, max_new_tokens)
    t0 = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=STOP,
                       batch_size=batch_size, progress=progress, desc="gsm8k")
    samples = []
    for i, (doc, prompt, out) in enumerate(zip(docs, prompts, outputs)):
        samples.append({"doc_id": i, "question": doc["question"], "target": doc["answer"], "prompt": prompt,
                        "output": out, **score(out, doc["answer"])})
    n = len(samples)
    metrics: dict[str, float] = {m: sum(s[m] for s in samples) / n for m in METRICS}
    metrics["n"] = n
    seconds = time.perf_counter() - t0
    log.info("gsm8k (%d items, %s): strict %.4f, flexible %.4f in %.1f s", n, fmt, metrics[METRICS[0]],
             metrics[METRICS[1]], seconds)
    return {"metrics": metrics, "samples": samples, "prompt_format": fmt, "seconds": seconds}
