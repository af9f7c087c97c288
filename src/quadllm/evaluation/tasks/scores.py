"""Which tasks are generative, and the papers' zero-shot average of a set of task scores."""

from __future__ import annotations

from typing import Any

from .harness import papers_metric

__all__ = ["GENERATION_TASKS", "papers_average"]

GENERATION_TASKS: tuple[str, ...] = ("gsm8k", "humaneval", "humaneval_chat")


def papers_average(tasks: dict[str, dict[str, Any]], metrics: dict[str, str] | None = None
                   ) -> tuple[float | None, dict[str, str]]:
    """Mean over the zero-shot tasks of ``metrics`` (task -> metric; default: :func:`papers_metric`
    of each task); tasks missing a metric are left out. Returns ``(average, metrics used)``."""
    if metrics is None:
        metrics = {t: m for t, m in ((t, papers_metric(s)) for t, s in tasks.items() if t not in GENERATION_TASKS)
                   if m is not None}
    used = {t: m for t, m in metrics.items() if m in tasks.get(t, {})}
    if not used:
        return None, {}
    return sum(float(tasks[t][m]) for t, m in used.items()) / len(used), used
