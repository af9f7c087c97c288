"""A real rank-0 (QuaRot) checkpoint exported to compressed-tensors and loaded back by
compressed-tensors' own code: WikiText-2 perplexity, KL and top-1 of each export against its source
on quadllm's fake backend, on the same windows.

Two QuaRot W4A4 checkpoints (GPTQ weights, WikiText-2 calibration): one quantized at the clip
ratio the format's activation grid corresponds to (``--a-clip 0.9333333333``, an exact export),
one at quadllm's default clip 0.9 (``--approximate-activations``: its activations round on the
format's grid). The exact export is also loaded with ``transformers.AutoModelForCausalLM.from_pretrained``,
which does not apply ``transform_config``: what a user of transformers alone would get.

Writes ``results/<model>_compressed_tensors.{md,json}``.

    python scripts/compressed_tensors_check.py --max-windows 8
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from results_smollm2 import model_slug, model_title, portable, results_stem  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import quadllm  # noqa: E402
from quadllm.cli.invocation import child_argv  # noqa: E402
from quadllm.data.text import load_text  # noqa: E402
from quadllm.evaluation.perplexity import evaluate_many, tokenize_windows  # noqa: E402
from quadllm.integrations.compressed_tensors import load_exported  # noqa: E402
from quadllm.io.checkpoint import dir_size  # noqa: E402
from quadllm.io.compressed_tensors import EXPORT_FILE, equivalent_clip  # noqa: E402

log = logging.getLogger("compressed_tensors_check")
CALIB = ["--calib", "wikitext2", "--calib-samples", "32", "--calib-seqlen", "512", "--seed", "0"]
CASES = {"QuaRot W4A4, clip 14/15 (exact export)": (["--a-clip", f"{equivalent_clip(4):.10f}"], []),
         "QuaRot W4A4, clip 0.9 (approximate export)": ([], ["--approximate-activations"])}


def run(cmd: list[str]) -> float:
    log.info("%s", shlex.join(cmd))
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - t0


def measure(args) -> dict:
    """Quantize (unless the checkpoints exist), export, load back and evaluate: the results record."""
    work = Path(args.work or ROOT / "runs" / model_slug(args.model))
    cli = child_argv()
    cases = {}
    for name, (quant_flags, export_flags) in CASES.items():
        tag = "quarot-w4a4-ct-grid" if quant_flags else "quarot-w4a4"
        ckpt, export = work / tag, work / f"{tag}-compressed-tensors"
        quantize = [*cli, "quantize", "--model", args.model, "--method", "quarot", "--weights", "gptq", *quant_flags,
                    *CALIB, "--layout", "quadllm", "--out", str(ckpt), "-q"]
        quantize_s = None if ckpt.exists() else run(quantize)
        export_cmd = [*cli, "export", "--format", "compressed-tensors", str(ckpt), str(export), *export_flags, "-q"]
        export_s = run(export_cmd)
        cases[name] = {"checkpoint": str(ckpt), "export": str(export), "quantize": shlex.join(["quadllm", *quantize[3:]]),
                       "export_command": shlex.join(["quadllm", *export_cmd[3:]]), "quantize_s": quantize_s,
                       "export_s": round(export_s, 1), "record": json.loads((export / EXPORT_FILE).read_text()),
                       "bytes": {"source": dir_size(ckpt), "export": dir_size(export)}}
    reference, tok, _ = quadllm.load_model(args.model)
    windows = tokenize_windows(tok, load_text("wikitext2", "eval").text, 2048, args.max_windows)
    models = {}
    for name, case in cases.items():
        models[f"{name}: source, quadllm fake backend"] = quadllm.load(case["checkpoint"])[0]
        models[f"{name}: export, compressed-tensors"] = load_exported(case["export"])
    exact = next(iter(cases.values()))
    models["exact export through transformers.from_pretrained (no transforms)"] = (
        AutoModelForCausalLM.from_pretrained(exact["export"], dtype=torch.float32).eval())
    results = evaluate_many(models, windows, reference=reference)
    return portable({"command": shlex.join(["python", "scripts/compressed_tensors_check.py", *sys.argv[1:]]),
                     "model": args.model, "windows": int(windows.shape[0]), "cases": cases, "results": results,
                     "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
                     "date": time.strftime("%Y-%m-%d")})


def _shown(command: str) -> str:
    """A recorded ``quadllm`` command as a user types it (the first records kept the module's name)."""
    return "quadllm " + command.removeprefix("quadllm.cli ") if command.startswith("quadllm.cli ") else command


def render(record: dict) -> str:
    """The Markdown of a results record."""
    results, cases = record["results"], record["cases"]
    fp_ppl = next(iter(results.values()))["reference_ppl"]
    rows = "\n".join(f"| {n} | {r['ppl']:.3f} | {r['kl']:.4f} | {100 * r['top1_agreement']:.1f}% |"
                     for n, r in results.items())
    checks = "\n".join(
        f"- {name}: `{_shown(c['export_command'])}` ({c['bytes']['source'] / 1e6:.1f} MB -> "
        f"{c['bytes']['export'] / 1e6:.1f} MB); its check on the first {c['record']['check']['tokens']} tokens of "
        f"{c['record']['check']['text']}: every decoder linear fed quadllm's own inputs agrees with quadllm's "
        f"output on {100 * c['record']['check']['linears']['rows_agreeing']:.1f}% of the token rows (to "
        f"{c['record']['check']['linears']['rtol']:g} of the row's largest output; worst "
        f"`{c['record']['check']['linears']['worst_linear']}`, "
        f"{100 * c['record']['check']['linears']['worst_share']:.1f}%), and "
        f"{100 * c['record']['check']['linears']['disagreeing_rows_at_a_negative_extreme']:.2f}% of the other rows "
        "have a negative largest magnitude (the format's tie); the whole model against the source: KL "
        f"{c['record']['check']['source']['mean_kl']:.3f}, top-1 "
        f"{100 * c['record']['check']['source']['top1_agreement']:.1f}%"
        + (f"; approximations: {'; '.join(c['record']['approximations'])}" if c['record']['approximations'] else "")
        + f". Source: `{_shown(c['quantize'])}`." for name, c in cases.items())
    return (f"# {model_title(record['model'])}: QuaRot W4A4 exported to compressed-tensors\n\nGenerated by "
            f"`{record['command']}` on {record['date']} (torch {record['torch']}).\n\n{checks}\n\nWikiText-2 test, the "
            f"first {record['windows']} windows of 2048 tokens; KL(FP ‖ model) per token and top-1 agreement against "
            f"the original (FP perplexity {fp_ppl:.3f}).\n\n| model | ppl | KL | top-1 |\n| --- | ---: | ---: | ---: |\n"
            f"{rows}\n\nThe export holds the same INT4 codes, scales and transforms; its activations round on "
            "compressed-tensors' per-token grid, which puts each token's largest magnitude on a rounding tie "
            "(qmax + 0.5 steps), so a negative extreme takes either neighbour depending on the last bit of the "
            "scale, and such differences compound through the layers as any float difference does "
            "(`results/smollm2_layout_drift.md`). GPTQ calibrates on unquantized inputs, so the two sources hold the "
            "same weights and differ only in their activation clip; exported, both round on the format's grid. "
            "transformers (5.24) ignores `transform_config`: loaded with from_pretrained alone, the online "
            "transforms are missing.\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="a known offline model (`quadllm models`)")
    p.add_argument("--work", default=None, help="where checkpoints and exports go (default: runs/<model>)")
    p.add_argument("--max-windows", type=int, default=8, help="the first N WikiText-2 test windows of 2048 tokens")
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON and stop")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = results_stem(args.model, "compressed_tensors")
    if args.render_only:
        record = portable(json.loads(out.with_suffix(".json").read_text()))
    else:
        record = measure(args)
    out.with_suffix(".json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    text = render(record)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
