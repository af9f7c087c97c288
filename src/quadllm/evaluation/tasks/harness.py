"""Zero-shot tasks through lm-evaluation-harness (0.4.13), with quadllm models as its ``HFLM``.

Scores come from the harness itself (its requests, tokenization, log-likelihoods and metrics),
so they are comparable with published tables. Online, the harness's own task configurations and
datasets are used unchanged. Offline (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` set, the hub
unreachable, or ``offline=True``), the task configurations shipped in ``quadllm/tasks/offline``
are used instead: the same names, prompts, choices, targets and metrics, reading the local copies
in the data directory (``data_dir``, ``$QUADLLM_DATA_DIR`` or ``../shared/data``).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data.text import DataError, default_data_dir, hub_reachable
from .offline.utils import FILES, task_file

log = logging.getLogger(__name__)

#: Directory of the offline task configurations (package data).
OFFLINE_DIR = Path(__file__).resolve().parent / "offline"

#: Tasks that have an offline configuration (the harness's names).
OFFLINE_TASKS: tuple[str, ...] = tuple(FILES)

#: The papers' zero-shot tasks (QuaRot / QUAD tables).
PAPER_TASKS: tuple[str, ...] = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge", "lambada_openai")

#: Bootstrap resamples for the stderr of non-mean metrics (only LAMBADA's perplexity here);
#: the harness's command line uses 100000, far more than a CPU run needs.
BOOTSTRAP_ITERS = 1000


def softmax_dtype(model: nn.Module) -> str | None:
    """``HFLM``'s ``softmax_dtype`` for ``model``: float32 when its weights are in a 16-bit dtype, whose
    log-probabilities would round away differences between the choices that decide an item's score."""
    return "float32" if next(model.parameters()).dtype in (torch.bfloat16, torch.float16) else None


def _env_offline() -> bool:
    return any(os.environ.get(k, "0").strip().lower() not in ("", "0", "false", "no")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def is_offline(offline: bool | None = None) -> bool:
    """Whether to use the offline task copies: ``offline`` when given, otherwise when the
    environment says so (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``) or the hub is unreachable."""
    if offline is not None:
        return bool(offline)
    return _env_offline() or not hub_reachable()


def task_manager(offline: bool, data_dir: str | Path | None = None):
    """The harness's ``TaskManager``: its own tasks online; only quadllm's offline
    configurations offline, with ``data_dir`` passed to their loaders as metadata."""
    from lm_eval.tasks import TaskManager

    if not offline:
        return TaskManager()
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return TaskManager(include_path=str(OFFLINE_DIR), include_defaults=False,
                       metadata={"data_dir": None if root is None else str(root)})


def check_offline_tasks(tasks: list[str], data_dir: str | Path | None) -> None:
    """Fail before touching the model when a task has no offline configuration or a file is missing."""
    unknown = [t for t in tasks if t not in OFFLINE_TASKS]
    if unknown:
        hint = " ('lambada' is the harness's group of two variants; the papers use lambada_openai)" \
            if "lambada" in unknown else ""
        raise DataError(f"no offline configuration for task(s) {unknown}{hint}; offline tasks: "
                        f"{', '.join(OFFLINE_TASKS)}; run online to use the harness's other tasks")
    for task in tasks:
        for rel in FILES[task]:
            task_file(task, rel, data_dir)


def papers_metric(metrics: dict[str, float]) -> str | None:
    """The metric the papers' average uses: ``acc_norm`` where the task reports it, else ``acc``."""
    for name in ("acc_norm", "acc"):
        if name in metrics:
            return name
    return None


def _summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every leaf task the harness ran (a tag or group such as
    the harness's ``lambada`` expands to its tasks), without the filter suffix (``acc,none``)."""
    out: dict[str, dict[str, float]] = {}
    for task, raw in results["results"].items():
        metrics: dict[str, float] = {}
        for key, value in raw.items():
            name, _, filt = key.partition(",")
            if filt == "none" and isinstance(value, (int, float)):
                metrics[name] = float(value)
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            metrics["n"] = int(n)
        out[task] = metrics
    return out


def run_tasks(model: nn.Module, tokenizer, tasks: list[str], limit: int | None = None, seed: int = 0,
              data_dir: str | Path | None = None, batch_size: int = 8, offline: bool | None = None,
              *, bootstrap_iters: int = BOOTSTRAP_ITERS) -> dict[str, Any]:
    """Score ``model`` zero-shot on ``tasks`` (the harness's task names) with lm-evaluation-harness.

    ``model`` is any transformers causal LM, including a quadllm model (``quadllm.load(dir)`` or
    one quantized in place); it is wrapped as the harness's ``HFLM`` with ``tokenizer``. ``limit``
    keeps the first items of each task (for tests); ``seed`` seeds python, numpy, torch and the
    few-shot sampler as the harness does. ``offline``: None decides from the environment (see
    :func:`is_offline`).

    Returns ``{"tasks": {task: {metric: value, "<metric>_stderr": ..., "n": items}},
    "average": mean over the tasks of the papers' metric (:func:`papers_metric`),
    "average_metrics": {task: metric},
    "samples": {task: [the harness's per-item records]}, "offline", "data_dir", "limit",
    "seed", "seconds", "versions"}``. Accuracies are fractions, as the harness reports them.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks or not all(isinstance(t, str) and t for t in tasks):
        raise ValueError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks are repeated: {tasks}")
    off = is_offline(offline)
    tm = task_manager(off, data_dir)
    if off:
        check_offline_tasks(tasks, tm.metadata["data_dir"])
    log.info("zero-shot tasks %s via lm-evaluation-harness %s (%s)", tasks, lm_eval.__version__,
             f"offline copies in {tm.metadata['data_dir']}" if off else "the harness's datasets")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, softmax_dtype=softmax_dtype(model))
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, limit=limit, task_manager=tm, log_samples=True,
        bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed,
        torch_random_seed=seed, fewshot_random_seed=seed)
    seconds = time.perf_counter() - t0
    scores = _summarize(results)
    chosen = {t: m for t, m in ((t, papers_metric(s)) for t, s in scores.items()) if m is not None}
    average = sum(scores[t][m] for t, m in chosen.items()) / len(chosen) if chosen else None
    for task, metrics in scores.items():
        log.info("%s (%s items): %s", task, metrics.get("n", "?"),
                 ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k != "n" and not k.endswith("stderr")))
    log.info("average (%s) = %s in %.1f s", ", ".join(f"{t}:{m}" for t, m in chosen.items()),
             "n/a" if average is None else f"{average:.4f}", seconds)
    return {
        "tasks": scores,
        "average": average,
        "average_metrics": chosen,
        "samples": results.get("samples", {}),
        "offline": off,
        "data_dir": tm.metadata.get("data_dir") if off else None,
        "limit": limit,
        "seed": seed,
        "seconds": seconds,
        "versions": {t: results.get("versions", {}).get(t) for t in scores},
    }
