"""Task scores for quadllm models.

- Zero-shot tasks (PIQA, ARC, HellaSwag, WinoGrande, LAMBADA, OpenBookQA, BoolQ) scored by
  lm-evaluation-harness, offline from local copies or online from the harness's datasets
  (needs the optional extra ``quadllm[tasks]``, ``lm-eval==0.4.13``): :func:`run_tasks`.
- GSM8K exact match (:func:`quadllm.evaluation.tasks.gsm8k.run_gsm8k`) and HumanEval pass@1
  (:func:`quadllm.evaluation.tasks.humaneval.run_humaneval`, programs run in :mod:`quadllm.evaluation.tasks.sandbox`),
  both by greedy generation (:func:`quadllm.evaluation.tasks.generation.generate`); no lm-eval needed.
- :func:`run_suite`: any mix of the above, as ``quadllm eval --tasks``::

    from quadllm.evaluation.tasks import run_suite
    res = run_suite(model, tok, ["piqa", "arc_easy", "gsm8k", "humaneval"], limit=100)
    res["tasks"]["gsm8k"]["exact_match,flexible-extract"], res["tasks"]["humaneval"]["pass@1"]
"""

from .harness import OFFLINE_DIR, OFFLINE_TASKS, PAPER_TASKS, is_offline, papers_metric, run_tasks
from .scores import GENERATION_TASKS
from .suite import run_suite

__all__ = ["run_tasks", "run_suite", "is_offline", "papers_metric", "OFFLINE_DIR", "OFFLINE_TASKS",
           "PAPER_TASKS", "GENERATION_TASKS"]
