"""One entry point for every task ``quadllm eval --tasks`` accepts: zero-shot tasks through
lm-evaluation-harness (:func:`quadllm.evaluation.tasks.run_tasks`), ``gsm8k``, ``humaneval`` (the raw
prompt completed) and ``humaneval_chat`` (EvalPlus's instruct prompt) through
:mod:`quadllm.evaluation.tasks.gsm8k` and :mod:`quadllm.evaluation.tasks.humaneval`.

Metric names are the harness's: ``acc``, ``acc_norm`` (zero-shot), ``exact_match,strict-match``,
``exact_match,flexible-extract`` (GSM8K), ``pass@1`` (HumanEval, both prompts); every task also reports ``n``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from ...data.text import DataError
from .gsm8k import FILES, load_split, run_gsm8k
from .harness import check_offline_tasks, is_offline, run_tasks, task_manager
from .humaneval import problems_file, run_humaneval
from .scores import GENERATION_TASKS, papers_average

log = logging.getLogger(__name__)


def parse_tasks(spec: str | list[str]) -> list[str]:
    """``"piqa, arc_easy,gsm8k"`` -> ``["piqa", "arc_easy", "gsm8k"]`` (no empties, no repeats)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    tasks = [t.strip() for t in items if t.strip()]
    if not tasks:
        raise ValueError(f"no task named in {spec!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks are repeated: {tasks}")
    return tasks


def check_tasks(tasks: list[str], data_dir: str | Path | None = None, offline: bool | None = None) -> None:
    """Fail before any model work when a task's data or library is missing (``DataError``)."""
    zero_shot = [t for t in tasks if t not in GENERATION_TASKS]
    if "gsm8k" in tasks:
        for split in FILES:
            load_split(split, data_dir)
    if "humaneval" in tasks or "humaneval_chat" in tasks:
        problems_file()
    if zero_shot:
        try:
            import lm_eval  # noqa: F401
        except ImportError as exc:
            raise DataError(f"zero-shot tasks {zero_shot} need lm-evaluation-harness: "
                            "pip install 'quadllm[tasks]'") from exc

        if is_offline(offline):
            check_offline_tasks(zero_shot, task_manager(True, data_dir).metadata["data_dir"])


def run_suite(model: nn.Module, tokenizer, tasks: list[str], *, limit: int | None = None, seed: int = 0,
              batch_size: int = 8, data_dir: str | Path | None = None, max_new_tokens: int | None = None,
              offline: bool | None = None, progress: bool = True) -> dict[str, Any]:
    """Score ``model`` on ``tasks``, one task at a time.

    ``limit``: the first N items of each task (the harness's convention); ``max_new_tokens``
    caps generation (default: GSM8K 256, HumanEval 1024, as the harness).
    Returns ``{"tasks": {task: {metric: value, "n": items}}, "seconds": {requested task: wall
    seconds}, "samples": {task: [per-item records]}, "average", "average_metrics", "details":
    {task: extra facts}, "limit", "seed"}``; ``average`` is the papers' average over the zero-shot
    tasks (``acc_norm`` where reported, else ``acc``).
    """
    tasks = parse_tasks(tasks)
    check_tasks(tasks, data_dir, offline)
    scores: dict[str, dict[str, float]] = {}
    seconds: dict[str, float] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    details: dict[str, dict[str, Any]] = {}
    gen_kw = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    for task in tasks:
        t0 = time.perf_counter()
        if task == "gsm8k":
            r = run_gsm8k(model, tokenizer, limit=limit, seed=seed, data_dir=data_dir, batch_size=batch_size,
                          progress=progress, **gen_kw)
            scores[task], samples[task] = r["metrics"], r["samples"]
            details[task] = {"prompt_format": r["prompt_format"]}
        elif task in ("humaneval", "humaneval_chat"):
            r = run_humaneval(model, tokenizer, limit=limit, batch_size=batch_size, progress=progress,
                              prompt_format="chat" if task == "humaneval_chat" else "completion", **gen_kw)
            scores[task], samples[task] = r["metrics"], r["samples"]
            details[task] = {"statuses": r["statuses"], "isolation": r["isolation"], "prompt_format": r["prompt_format"]}
        else:
            r = run_tasks(model, tokenizer, [task], limit=limit, seed=seed, data_dir=data_dir,
                          batch_size=batch_size, offline=offline)
            scores.update(r["tasks"])
            samples.update(r["samples"])
            for leaf in r["tasks"]:
                details[leaf] = {"version": r["versions"].get(leaf), "offline": r["offline"]}
        seconds[task] = time.perf_counter() - t0
        log.info("%s done in %.1f s", task, seconds[task])
    average, chosen = papers_average(scores)
    return {"tasks": scores, "seconds": seconds, "samples": samples, "average": average,
            "average_metrics": chosen, "details": details, "limit": limit, "seed": seed}
