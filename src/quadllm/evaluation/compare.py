"""Tables comparing quantized models with their full-precision original (pure functions).

A *result* is what ``quadllm eval --tasks`` produces for one model: ``{"tasks": {task: {metric:
value, "n": items}}, "perplexity": {"ppl", "kl", "top1_agreement", "data", "seqlen", ...} or
absent}``. :func:`build_rows` turns several results (the first one the full-precision reference)
into rows: one per task and metric, the papers' zero-shot average, and perplexity, KL and top-1
agreement against the reference when present; each value comes with its percentage of the
reference's. :func:`compare_markdown` and :func:`eval_markdown` format them.
:func:`paired_difference` and :func:`mean_paired_difference` compare two models item by item on
the same items (the standard error of a difference is much smaller paired than unpaired).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .tasks.scores import papers_average

#: Metrics that are fractions in results and shown as percentages in tables.
FRACTION_METRICS = frozenset({"acc", "acc_norm", "exact_match,strict-match", "exact_match,flexible-extract",
                              "pass@1", "top1_agreement", "average"})
#: Metrics for which lower is better.
LOWER_IS_BETTER = frozenset({"ppl", "perplexity", "kl"})
AVERAGE_TASK = "average (zero-shot)"

Row = dict[str, Any]


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """``(mean(a - b), standard error of that mean)`` for per-item scores of two models on the same
    items in the same order: ``se = std(a - b, ddof=1) / sqrt(n)`` (0 for a single item)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired scores need the same, non-zero number of items (got {len(a)} and {len(b)})")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    if n == 1:
        return mean, 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1)
    return mean, math.sqrt(var / n)


def mean_paired_difference(per_task: Mapping[str, tuple[Sequence[float], Sequence[float]]]) -> tuple[float, float]:
    """The difference of two models' task averages (each task weighs the same, as in the papers'
    average) and its standard error, from per-task paired scores: ``mean_t d_t`` and
    ``sqrt(sum_t se_t^2) / T`` (tasks are independent item sets)."""
    if not per_task:
        raise ValueError("no task to average")
    diffs = [paired_difference(a, b) for a, b in per_task.values()]
    t = len(diffs)
    return sum(d for d, _ in diffs) / t, math.sqrt(sum(se ** 2 for _, se in diffs)) / t


def percent_of(value: float | None, reference: float | None) -> float | None:
    """``100 * value / reference``; None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return 100.0 * value / reference


def _is_metric(name: str) -> bool:
    return name != "n" and not name.endswith("_stderr")


def build_rows(results: dict[str, dict[str, Any]], reference: str) -> list[Row]:
    """Rows ``{"task", "metric", "values": {model: value}, "percent_of_fp": {model: %}}`` for
    every task and metric of ``results`` (model name -> result; ``reference`` is the FP model),
    then the papers' zero-shot average (with the reference's choice of metric per task), then
    perplexity, KL and top-1 agreement where the results have them."""
    if reference not in results:
        raise ValueError(f"reference {reference!r} is not among the results {list(results)}")
    names = [reference] + [n for n in results if n != reference]
    keys: list[tuple[str, str]] = []
    for name in names:
        for task, metrics in results[name].get("tasks", {}).items():
            keys += [(task, m) for m in metrics if _is_metric(m) and (task, m) not in keys]
    rows = [_row(task, metric, {n: results[n].get("tasks", {}).get(task, {}).get(metric) for n in names}, reference)
            for task, metric in keys]
    ref_avg, used = papers_average(results[reference].get("tasks", {}))
    if used:
        values = {n: papers_average(results[n].get("tasks", {}), used)[0] if n != reference else ref_avg
                  for n in names}
        rows.append(_row(AVERAGE_TASK, "average", values, reference, {"metrics": used}))
    if any(results[n].get("perplexity") for n in names):
        ppl_ref = results[reference].get("perplexity") or {}
        label = f"{ppl_ref.get('data', 'text')} (seqlen {ppl_ref.get('seqlen', '?')})"
        for metric in ("ppl", "kl", "top1_agreement"):
            values = {n: (results[n].get("perplexity") or {}).get(metric) for n in names}
            if any(v is not None for v in values.values()):
                rows.append(_row(label, metric, values, reference))
    return rows


def _row(task: str, metric: str, values: dict[str, Any], reference: str, extra: dict | None = None) -> Row:
    values = {n: None if v is None else float(v) for n, v in values.items()}
    row = {"task": task, "metric": metric, "values": values,
           "percent_of_fp": {n: percent_of(v, values[reference]) for n, v in values.items() if n != reference}}
    return {**row, **(extra or {})}


def format_value(metric: str, value: float | None) -> str:
    """Fractions as percentages with two decimals, KL with four, everything else with two."""
    if value is None:
        return "–"
    if metric in FRACTION_METRICS:
        return f"{100 * value:.2f}"
    return f"{value:.4f}" if metric == "kl" else f"{value:.2f}"


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(cells) + " |" for cells in lines]) + "\n"


def compare_markdown(rows: list[Row], names: list[str], reference: str) -> str:
    """One table: a row per (task, metric); the FP value, then each model's value and % of FP."""
    others = [n for n in names if n != reference]
    header = ["task", "metric", f"{reference} (FP)"] + [c for n in others for c in (n, "% of FP")]
    lines = []
    for r in rows:
        cells = [r["task"], r["metric"], format_value(r["metric"], r["values"].get(reference))]
        for n in others:
            p = r["percent_of_fp"].get(n)
            cells += [format_value(r["metric"], r["values"].get(n)), "–" if p is None else f"{p:.1f}%"]
        lines.append(cells)
    note = ("\nAccuracies, exact match, pass@1 and top-1 agreement in %; % of FP = value / FP value × 100 "
            "(lower is better for ppl, perplexity and kl). Average: the papers' mean over the zero-shot "
            "tasks of acc_norm where reported, else acc.\n")
    return _table(header, lines) + note


def eval_markdown(result: dict[str, Any]) -> str:
    """The table ``quadllm eval --tasks`` prints: task, metric, value, items, seconds."""
    seconds = result.get("seconds", {})
    lines = []
    for task, metrics in result.get("tasks", {}).items():
        for metric, value in metrics.items():
            if _is_metric(metric):
                secs = seconds.get(task)
                lines.append([task, metric, format_value(metric, value), str(metrics.get("n", "")),
                              "" if secs is None else f"{secs:.1f}"])
    if result.get("average") is not None:
        lines.append([AVERAGE_TASK, "average", format_value("average", result["average"]), "", ""])
    ppl = result.get("perplexity")
    if ppl:
        label = f"{ppl.get('data', 'text')} (seqlen {ppl.get('seqlen', '?')})"
        for metric in ("ppl", "kl", "top1_agreement"):
            if ppl.get(metric) is not None:
                lines.append([label, metric, format_value(metric, ppl[metric]), str(ppl.get("tokens", "")),
                              f"{ppl.get('seconds', 0):.1f}"])
    return _table(["task", "metric", "value", "n", "seconds"], lines)
