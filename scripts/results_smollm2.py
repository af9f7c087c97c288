#!/usr/bin/env python
"""Regenerate a model's perplexity table (WikiText-2 test, seqlen 2048; or another text with --data).

The model is SmolLM2-135M-Instruct unless ``--model`` names another known offline model
(``quadllm models``); its checkpoints go to ``runs/<model>`` and its table to
``results/<model>_wikitext2`` unless ``--work`` and ``--out`` say otherwise.

Every quantized row is produced by the CLI (`quadllm quantize ...`, calibration from
`wiki.valid.tokens`, never a test split) in its own process, so its time and peak memory are its
own; then all checkpoints are loaded with `quadllm.load` and evaluated window by window against the
full-precision model, which runs once per window. Writes results/smollm2_wikitext2.{json,md}.

    python scripts/results_smollm2.py                    # all 148 windows (hours on 2 CPU cores)
    python scripts/results_smollm2.py --max-windows 40   # a subset, labelled as such
    python scripts/results_smollm2.py --data ptb --out results/smollm2_ptb   # same checkpoints, PTB test
    python scripts/results_smollm2.py --model qwen2.5-coder-0.5b --max-windows 16 --resume
    python scripts/results_smollm2.py --table ablation --max-windows 8   # the accuracy techniques
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import quadllm  # noqa: E402
from quadllm import load  # noqa: E402
from quadllm.arch import get_adapter  # noqa: E402
from quadllm.cli.app import build_parser  # noqa: E402
from quadllm.cli.common import config_from_args  # noqa: E402
from quadllm.cli.invocation import child_argv, shown  # noqa: E402
from quadllm.config import RECIPE_OFF, QuantConfig  # noqa: E402
from quadllm.core.affine import affine_macs  # noqa: E402
from quadllm.data.text import load_text, tokenize_windows  # noqa: E402
from quadllm.evaluation.perplexity import evaluate_many  # noqa: E402
from quadllm.evaluation.speed import machine_description  # noqa: E402
from quadllm.io.checkpoint import read_meta  # noqa: E402
from quadllm.io.files import cache_root  # noqa: E402
from quadllm.io.registry import DEFAULT_MODEL, lookup  # noqa: E402
from quadllm.io.sources import fp16_size_bytes, load_model  # noqa: E402

#: QUAD as published (arXiv 2503.19353): the flags that turn off what quadllm's default adds (RECIPE_OFF)
PAPER = [f for key, off in RECIPE_OFF.items() for f in
         ([f"--{'' if off else 'no-'}{key.replace('_', '-')}"] if isinstance(off, bool)
          else [f"--{key.replace('_', '-')}", str(off)])]

ROWS = [
    # name, CLI flags
    ("RTN W4A4", ["--method", "rtn"]),
    ("QuaRot W4A4", ["--method", "quarot"]),
    ("QUAD W4A4 r=16", ["--method", "quad", "--rank", "16", *PAPER]),
    ("QUAD W4A4 r=32", ["--method", "quad", "--rank", "32", *PAPER]),
    ("QUAD W4A4 r=64", ["--method", "quad", "--rank", "64", *PAPER]),
    ("QUAD W4A4A8 r=64", ["--method", "quad", "--rank", "64", "--mode", "w4a4a8", *PAPER]),
    ("QuaRot W4A4 KV4", ["--method", "quarot", "--kv-bits", "4"]),
    ("QUAD W4A4 r=64 KV4", ["--method", "quad", "--rank", "64", "--kv-bits", "4", *PAPER]),
]

BASE = ["--method", "quad", "--rank", "64", *PAPER]
#: every row calibrates on this unless its flags name another ``--calib``
CALIB = "wikitext2"
CODE_CALIB = "pysource"
CODE_CALIB_ROW = "(code calibration)"
#: the papers' calibration size (128 windows of 2048), for rows that name it; the others use the
#: script's ``--calib-samples`` x ``--calib-seqlen``
BIG_CALIB = ["--calib-samples", "128", "--calib-seqlen", "2048"]
BIG_CALIB_ROW = "(128 x 2048 calibration)"


def calibration_source(names) -> str:
    """What the rows named ``names`` calibrate on, for a table's header."""
    code = [n for n in names if n.endswith(CODE_CALIB_ROW)]
    big = [n for n in names if n.endswith(BIG_CALIB_ROW)]
    return ("`wiki.valid.tokens`" + (f" (rows marked {CODE_CALIB_ROW}: the embedded Python standard-library "
                                     f"source, `--calib {CODE_CALIB}`)" if code else "")
            + (f"; rows marked {BIG_CALIB_ROW} draw 128 windows of 2048 (262,144 tokens) from the "
               "same text, which is hardly longer, so windows overlap: the papers draw them from the larger "
               "train split, which ../shared/data does not hold" if big else ""))
#: the accuracy techniques, each alone on top of QUAD W4A4 r=64 (``--table ablation``), then
#: together; the first row is the base every speed ratio is taken against (a later flag overrides
#: PAPER's)
ABLATION_ROWS = [
    ("QUAD W4A4 r=64", BASE),
    ("QUAD W4A4 r=64 + clip search", [*BASE, "--a-clip-search"]),
    ("QUAD W4A4 r=64 + down-rank 64", [*BASE, "--down-rank", "64"]),
    ("QUAD W4A4 r=64 + asymmetric activations", [*BASE, "--act-asym"]),
    ("QUAD W4A4 r=64 + o-rank 8", [*BASE, "--o-rank", "8"]),
    # GPTAQ's whole least-squares correction (the first implementation's), then its authors' share
    ("QUAD W4A4 r=64 + GPTAQ", [*BASE, "--weights", "gptaq", "--gptaq-alpha", "1"]),
    ("QUAD W4A4 r=64 + GPTAQ 0.25", [*BASE, "--weights", "gptaq", "--gptaq-alpha", "0.25"]),
    ("QUAD W4A4 r=64 + down smoothing 0.5", [*BASE, "--down-smooth", "0.5"]),
    # cumulative: every technique without run-time cost (GPTAQ with alpha 1 was worse than the base
    # on the screening windows, so the later rows leave it out), then with the two that have one
    ("QUAD W4A4 r=64 + clip + o-rank 8 + GPTAQ + smoothing",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--weights", "gptaq", "--gptaq-alpha", "1", "--down-smooth", "0.5"]),
    ("QUAD W4A4 r=64 + clip + o-rank 8 + smoothing",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5"]),
    # the default's recipe without the smoothing, whose scales (fitted on WikiText-2) cost Qwen2.5-Coder
    # HumanEval points when alone
    ("QUAD W4A4 r=64 + clip + o-rank 8", [*BASE, "--a-clip-search", "--o-rank", "8"]),
    ("QUAD W4A4 r=64 + clip + o-rank 8 + smoothing + down-rank 64 + asym",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5", "--down-rank", "64", "--act-asym"]),
    # the clip ratios then trained block by block against the float layer's output (32 steps: 8 passes
    # over the 4 calibration batches) on top of the default's recipe, with the plain squared error
    # (measured first) and each token's error relative to its norm (the default), then alone (from --a-clip 0.9)
    ("QUAD W4A4 r=64 + clip + o-rank 8 + smoothing + learned clip (MSE)",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5", "--a-clip-learn", "32",
      "--a-clip-learn-loss", "mse"]),
    ("QUAD W4A4 r=64 + clip + o-rank 8 + smoothing + learned clip",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5", "--a-clip-learn", "32"]),
    ("QUAD W4A4 r=64 + learned clip", [*BASE, "--a-clip-learn", "32"]),
    # issue 19's item 7: an affine transform of every quantized input per layer, trained against the
    # float layer's output (FlatQuant-style) before GPTQ, on top of the default's recipe, then alone
    ("QUAD W4A4 r=64 + clip + o-rank 8 + smoothing + learned transform",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5", "--learn-transform", "32"]),
    ("QUAD W4A4 r=64 + learned transform", [*BASE, "--learn-transform", "32"]),
    # item 1's last part: each weight row's clip ratio trained against the float layer's output from the
    # MSE search's (OmniQuant's learnable weight clipping), on top of the default's recipe, then alone
    ("QUAD W4A4 r=64 + clip + o-rank 8 + smoothing + learned weight clip",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5", "--w-clip-learn", "32"]),
    ("QUAD W4A4 r=64 + learned weight clip", [*BASE, "--w-clip-learn", "32"]),
    # the same with round-to-nearest weights, which the ratios are trained for, against RTN's MSE search
    ("QUAD W4A4 r=64 RTN", [*BASE, "--weights", "rtn"]),
    ("QUAD W4A4 r=64 RTN + learned weight clip", [*BASE, "--weights", "rtn", "--w-clip-learn", "32"]),
    # item 2's other choice: o_proj's principal coordinates at INT8 (ResQ's) instead of full precision
    ("QUAD W4A4 r=64 + clip + o-rank 8 INT8 + smoothing",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--o-rank-bits", "8", "--down-smooth", "0.5"]),
    ("QUAD W4A4 r=64 + o-rank 8 INT8", [*BASE, "--o-rank", "8", "--o-rank-bits", "8"]),
    # the default's recipe with INT8 inputs to o_proj and down_proj (the main table's QUAD W4A4A8 r=64 beside it)
    ("QUAD W4A4A8 r=64 + clip + o-rank 8 + smoothing",
     [*BASE, "--mode", "w4a4a8", "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5"]),
    # a code model calibrated on code (the embedded Python source) instead of WikiText-2: the default's
    # recipe, then QUAD as published, for HumanEval (the recipe's clip ratios, smoothing scales and V basis
    # are all fitted to the calibration text)
    (f"QUAD W4A4 r=64 + clip + o-rank 8 + smoothing {CODE_CALIB_ROW}",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5", "--calib", CODE_CALIB]),
    (f"QUAD W4A4 r=64 {CODE_CALIB_ROW}", [*BASE, "--calib", CODE_CALIB]),
    # item 6: the papers' calibration size against the 32 x 512 every other row uses
    (f"QUAD W4A4 r=64 {BIG_CALIB_ROW}", [*BASE, *BIG_CALIB]),
    (f"QUAD W4A4 r=64 + clip + o-rank 8 + smoothing {BIG_CALIB_ROW}",
     [*BASE, "--a-clip-search", "--o-rank", "8", "--down-smooth", "0.5", *BIG_CALIB]),
]
TABLES = {"main": ROWS, "ablation": ABLATION_ROWS}

log = logging.getLogger("results")


def slug(name: str) -> str:
    return name.lower().replace(" ", "-").replace("=", "")


def model_slug(model: str) -> str:
    """The short name of a known model in file names: ``smollm2`` for the default (the names the
    first results were written under), the registry name otherwise."""
    known = lookup(model)
    if known is None:
        raise SystemExit(f"--model {model!r} is not a known offline model (see `quadllm models`)")
    return "smollm2" if known.name == DEFAULT_MODEL else known.name


def file_slug(model: str) -> str:
    """:func:`model_slug` without dots, for file names (the scripts add ``.json`` and ``.md`` with
    ``Path.with_suffix``, which would cut a name such as ``qwen2.5-coder-0.5b`` at its first dot)."""
    return model_slug(model).replace(".", "_")


def results_stem(model: str, suffix: str) -> Path:
    """``results/<model>_<suffix>`` (:func:`file_slug`)."""
    return ROOT / "results" / f"{file_slug(model)}_{suffix}"


def model_title(model: str) -> str:
    return lookup(model).title


def quantize_row(name: str, flags: list[str], args) -> dict:
    out = Path(args.work) / slug(name)
    weights = [] if "--weights" in flags else ["--weights", "gptq"]  # GPTQ unless the row says otherwise
    calib = [] if "--calib" in flags else ["--calib", CALIB]
    size = [] if "--calib-samples" in flags else ["--calib-samples", str(args.calib_samples),
                                                  "--calib-seqlen", str(args.calib_seqlen)]
    # quadllm's own layout, which every row of the tables was measured in (the stock layout's FP16 tables
    # make a neighbouring model, results/smollm2_stock_layout.md)
    cmd = [*child_argv("quantize", "--model", args.model), *flags, *weights, *calib,
           *size, "--seed", str(args.seed), "--layout", "quadllm", "--out", str(out), "-q"]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if out.exists() and not args.force:
        check_reused(name, out, expected_config(cmd[3:]))
    return run_cli_cached(name, cmd, out, args.force)


def expected_config(quantize_argv: list[str]) -> dict:
    """The configuration ``quadllm QUANTIZE_ARGV`` gives with this checkout's code (its defaults)."""
    return config_from_args(QuantConfig, build_parser().parse_args(quantize_argv)).to_dict()


def check_reused(name: str, out: Path, expected: dict) -> None:
    """Stop unless the checkpoint at ``out`` was made with ``expected`` (a checkpoint made before a
    default changed would otherwise stand in for a row it no longer is)."""
    made = QuantConfig.from_dict(read_meta(out)["quant_config"]).to_dict()
    # ``extra`` records what the run found (the calibration text's origin), not a setting
    wrong = {k: (made.get(k), v) for k, v in expected.items() if k != "extra" and made.get(k) != v}
    if wrong:
        raise SystemExit(f"{name}: {out} was made with " + ", ".join(
            f"{k}={got!r}" for k, (got, _) in sorted(wrong.items())) + "; the row now gives " + ", ".join(
            f"{k}={want!r}" for k, (_, want) in sorted(wrong.items())) + " (rerun with --force or remove it)")


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """The options that decide which checkpoints the results scripts make or reuse."""
    p.add_argument("--model", default="default", help="a known offline model (`quadllm models`)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--work", default=None, help="where checkpoints are written (default: runs/<model>)")


def resolve_paths(args: argparse.Namespace, suffix: str | None = None) -> None:
    """Fill in the default ``--work`` (and ``--out``, as results/<model>_<suffix>) for ``--model``."""
    if args.work is None:
        args.work = str(ROOT / "runs" / model_slug(args.model))
    if suffix is not None and getattr(args, "out", None) is None:
        args.out = str(results_stem(args.model, suffix))


def quantize_args(args: argparse.Namespace) -> argparse.Namespace:
    """What :func:`quantize_row` needs, from another script's arguments (existing rows are reused)."""
    resolve_paths(args)
    return argparse.Namespace(model=args.model, work=args.work, calib_samples=args.calib_samples,
                              calib_seqlen=args.calib_seqlen, seed=args.seed, data_dir=args.data_dir, force=False)


def portable(obj):
    """``obj`` (JSON-able) with this checkout's absolute paths written relative to it (``.``), to
    the data beside it (``../shared``) and to quadllm's cache (``$QUADLLM_CACHE``), so results
    files name no machine's directories."""
    text = json.dumps(obj, default=str)
    for path, short in ((ROOT.parent / "shared", "../shared"), (ROOT, "."), (cache_root(), "$QUADLLM_CACHE")):
        text = text.replace(json.dumps(str(path))[1:-1], short)
    return json.loads(text)


def _exit_on_signal(signum: int, frame) -> None:
    # SIGTERM would otherwise end this process without running `finally`, leaving a child
    # `quadllm quantize` working on for an hour; as SystemExit it passes through run_child's cleanup.
    raise SystemExit(128 + signum)


def _die_with_parent() -> None:
    # In the child, before exec: Linux sends SIGTERM when the parent dies, even by SIGKILL.
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def run_child(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``, except that the child does not
    outlive this script: it runs in its own process group, which is terminated when this script
    is interrupted (Ctrl-C, SIGTERM, SIGHUP) or exits, and on Linux it also dies with its parent."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) is signal.SIG_DFL:
                signal.signal(sig, _exit_on_signal)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd if cwd is not None else ROOT, start_new_session=True,
                            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)
    try:
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_cli_cached(name: str, cmd: list[str], out: Path, force: bool) -> dict:
    """Run a `quadllm` CLI command in its own process (so its time and peak memory are its own)
    and keep its JSON summary beside ``out``; reuse both when ``out`` exists, unless ``force``."""
    summary_file = out.parent / f"{out.name}.summary.json"
    if out.exists() and summary_file.is_file() and not force:
        log.info("%s: reusing %s", name, out)
        return json.loads(summary_file.read_text())
    log.info("%s: %s", name, " ".join(cmd[1:]))
    r = run_child(cmd)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed:\n{r.stderr[-4000:]}")
    summary = json.loads(r.stdout)
    summary["command"] = shown(cmd)
    summary = portable(summary)
    summary_file.write_text(json.dumps(summary, indent=2))
    return summary


def run_cli(label: str, args: list[str], ok: tuple[int, ...] = (0,)) -> dict:
    """``quadllm ARGS`` in its own process, timed: ``{command, exit_code, wall_seconds, stdout}``;
    an exit code outside ``ok`` stops the script with the command's stderr."""
    cmd = child_argv(*args)
    log.info("%s: %s", label, shown(cmd))
    t0 = time.perf_counter()
    r = run_child(cmd)
    seconds = round(time.perf_counter() - t0, 1)
    if r.returncode not in ok:
        raise SystemExit(f"{label} failed (exit {r.returncode}):\n{r.stderr[-4000:]}")
    return {"command": shown(cmd), "exit_code": r.returncode, "wall_seconds": seconds,
            "stdout": r.stdout}


def structure_cost(fp, meta: dict) -> dict:
    """What a checkpoint adds beyond today's QUAD W4A4 in full-precision width and online work,
    from its recorded configuration: ``{rank, down_rank, o_columns, online_macs_per_token,
    online_share}`` (``o_columns``: o_proj's input columns kept in full precision, ``o_rank`` per
    head, or at ``o_bits`` when given; online work: the down_proj split's two products with P, and the learned transforms, each
    applied by every linear that reads it; the share is of the multiply-adds per token of the
    original model's decoder linears)."""
    cfg = meta["quant_config"]
    adapter = get_adapter(fp)
    layers = adapter.layers(fp)
    k = int(cfg.get("down_rank", 0))
    d_ff = int(fp.config.intermediate_size)
    o_cols = int(cfg.get("o_rank", 0)) * int(fp.config.num_attention_heads)
    macs = 2 * k * d_ff * len(layers)
    if QuantConfig.from_dict(cfg).learns_transforms:
        readers = sum(len(group.linears) for group in adapter.reader_groups)
        per_layer = readers * affine_macs(adapter.hidden_size) + affine_macs(d_ff)
        per_layer += affine_macs(adapter.num_heads * adapter.head_dim - o_cols)
        macs += per_layer * len(layers)
    linear = sum(m.in_features * m.out_features for layer in layers for m in layer.modules()
                 if isinstance(m, torch.nn.Linear))
    out = {"rank": int(cfg["rank"]), "down_rank": k, "o_columns": o_cols, "online_macs_per_token": macs,
           "online_share": round(macs / linear, 5)}
    if int(cfg.get("o_rank_bits", 16)) < 16:  # those columns at INT8, not in full precision
        out["o_bits"] = int(cfg["o_rank_bits"])
    return out


def time_rows(models: dict, vocab: int, tokens: int, repeat: int) -> dict:
    """Per model (on its backend already): the median ms of one prefill of ``tokens`` tokens (batch
    1, no cache) and of the middle layer's o_proj and down_proj on ``tokens`` rows, the models taking
    turns in every round so that a slow spell of the machine hits all of them."""
    import statistics

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, tokens), generator=g)
    any_model = next(iter(models.values()))
    adapter = get_adapter(any_model)
    mid = len(adapter.layers(any_model)) // 2
    inputs = {}
    calls = {}
    for name, m in models.items():
        layer = adapter.layers(m)[mid]
        o, down = layer.get_submodule(adapter.o_proj), layer.get_submodule(adapter.down_proj)
        for key, lin in (("o_proj", o), ("down_proj", down)):
            # a quantized linear's input width is its online transform's (QUAD's widened stream); a
            # plain float linear (the bfloat16 reference) reads its own width in its own dtype
            n = getattr(getattr(lin, "transform", None), "in_features", lin.in_features)
            dtype = lin.weight.dtype if isinstance(lin, torch.nn.Linear) else torch.float32
            inputs.setdefault(key, torch.randn(tokens, n, generator=g).to(dtype))
        calls[name] = {"prefill": (lambda m=m: m(input_ids=ids, use_cache=False)),
                       "o_proj": (lambda o=o: o(inputs["o_proj"])), "down_proj": (lambda d=down: d(inputs["down_proj"]))}
    times: dict = {name: {k: [] for k in c} for name, c in calls.items()}
    with torch.no_grad():
        for rnd in range(repeat + 1):  # round 0 warms up
            for name, c in calls.items():
                for key, fn in c.items():
                    t0 = time.perf_counter()
                    fn()
                    if rnd:
                        times[name][key].append(1000 * (time.perf_counter() - t0))
    return {name: {f"{k}_ms": round(statistics.median(v), 2) for k, v in t.items()} for name, t in times.items()}


def speed_step(rows: list, args, fp) -> dict:
    """The cost columns of the ablation: each checkpoint of ``rows`` that exists (the first row's
    always: the base of the ratios) on ``cpu-int8`` (prefill and the middle
    layer's o_proj and down_proj, :func:`time_rows`), the original in bfloat16 beside them, and
    :func:`structure_cost`."""
    from quadllm.backends import place

    models, costs = {}, {}
    for name, _ in rows:
        if not (Path(args.work) / slug(name)).is_dir() and name != rows[0][0]:
            continue
        m, _, meta = load(Path(args.work) / slug(name))
        place(m, "cpu-int8")
        models[name] = m
        costs[name] = structure_cost(fp, meta)
    log.info("timing %d checkpoints on cpu-int8 (%d tokens, %d rounds)", len(models), args.speed_tokens,
             args.speed_repeat)
    timed = time_rows(models, int(fp.config.vocab_size), args.speed_tokens, args.speed_repeat)
    bf16 = copy.deepcopy(fp).to(torch.bfloat16)
    ref = time_rows({"bf16": bf16}, int(fp.config.vocab_size), args.speed_tokens, args.speed_repeat)["bf16"]
    return {"rows": {n: {**costs[n], **timed[n]} for n in models}, "bf16_prefill_ms": ref["prefill_ms"],
            "tokens": args.speed_tokens, "rounds": args.speed_repeat, "threads": torch.get_num_threads(),
            "date": dt.date.today().isoformat(), "machine": machine_description(),
            "command": "python scripts/results_smollm2.py " + shlex.join(sys.argv[1:])}


def fmt_md(results: dict, meta: dict) -> str:
    lines = [
        f"# {meta.get('model_title', 'SmolLM2-135M-Instruct')}"
        + (": the accuracy techniques" if meta.get("table") == "ablation" else "") + f" on {meta['data_title']}",
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']})"
        + ("; rows kept from earlier runs of " + ", ".join(f"`{c}`" for c in meta["earlier_commands"])
           if meta.get("earlier_commands") else "") + ".",
        f"Perplexity over {meta['windows']} of {meta['windows_total']} non-overlapping windows of "
        f"{meta['seqlen']} tokens ({meta['tokens']} predicted tokens); KL is the mean KL(FP ‖ quantized) per "
        "token and top-1 the share of positions where both predict the same next token, on the same windows.",
        f"Weights: INT4 GPTQ per channel (MSE clipping); activations per token, clip {meta['a_clip']}. "
        f"Calibration: {meta['calib_samples']} x {meta['calib_seqlen']} tokens from {calibration_source(results)}, "
        f"seed {meta['seed']}. Quantization time and peak memory are those of the `quadllm quantize` process "
        "(model loading included); size is the checkpoint directory against the FP16 size of the original.",
        "",
        "| model | ppl | KL | top-1 | quantize s | peak MB | size MB | size vs FP16 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    runs = speed_runs(meta)
    if meta.get("table") == "ablation":
        lines[-2:] = ["| model | ppl | KL | top-1 | FP columns: residual + o_proj + down_proj | online MACs/token (share) | "
                      "cpu-int8 prefill vs base | o_proj vs base | down_proj vs base | quantize s |",
                      "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    uneven = len({r["windows"] for r in results.values()}) > 1
    if uneven:  # an evaluation in progress: say how far each row is
        lines[-2] = lines[-2].replace("| model |", "| model | windows |")
        lines[-1] = lines[-1].replace("| --- |", "| --- | ---: |", 1)
    for name, r in results.items():
        q = r.get("quantize", {})
        kl = "-" if name == "FP" else f"{r['kl']:.4f}"
        top1 = "-" if name == "FP" else f"{100 * r['top1_agreement']:.1f}%"
        done = f" {r['windows']} |" if uneven else ""
        if meta.get("table") == "ablation":
            lines.append(f"| {name} |{done} {r['ppl']:.2f} | {kl} | {top1} | " + ablation_cells(name, runs)
                         + f" {q.get('quantize_seconds', '-')} |")
            continue
        lines.append(
            f"| {name} |{done} {r['ppl']:.2f} | {kl} | {top1} | {q.get('quantize_seconds', '-')} | "
            f"{q.get('peak_memory_mb', '-')} | {q.get('checkpoint_mb', meta['fp16_mb'])} | "
            f"{q.get('size_vs_fp16', 1.0)} |")
    for i, speed in enumerate(runs):
        first = next(iter(speed["rows"]))
        which = "Cost columns" if len(runs) == 1 else (
            "Cost columns of " + ", ".join(f"`{n}`" for n in speed["rows"] if n not in
                                           {r for newer in runs[:i] for r in newer["rows"]}))
        lines += ["", f"{which}: `{speed['command']}` on {speed['date']} ({speed['machine']}, "
                  f"{speed['threads']} threads): every checkpoint on `cpu-int8`, timed in turns over "
                  f"{speed['rounds']} rounds after a warm-up, medians; prefill of {speed['tokens']} tokens "
                  f"(batch 1), o_proj and down_proj of the middle layer on {speed['tokens']} rows; ratios are "
                  f"time against `{first}` in the same run (above 1: slower). The original in bfloat16 "
                  f"prefills in {speed['bf16_prefill_ms']:.0f} ms, `{first}` on cpu-int8 in "
                  f"{speed['rows'][first]['prefill_ms']:.0f} ms."]
    if runs:
        lines += ["", "Online MACs: multiply-adds per token beyond today's QUAD (the down_proj split's products "
                  "with P, the learned transforms), and their share of the decoder linears' own."]
    if meta["windows"] < meta["windows_total"]:
        if "--max-windows" in meta["command"]:
            lines += ["", f"**Subset**: {meta['windows']} of {meta['windows_total']} windows; rerun without "
                      "`--max-windows` for the papers' full protocol."]
        else:
            lines += ["", f"**In progress**: the full run has covered {meta['windows']} of {meta['windows_total']} "
                      "windows so far; `python scripts/results_smollm2.py --resume` continues it from there."]
    return "\n".join(lines) + "\n"


def speed_runs(meta: dict) -> list[dict]:
    """The timing runs of an ablation's cost columns, newest first (``speed``, then ``speed_earlier``)."""
    return ([meta["speed"]] if meta.get("speed") else []) + list(meta.get("speed_earlier", []))


def merge_speed(meta: dict, new: dict) -> None:
    """Make ``new`` the newest timing run of ``meta``, keeping each earlier run that timed a row the
    newer ones did not (each row's cells come from the newest run that timed it, as ratios to that
    run's own first row)."""
    kept, covered = [new], set(new["rows"])
    for run in speed_runs(meta):
        if set(run["rows"]) - covered:
            kept.append(run)
            covered |= set(run["rows"])
    meta["speed"], meta["speed_earlier"] = kept[0], kept[1:]


def ablation_cells(name: str, runs: list[dict]) -> str:
    """The cost cells of one ablation row from the newest of ``runs`` (:func:`speed_runs`) that timed
    it (dashes until one has)."""
    speed = next((run for run in runs if name in run["rows"]), None)
    if speed is None:
        return "- | - | - | - | - |"
    c, first = speed["rows"][name], speed["rows"][next(iter(speed["rows"]))]
    width = str(c["rank"]) + (f" + o {c['o_columns']}" if c.get("o_columns") else "") + (
        f" INT{c['o_bits']}" if c.get("o_columns") and c.get("o_bits") else "") + (
        f" + down {c['down_rank']}" if c["down_rank"] else "")
    macs = f"{c['online_macs_per_token'] / 1e6:.2f} M ({100 * c['online_share']:.1f}%)" \
        if c["online_macs_per_token"] else "0"
    ratio = {k: f"{c[k] / first[k]:.2f}" for k in ("prefill_ms", "o_proj_ms", "down_proj_ms")}
    return f"{width} | {macs} | {ratio['prefill_ms']} | {ratio['o_proj_ms']} | {ratio['down_proj_ms']} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--seqlen", type=int, default=2048)
    add_checkpoint_args(p)
    p.add_argument("--data", default="wikitext2", help="evaluation text (wikitext2, ptb, a .txt file)")
    p.add_argument("--table", choices=TABLES, default="main",
                   help="which rows: the main table, or the accuracy techniques (results/<model>_ablation)")
    p.add_argument("--rows", default=None, help="comma-separated row names to run (default: all of --table)")
    p.add_argument("--out", default=None, help="results file stem (default: results/<model>_wikitext2)")
    p.add_argument("--force", action="store_true", help="re-quantize rows whose checkpoint exists")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted evaluation from the windows already in the output JSON")
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON and stop")
    p.add_argument("--quantize-only", action="store_true", help="make the checkpoints and stop")
    p.add_argument("--group", type=int, default=9, help="rows evaluated together (all in memory at once)")
    p.add_argument("--save-every", type=int, default=5, help="write the partial results every N windows")
    p.add_argument("--speed-only", action="store_true",
                   help="ablation: time the checkpoints (the cost columns) into the existing results and stop")
    p.add_argument("--speed-tokens", type=int, default=2048, help="ablation timing: prefill tokens")
    p.add_argument("--speed-repeat", type=int, default=5, help="ablation timing: rounds")
    p.add_argument("--no-speed", action="store_true",
                   help="ablation: keep the cost columns of the results resumed from instead of timing again")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    resolve_paths(args, "wikitext2" if args.table == "main" else "ablation")
    table = TABLES[args.table]
    if args.render_only:
        saved = portable(json.loads(Path(args.out).with_suffix(".json").read_text()))
        Path(args.out).with_suffix(".json").write_text(json.dumps(saved, indent=2))
        Path(args.out).with_suffix(".md").write_text(fmt_md(saved["rows"], saved["meta"]))
        print(Path(args.out).with_suffix(".md").read_text())
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)

    unknown = sorted(set(args.rows.split(",")) - {name for name, _ in table}) if args.rows else []
    if unknown:
        raise SystemExit(f"--rows {unknown} not in the {args.table} table: {', '.join(n for n, _ in table)}")
    rows = [r for r in table if args.rows is None or r[0] in args.rows.split(",")]
    if args.speed_only and rows[0] != table[0]:
        rows = [table[0], *rows]  # the base of the ratios is timed in every run
    summaries = {name: quantize_row(name, flags, args) for name, flags in rows}

    if args.quantize_only:
        return
    fp, tok, _ = load_model(args.model)
    if args.speed_only:
        if args.table != "ablation":
            raise SystemExit("--speed-only times the ablation's checkpoints (--table ablation)")
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        merge_speed(saved["meta"], portable(speed_step(rows, args, fp)))
        Path(args.out).with_suffix(".json").write_text(json.dumps(saved, indent=2))
        Path(args.out).with_suffix(".md").write_text(fmt_md(saved["rows"], saved["meta"]))
        print(Path(args.out).with_suffix(".md").read_text())
        return
    source = load_text(args.data, "eval", data_dir=args.data_dir)
    text = source.text
    all_windows = tokenize_windows(tok, text, args.seqlen)
    windows = all_windows[: args.max_windows] if args.max_windows else all_windows
    meta = {
        "command": "python scripts/results_smollm2.py " + shlex.join(sys.argv[1:]),
        "model": args.model, "model_title": model_title(args.model),
        "data": source.origin,
        "data_title": {"wikitext2": "WikiText-2 test", "ptb": "PTB test"}.get(args.data, args.data),
        "date": dt.date.today().isoformat(),
        "machine": machine_description(),
        "windows": int(windows.shape[0]), "windows_total": int(all_windows.shape[0]), "seqlen": args.seqlen,
        "calib_samples": args.calib_samples, "calib_seqlen": args.calib_seqlen, "seed": args.seed,
        "a_clip": quadllm.QuantConfig().a_clip, "fp16_mb": round(fp16_size_bytes(fp) / 1e6, 2),
        "quadllm_version": quadllm.__version__, "table": args.table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    order = ["FP"] + [name for name, _ in table]

    def write(results: dict) -> None:
        for name, r in results.items():
            if name in summaries:
                r["quantize"] = summaries[name]
        ordered = {n: results[n] for n in order if n in results}
        m = {**meta, "windows": min(r["windows"] for r in ordered.values()),
             "tokens": min(r["tokens"] for r in ordered.values())}
        saved = portable({"meta": m, "rows": ordered})
        out.with_suffix(".json").write_text(json.dumps(saved, indent=2))
        out.with_suffix(".md").write_text(fmt_md(saved["rows"], saved["meta"]))

    results: dict = {}
    if args.resume and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        now = portable(meta)
        same = all(old["meta"][k] == now[k] for k in ("windows_total", "seqlen", "calib_samples",
                                                      "calib_seqlen", "seed", "data", "model") if k in old["meta"])
        if not same:
            raise SystemExit("--resume: the existing results were made with other settings")
        # A row not quantized in this run keeps the summary of the run that made its checkpoint.
        results = {name: {k: v for k, v in r.items() if k != "quantize" or name not in summaries}
                   for name, r in old["rows"].items()}
        earlier = [*old["meta"].get("earlier_commands", []), old["meta"]["command"]]
        meta["earlier_commands"] = [c for i, c in enumerate(earlier) if c != meta["command"] and c not in earlier[:i]]
        for key in ("speed", "speed_earlier"):  # timed in earlier runs (their commands are in them)
            if key in old["meta"]:
                meta[key] = old["meta"][key]
        if args.force:  # rows quantized again: their earlier windows scored another checkpoint
            for name, _ in rows:
                results.pop(name, None)
        log.info("resuming: %s", {n: r["windows"] for n, r in results.items()})
    # Rows are evaluated a few at a time (every model of a group is in memory together, and the
    # reference runs once per window per group); a row keeps its windows across groups and runs.
    wanted = ["FP"] + [name for name, _ in rows]
    pending = [n for n in wanted if results.get(n, {}).get("windows", 0) < windows.shape[0]]
    t0 = time.perf_counter()
    for g in range(0, len(pending), args.group):
        group = pending[g:g + args.group]
        done = {results[n]["windows"] for n in group if n in results}
        resume = {n: results[n] for n in group} if len(done) == 1 and all(n in results for n in group) else None
        models = {n: fp if n == "FP" else load(Path(args.work) / slug(n))[0] for n in group}
        log.info("evaluating %s on %d windows%s", ", ".join(group), windows.shape[0],
                 f" (from window {done.pop()})" if resume else "")
        part = evaluate_many(models, windows, reference=fp, resume=resume,
                             on_window=lambda i, r: write({**results, **r}) if (i + 1) % args.save_every == 0 else None)
        results.update(part)
        write(results)
        del models
    log.info("evaluated %d rows on %d windows in %.0f s", len(pending), windows.shape[0], time.perf_counter() - t0)
    if args.table == "ablation" and not args.no_speed:
        merge_speed(meta, speed_step(table, args, fp))
        write(results)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
