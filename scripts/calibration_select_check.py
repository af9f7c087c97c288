"""Calibration chosen for the domain, measured on a domain shift (issue 21, part 3).

The served traffic is Python source code (``pysource``'s held-out modules, which ``quadllm drift``
flags against WikiText-2). Its windows of 2048 tokens are shuffled with the seed and dealt out,
disjoint: ``--eval-windows`` for the evaluation and three more cut into 512-token windows for the
user's sample (the selection's target and its KL probe). ``quadllm calibrate-select``'s selection
then picks a mixture of WikiText-2 (calibration split), the Python sources of other modules
(``pysource`` calibration split) and Python's documentation (``pydoc``). Three checkpoints are
quantized with the default recipe, calibrated on WikiText-2 alone, on code alone and on the
selected mixture, and each is evaluated on held-out code and on WikiText-2 test.

    python scripts/calibration_select_check.py --model smollm2 --eval-windows 8
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

import quadllm  # noqa: E402
from quadllm.analysis.calibration_select import select_calibration  # noqa: E402
from quadllm.cli.invocation import child_argv  # noqa: E402
from quadllm.data.text import load_text, sample_calibration, tokenize_windows  # noqa: E402
from quadllm.evaluation.perplexity import evaluate_many  # noqa: E402
from quadllm.evaluation.speed import machine_description  # noqa: E402
from quadllm.io.checkpoint import is_checkpoint, read_meta  # noqa: E402
from quadllm.io.files import atomic_write  # noqa: E402
from quadllm.io.sources import load_model  # noqa: E402

log = logging.getLogger("calibration_select_check")
CANDIDATES = ("wikitext2", "pysource", "pydoc")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=str(ROOT / "runs"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(ROOT / "results" / "smollm2_calibration_select"))
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    fp, tok, _ = load_model(args.model)

    code = tokenize_windows(tok, load_text("pysource", "eval").text, args.seqlen)
    perm = torch.randperm(code.shape[0], generator=torch.Generator().manual_seed(args.seed))
    code_eval = code[perm[: args.eval_windows]]
    sample = code[perm[args.eval_windows: args.eval_windows + 3]].reshape(-1, 512)  # the user's traffic sample
    target, probe = sample[:8], sample[8:10]
    candidates = {name: sample_calibration(tok, load_text(name, "calib", data_dir=args.data_dir).text, 8, 512,
                                           args.seed) for name in CANDIDATES}
    t_sel = time.perf_counter()
    selection = select_calibration(fp, candidates, target, probe, args.rank, steps=4, probes=3, seed=args.seed)
    select_s = time.perf_counter() - t_sel
    print(selection.table())

    runs = Path(args.runs) / Path(args.model).name
    checkpoints = {}
    for label, spec in (("WikiText-2 alone", "wikitext2"), ("code alone", "pysource"),
                        (f"selected: {selection.spec}", selection.spec)):
        out = runs / f"calib-select-{re.sub(r'[^a-z0-9.]+', '-', spec.lower())}"
        if not (is_checkpoint(out) and read_meta(out)["quant_config"]["calib"] == spec):
            cmd = child_argv("quantize", "--model", args.model, "--rank", str(args.rank), "--calib", spec,
                             "--calib-samples", str(args.calib_samples), "--calib-seqlen", "512",
                             "--seed", str(args.seed), "--layout", "quadllm", "--out", str(out), "-q")
            if args.data_dir:
                cmd += ["--data-dir", args.data_dir]
            log.info("%s", shlex.join(cmd))
            subprocess.run(cmd, check=True)
        checkpoints[label] = out
    models = {label: quadllm.load(path)[0] for label, path in checkpoints.items()}
    wiki = tokenize_windows(tok, load_text("wikitext2", "eval", data_dir=args.data_dir).text,
                            args.seqlen)[: args.eval_windows]
    results = {"held-out code": evaluate_many(models, code_eval, reference=fp),
               "WikiText-2 test": evaluate_many(models, wiki, reference=fp)}
    rows = [{"calibration": label, "domain": domain, "kl": r[label]["kl"], "ppl": r[label]["ppl"],
             "fp_ppl": r[label]["reference_ppl"], "top1_agreement": r[label]["top1_agreement"]}
            for domain, r in results.items() for label in models]
    meta = {"command": "python scripts/calibration_select_check.py " + shlex.join(sys.argv[1:]),
            "date": dt.date.today().isoformat(), "machine": machine_description(), "model": args.model,
            "eval_windows": args.eval_windows, "seqlen": args.seqlen, "seed": args.seed,
            "selection_seconds": round(select_s, 1), "seconds": round(time.perf_counter() - t0, 1),
            "checkpoints": {k: str(v.name) for k, v in checkpoints.items()}, "quadllm_version": quadllm.__version__}
    result = {"meta": meta, "selection": selection.to_dict(), "rows": rows}
    out = Path(args.out)
    atomic_write(out.with_suffix(".json"), (json.dumps(result, indent=1) + "\n").encode())
    text = markdown(result, selection.table())
    atomic_write(out.with_suffix(".md"), text.encode())
    print(text)
    return 0


def markdown(result: dict, selection_table: str) -> str:
    meta = result["meta"]
    lines = [f"# Calibration chosen for the domain: {meta['model']}", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; {meta['seconds']} s, the "
             f"selection {meta['selection_seconds']} s).", "",
             "The served traffic is Python source (the held-out modules of `pysource`); 10 windows of 512 tokens of "
             "it are the user's sample (8 for the moments, 2 for the KL probe), disjoint from the "
             f"{meta['eval_windows']} x {meta['seqlen']} evaluation windows. Candidates: WikiText-2 (calibration "
             "split), `pysource` (other modules' source) and `pydoc`. Each checkpoint: QUAD W4A4 r=64, default "
             "recipe, 32 x 512 calibration windows, seed 0.", "", "## The selection", "", selection_table,
             "## Domain shift", "", "| calibration | held-out code KL | code ppl | WikiText-2 KL | WikiText-2 ppl |",
             "| --- | ---: | ---: | ---: | ---: |"]
    by = {(r["calibration"], r["domain"]): r for r in result["rows"]}
    for label in dict.fromkeys(r["calibration"] for r in result["rows"]):
        c, w = by[(label, "held-out code")], by[(label, "WikiText-2 test")]
        lines.append(f"| {label} | {c['kl']:.4f} | {c['ppl']:.3f} | {w['kl']:.4f} | {w['ppl']:.3f} |")
    fp = {d: next(r["fp_ppl"] for r in result["rows"] if r["domain"] == d) for d in ("held-out code", "WikiText-2 test")}
    lines += ["", f"FP perplexity: held-out code {fp['held-out code']:.3f}, WikiText-2 test {fp['WikiText-2 test']:.3f}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
