"""Zero-shot tasks through lm-evaluation-harness: offline task copies and scoring of quadllm models.

Needs the optional extra ``quadllm[tasks]`` (lm-eval) and the offline data directory
(``../shared/data``); skipped without them.
"""

from __future__ import annotations

import bz2
import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import random_ids, tiny_model  # noqa: E402

from quadllm import QuantConfig, load, quantize, save  # noqa: E402
from quadllm.data.text import DataError, default_data_dir  # noqa: E402
from quadllm.evaluation.tasks import OFFLINE_DIR, OFFLINE_TASKS, is_offline, papers_metric, run_tasks  # noqa: E402
from quadllm.evaluation.tasks.harness import task_manager  # noqa: E402
from quadllm.evaluation.tasks.offline import utils as offline_utils  # noqa: E402

DATA = default_data_dir()
needs_data = pytest.mark.skipif(DATA is None or not (DATA / "piqa" / "valid.jsonl").is_file(),
                                reason="offline data directory (../shared/data) not found")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


# ------------------------------------------------------------------ helpers


def _jsonl(rel: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / rel).read_text(encoding="utf-8").splitlines() if line.strip()]


def _lines(rel: str) -> list[str]:
    return [line.strip() for line in (DATA / rel).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE tokenizer (320 tokens, adds BOS like Llama's), trained on a few items."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [f"Question: {r['goal']}\nAnswer: {r['sol1']} {r['sol2']}" for r in _jsonl("piqa/valid.jsonl")[:50]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def quad_model(tokenizer, tmp_path_factory):
    """A tiny random llama quantized with QUAD (W4A4, 4-bit KV), saved and loaded back (in float64,
    so that batching in the harness cannot flip a rounding decision of the fake quantizers)."""
    model = tiny_model("llama", torch.float32, vocab_size=len(tokenizer))
    config = QuantConfig(method="quad", rank=8, mode="w4a4", kv_bits=4, calib_samples=4, calib_seqlen=16)
    quantize(model, config, random_ids(4, 16, vocab=len(tokenizer)), progress=False)
    out = save(model, tokenizer, tmp_path_factory.mktemp("ckpt") / "tiny-quad", original={"spec": "tiny"})
    loaded, tok, _ = load(out, dtype=torch.float64)
    return loaded, tok


@torch.no_grad()
def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context): the continuation's tokens are those of context+continuation
    after the context's own tokens (as the harness splits them)."""
    ctx = tok(context).input_ids
    whole = tok(context + continuation).input_ids
    assert whole[:len(ctx)] == ctx
    ids = torch.tensor([whole])
    logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
    targets = ids[0, len(ctx):]
    return float(logp[len(ctx) - 1:].gather(1, targets[:, None]).sum())


def _hand_scores(model, tok, items: list[tuple[str, list[str], int]]) -> tuple[list[list[float]], float, float]:
    """Log-likelihoods of each choice, acc (argmax) and acc_norm (argmax of ll / len(choice) in
    characters) over ``(context, choices, gold)`` items."""
    lls, acc, acc_norm = [], 0, 0
    for context, choices, gold in items:
        ll = [_loglikelihood(model, tok, context, " " + c) for c in choices]
        lls.append(ll)
        acc += max(range(len(ll)), key=lambda i: ll[i]) == gold
        acc_norm += max(range(len(ll)), key=lambda i: ll[i] / len(choices[i])) == gold
    return lls, acc / len(items), acc_norm / len(items)


# --------------------------------------------------------- (a) harness scores


@needs_data
def test_harness_scores_match_hand_computed_loglikelihoods(quad_model):
    model, tok = quad_model
    limit = 4
    res = run_tasks(model, tok, ["piqa", "arc_easy"], limit=limit, batch_size=3, offline=True)
    assert res["offline"] and res["data_dir"] == str(DATA)

    piqa = [(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(y))
            for r, y in zip(_jsonl("piqa/valid.jsonl")[:limit], _lines("piqa/valid-labels.lst"))]
    arc = [(f"Question: {r['question']['stem']}\nAnswer:", [c["text"] for c in r["question"]["choices"]],
            [c["label"] for c in r["question"]["choices"]].index(r["answerKey"]))
           for r in _jsonl("arc/ARC-Easy-Test.jsonl")[:limit]]
    for task, items in (("piqa", piqa), ("arc_easy", arc)):
        lls, acc, acc_norm = _hand_scores(model, tok, items)
        samples = sorted(res["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in samples] == list(range(limit))
        for s, (context, choices, gold), ll in zip(samples, items, lls):
            assert [tuple(a) for a in s["arguments"]] == [(context, " " + c) for c in choices]
            assert s["target"] == gold
            harness_ll = [r[0] for r in s["filtered_resps"]]
            assert harness_ll == pytest.approx(ll, abs=1e-6)
        metrics = res["tasks"][task]
        assert metrics["n"] == limit
        assert metrics["acc"] == pytest.approx(acc)
        assert metrics["acc_norm"] == pytest.approx(acc_norm)
    assert res["average_metrics"] == {"piqa": "acc_norm", "arc_easy": "acc_norm"}
    assert res["average"] == pytest.approx((res["tasks"]["piqa"]["acc_norm"] + res["tasks"]["arc_easy"]["acc_norm"]) / 2)


@needs_data
def test_a_bfloat16_model_gets_float32_log_probabilities(quad_model):
    model, tok = quad_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    res = run_tasks(bf16, tok, ["piqa"], limit=2, batch_size=1, offline=True)
    items = [(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(y))
             for r, y in zip(_jsonl("piqa/valid.jsonl")[:2], _lines("piqa/valid-labels.lst"))]
    lls, _, _ = _hand_scores(bf16, tok, items)  # the bfloat16 logits, log-softmax in float64
    for s, ll in zip(sorted(res["samples"]["piqa"], key=lambda s: s["doc_id"]), lls):
        harness_ll = [r[0] for r in s["filtered_resps"]]
        # float32 log-softmax of the same bfloat16 logits; a bfloat16 one is off by ~1e-2 per token
        assert harness_ll == pytest.approx(ll, rel=1e-5)


def test_papers_metric():
    assert papers_metric({"acc": 0.5, "acc_norm": 0.6}) == "acc_norm"
    assert papers_metric({"acc": 0.5, "perplexity": 3.0}) == "acc"
    assert papers_metric({"perplexity": 3.0}) is None


def test_offline_decision(monkeypatch):
    assert is_offline(True) and not is_offline(False)
    assert is_offline(None)  # HF_HUB_OFFLINE=1 (fixture)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr("quadllm.evaluation.tasks.harness.hub_reachable", lambda: False)
    assert is_offline(None)
    monkeypatch.setattr("quadllm.evaluation.tasks.harness.hub_reachable", lambda: True)
    assert not is_offline(None)


def test_online_uses_the_harness_tasks(monkeypatch):
    calls = []
    monkeypatch.setattr("lm_eval.tasks.TaskManager", lambda **kw: calls.append(kw) or kw)
    assert task_manager(False, "/nowhere") == {} and calls == [{}]
    tm = task_manager(True, "/some/dir")
    assert tm == {"include_path": str(OFFLINE_DIR), "include_defaults": False, "metadata": {"data_dir": "/some/dir"}}


# -------------------------------------------------------------- (b) errors


@needs_data
def test_missing_data_file_names_it(tmp_path):
    (tmp_path / "piqa").mkdir()
    shutil.copy(DATA / "piqa" / "valid.jsonl", tmp_path / "piqa" / "valid.jsonl")
    tm = task_manager(True, tmp_path)
    with pytest.raises(DataError, match=r"piqa/valid-labels\.lst does not exist.*--data-dir"):
        tm.load(["piqa"])
    with pytest.raises(DataError, match=r"arc/ARC-Easy-Test\.jsonl does not exist.*--data-dir"):
        run_tasks(torch.nn.Linear(1, 1), None, ["arc_easy"], data_dir=tmp_path, offline=True)


def test_offline_task_without_configuration():
    with pytest.raises(DataError, match="lambada_openai"):
        run_tasks(torch.nn.Linear(1, 1), None, ["lambada"], offline=True)
    with pytest.raises(ValueError, match="non-empty"):
        run_tasks(torch.nn.Linear(1, 1), None, [], offline=True)


@needs_data
def test_mismatched_label_file(tmp_path):
    (tmp_path / "winogrande").mkdir()
    shutil.copy(DATA / "winogrande" / "dev.jsonl", tmp_path / "winogrande" / "dev.jsonl")
    labels = _lines("winogrande/dev-labels.lst")
    (tmp_path / "winogrande" / "dev-labels.lst").write_text("\n".join(labels[1:] + labels[:1]) + "\n")
    with pytest.raises(DataError, match="do not belong together"):
        offline_utils.winogrande_docs(tmp_path)


# ------------------------------------------ (c) offline tasks = the harness's


_HARNESS_YAML = {
    "piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
    "lambada_openai": "lambada/lambada_openai.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "boolq": "super_glue/boolq/default.yaml",
}


@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_offline_config_copies_the_harness(task):
    """Same prompt, target, choices, output type, metrics and version as the harness's task;
    the split read is the one the harness evaluates (test if it has one, else validation)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    theirs = load_yaml(Path(lm_eval.__file__).parent / "tasks" / _HARNESS_YAML[task], resolve_func=False)
    ours = load_yaml(OFFLINE_DIR / f"{task}.yaml", resolve_func=False)
    assert ours["task"] == theirs["task"] == task
    for key in ("output_type", "doc_to_text", "doc_to_target", "doc_to_choice", "metric_list", "metadata",
                "target_delimiter", "fewshot_delimiter", "should_decontaminate", "num_fewshot"):
        if isinstance(theirs.get(key), str) and theirs[key].startswith("/"):
            continue  # a !function of the harness (winogrande): compared on documents below
        assert ours.get(key) == theirs.get(key), key
    split = "test_split" if theirs.get("test_split") else "validation_split"
    assert ours.get(split) == theirs[split]
    assert not ours.get("test_split") or split == "test_split"


def _first_request(task: str):
    tm = task_manager(True, DATA)
    obj = tm.load([task])["tasks"][task]
    doc = obj.eval_docs[0]
    obj.build_all_requests(limit=1, rank=0, world_size=1)
    return obj, doc, sorted(obj.instances, key=lambda i: i.idx)


def _mc_args(context: str, choices: list[str]) -> list[tuple[str, str]]:
    return [(context, " " + c) for c in choices]


@needs_data
@pytest.mark.parametrize("task", OFFLINE_TASKS)
def test_offline_task_first_request_matches_raw_file(task):
    obj, doc, instances = _first_request(task)
    args = [tuple(i.args) for i in instances]
    target = obj.doc_to_target(doc)
    if task == "piqa":
        r, y = _jsonl("piqa/valid.jsonl")[0], int(_lines("piqa/valid-labels.lst")[0])
        assert args == _mc_args(f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]]) and target == y
        assert len(obj.eval_docs) == 1838
    elif task in ("arc_easy", "arc_challenge", "openbookqa"):
        rel = {"arc_easy": "arc/ARC-Easy-Test.jsonl", "arc_challenge": "arc/ARC-Challenge-Test.jsonl",
               "openbookqa": "openbookqa/test.jsonl"}[task]
        r = _jsonl(rel)[0]
        q = r["question"]
        context = q["stem"] if task == "openbookqa" else f"Question: {q['stem']}\nAnswer:"
        assert args == _mc_args(context, [c["text"] for c in q["choices"]])
        assert target == [c["label"] for c in q["choices"]].index(r["answerKey"])
        assert len(obj.eval_docs) == len(_jsonl(rel))
    elif task == "hellaswag":
        with bz2.open(DATA / "hellaswag" / "hellaswag_val_full.txt.bz2", "rt", encoding="utf-8") as fh:
            head, gold, *endings = [next(fh).rstrip("\n") for _ in range(6)]
        assert head == "Roof shingle removal: A man is sitting on a roof. he"
        # the harness's query capitalizes ctx_b ("he" -> "He")
        assert args == _mc_args("Roof shingle removal: A man is sitting on a roof. He", endings)
        assert int(target) == int(gold) and len(obj.eval_docs) == 10042
    elif task == "winogrande":
        from lm_eval.tasks.winogrande import preprocess_winogrande as theirs

        r, y = _jsonl("winogrande/dev.jsonl")[0], _lines("winogrande/dev-labels.lst")[0]
        i = r["sentence"].index("_")
        rest = " " + r["sentence"][i + 1:].strip()
        assert args == [(r["sentence"][:i] + r["option1"], rest), (r["sentence"][:i] + r["option2"], rest)]
        assert obj.doc_to_text(doc) == int(y) - 1
        for d in list(obj.eval_docs)[:50]:
            assert obj.doc_to_text(d) == theirs.doc_to_text(d)
            assert obj.doc_to_target(d) == theirs.doc_to_target(d)
            assert obj.doc_to_choice(d) == theirs.doc_to_choice(d)
    elif task == "lambada_openai":
        text = _jsonl("lambada/lambada_test.jsonl")[0]["text"]
        context, _, word = text.rpartition(" ")
        assert args == [(context, " " + word)] and len(obj.eval_docs) == 5153
    elif task == "boolq":
        r = _jsonl("boolq/val.jsonl")[0]
        assert args == _mc_args(f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", ["no", "yes"])
        assert target == {"false": 0, "true": 1}[str(r["label"]).lower()]
    else:  # pragma: no cover
        raise AssertionError(f"no raw-file check for {task}")


def test_hellaswag_context_capitalization():
    cap = offline_utils.capitalize_ctx_b
    assert cap("Canoeing: Two women are shown. the child and a Different man") == \
        "Canoeing: Two women are shown. The child and a different man"  # str.capitalize, as the harness
    assert cap("Youth: How to avoid raising an emotional eater. Eat meals at the table.") == \
        "Youth: How to avoid raising an emotional eater. Eat meals at the table."
    assert cap('Label: They run!" a volunteer named " irene "') == 'Label: They run!" A volunteer named " irene "'
    pre = offline_utils.hellaswag_preprocess
    assert pre("Family Life: Ask the toddler [www.kiddio.org] to  help.") == "Family Life: Ask the toddler to help."
