"""Zero-shot tasks (PIQA, ARC, HellaSwag, WinoGrande, LAMBADA, OpenBookQA, BoolQ) scored by
lm-evaluation-harness, offline from local copies or online from the harness's datasets.

Needs the optional extra ``quadllm[tasks]`` (``lm-eval==0.4.13``)::

    from quadllm.tasks import run_tasks
    res = run_tasks(model, tok, ["piqa", "arc_easy"], limit=100)
    res["tasks"]["piqa"]["acc_norm"], res["average"]
"""

from .harness import OFFLINE_DIR, OFFLINE_TASKS, PAPER_TASKS, is_offline, papers_metric, run_tasks

__all__ = ["run_tasks", "is_offline", "papers_metric", "OFFLINE_DIR", "OFFLINE_TASKS", "PAPER_TASKS"]
