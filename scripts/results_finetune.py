#!/usr/bin/env python
"""Regenerate the fine-tuning table: SmolLM2 QUAD W4A4 r=64 (GPTQ) before and after training its
full-precision outlier weights, next to a LoRA baseline with the same trainable-parameter budget.

The base checkpoint is the `QUAD W4A4 r=64` row of scripts/results_smollm2.py (reused from
runs/smollm2 when present). Each fine-tune runs through the CLI (`quadllm finetune ...`) in its
own process, on `wiki.valid.tokens` (never a test split), with the same loss (default: distillation
from the FP model, `--loss kd`), steps, batch, sequence length and seed; then FP, the base and every fine-tuned model are evaluated window by window on
WikiText-2 test. Writes results/smollm2_finetune.{json,md}.

    python scripts/results_finetune.py                      # all 148 test windows
    python scripts/results_finetune.py --max-windows 40     # a subset, labelled as such
    python scripts/results_finetune.py --base "QUAD W4A4 r=64 + clip + o-rank 8 + smoothing" --no-lora
        # on another row of scripts/results_smollm2.py (here the default recipe): its own directories and
        # results/smollm2_finetune_<row>
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

from results_smollm2 import (  # noqa: E402
    ABLATION_ROWS,
    ROWS,
    add_checkpoint_args,
    portable,
    quantize_args,
    quantize_row,
    resolve_paths,
    run_cli_cached,
    slug,
)

import quadllm  # noqa: E402
from quadllm import load  # noqa: E402
from quadllm.cli.invocation import child_argv  # noqa: E402
from quadllm.data.text import load_text, tokenize_windows  # noqa: E402
from quadllm.evaluation.perplexity import evaluate_many  # noqa: E402
from quadllm.evaluation.speed import machine_description  # noqa: E402
from quadllm.io.sources import load_model  # noqa: E402

#: the row fine-tuned unless --base names another (the directory names below are this row's)
BASE = "QUAD W4A4 r=64"
BASE_ROWS = {**dict(ROWS), **dict(ABLATION_ROWS)}


def base_suffix(base: str, sep: str = "-on-") -> str:
    """What the names of another base's files carry (nothing for :data:`BASE`)."""
    return "" if base == BASE else f"{sep}{slug(base)}"

log = logging.getLogger("results")


OUTLIER_FT_DIR = "quad-w4a4-r64-ft-outliers"  # also read by scripts/results_tasks.py
LORA_FT_DIR = "quad-w4a4-r64-ft-lora"
LOSS_NAMES = {"kd": "distillation from FP (KL)", "ce": "cross-entropy", "kd+ce": "distillation + cross-entropy"}


def finetune_rows(lrs: dict[str, float], loss: str, base: str = BASE,
                  lora: bool = True) -> list[tuple[str, str, list[str]]]:
    """(row name, output directory name, CLI flags). The default loss and base keep the plain
    directory names (scripts/results_tasks.py reads the outlier one); others get the loss and the
    base row (and then the outlier learning rate) as a suffix."""
    suffix = ("" if loss == "kd" else f"-{loss.replace('+', '-')}") + base_suffix(base)
    # another base's directories also name the learning rate, so runs with other rates are kept apart
    quad_dir = OUTLIER_FT_DIR + suffix + ("" if base == BASE else f"-lr{lrs['quad']:g}")
    rows = [("+ outlier FT (outliers+scales)", quad_dir,
             ["--method", "quad", "--train", "outliers+scales", "--lr", str(lrs["quad"])])]
    if lora:
        rows.append(("+ LoRA, same budget", LORA_FT_DIR + suffix, ["--method", "lora", "--lr", str(lrs["lora"])]))
    return rows


def finetune_row(name: str, dirname: str, flags: list[str], base: Path, args, steps: int | None = None,
                 eval_every: int | None = None) -> dict:
    out = Path(args.work) / dirname
    cmd = [*child_argv("finetune", str(base)), *flags, "--loss", args.loss, "--data",
           "wikitext2",
           "--max-steps", str(steps or args.max_steps), "--batch-size", str(args.batch_size), "--max-seqlen",
           str(args.max_seqlen), "--val-fraction", str(args.val_fraction), "--eval-every",
           str(eval_every or args.eval_every), "--seed", str(args.seed), "--out", str(out), "-q"]
    if out.suffix == ".safetensors":
        cmd.insert(-1, "--adapter-only")
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    return run_cli_cached(name, cmd, out, args.force)


def probe_lrs(base: Path, args) -> tuple[list[dict], dict[str, float]]:
    """Each method's learning rate: the given one, or the one of ``--probe-lrs`` whose short run
    (``--probe-steps`` steps, same data and seed) reaches the lowest held-out loss."""
    given = {"quad": args.lr, "lora": args.lora_lr}
    candidates = {"quad": args.probe_lrs, "lora": args.lora_probe_lrs}
    probes, chosen = [], {}
    for method in ("quad", "lora") if args.lora else ("quad",):
        if given[method] is not None:
            chosen[method] = given[method]
            continue
        best = None
        for lr in candidates[method].split(","):
            s = finetune_row(f"probe {method} lr={lr}",
                             f"probe-{args.loss}-{method}-lr{lr}{base_suffix(args.base)}.safetensors",
                             ["--method", method, "--lr", lr], base, args, steps=args.probe_steps,
                             eval_every=args.probe_steps)
            probes.append({"method": method, "lr": float(lr), "steps": s["steps"],
                           "initial_val_loss": s["initial_val_loss"], "best_val_loss": s["best_val_loss"]})
            if best is None or s["best_val_loss"] < best[1]:
                best = (float(lr), s["best_val_loss"])
        chosen[method] = best[0]
    chosen.setdefault("lora", None)
    log.info("learning rates: %s", chosen)
    return probes, chosen


def _lr_origin(meta: dict, method: str) -> str:
    probes = [p for p in meta["lr_probes"] if p["method"] == method]
    if probes:
        return f"the best of its {probes[0]['steps']}-step probes below on the held-out loss"
    return "given on the command line, not probed"


def fmt_md(rows: dict, meta: dict) -> str:
    lora = f" and {meta['lora_lr']:g} (LoRA, {_lr_origin(meta, 'lora')})" if meta["lora_lr"] is not None else ""
    lines = [
        f"# SmolLM2-135M-Instruct {meta.get('base', BASE)}: fine-tuning the outlier weights"
        + (" vs LoRA" if lora else ""),
        "",
        f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}).",
        f"Fine-tuning: {meta['max_steps']} steps of {meta['batch_size']} sequences of {meta['max_seqlen']} tokens "
        f"from `wiki.valid.tokens` ({meta['val_fraction']:.0%} held out), seed {meta['seed']}, quantizers in the "
        f"loop, loss: {LOSS_NAMES[meta.get('loss', 'ce')]}; learning rates {meta['lr']:g} (outliers; scales x0.1, "
        f"{_lr_origin(meta, 'quad')}){lora}"
        + "; trainable share is of the model's parameters (INT4 weights counted as parameters). Evaluation: "
        f"WikiText-2 test, {meta['windows']} of {meta['windows_total']} windows of {meta['seqlen']} tokens; KL "
        "and top-1 against the FP model on the same windows. The held-out loss is the training loss on the "
        "held-out sequences (for distillation, the KL to FP). Time and peak memory are those of the "
        "`quadllm finetune` process.",
        "",
        "| model | trainable | share | held-out loss (before → best) | finetune s | peak MB | ppl | KL | top-1 |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        f = r.get("finetune")
        kl = "-" if name == "FP" else f"{r['kl']:.4f}"
        top1 = "-" if name == "FP" else f"{100 * r['top1_agreement']:.1f}%"
        if f:
            extra = (f"{f['trainable']:,} | {100 * f['trainable_share']:.2f}% | "
                     f"{f['initial_val_loss']:.4f} → {f['best_val_loss']:.4f} | {f['train_seconds']} | "
                     f"{f['peak_memory_mb']}")
            if f.get("lora_rank"):
                name = f"{name} (rank {f['lora_rank']})"
        else:
            extra = "- | - | - | - | -"
        lines.append(f"| {name} | {extra} | {r['ppl']:.2f} | {kl} | {top1} |")
    if meta["windows"] < meta["windows_total"]:
        lines += ["", f"**Subset**: {meta['windows']} of {meta['windows_total']} test windows."]
    if meta["lr_probes"]:
        lines += ["", "Learning-rate probes (held-out loss before → best):", "", "| method | lr | held-out loss |",
                  "| --- | ---: | --- |"]
        lines += [f"| {p['method']} | {p['lr']:g} | {p['initial_val_loss']:.4f} → {p['best_val_loss']:.4f} |"
                  for p in meta["lr_probes"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--loss", choices=sorted(LOSS_NAMES), default="kd", help="the fine-tunes' loss (quadllm finetune --loss)")
    p.add_argument("--max-steps", type=int, default=32, help="about 18 minutes per distillation fine-tune on 2 CPU cores")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-seqlen", type=int, default=512)
    p.add_argument("--lr", type=float, default=None, help="outlier fine-tuning learning rate (default: probed)")
    p.add_argument("--lora-lr", type=float, default=None, help="LoRA learning rate (default: probed)")
    p.add_argument("--probe-lrs", default="1e-4,3e-4", help="learning rates the probes try for the outlier fine-tune")
    p.add_argument("--lora-probe-lrs", default="3e-4,1e-3", help="learning rates the probes try for LoRA")
    p.add_argument("--probe-steps", type=int, default=6)
    p.add_argument("--val-fraction", type=float, default=0.02)
    p.add_argument("--eval-every", type=int, default=12)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--base", default=BASE, choices=sorted(BASE_ROWS),
                   help="the row of scripts/results_smollm2.py to fine-tune (default: %(default)s)")
    p.add_argument("--no-lora", dest="lora", action="store_false", help="fine-tune the outliers only (no LoRA row)")
    p.add_argument("--seqlen", type=int, default=2048)
    add_checkpoint_args(p)
    p.add_argument("--out", default=None, help="results stem (default: results/smollm2_finetune, with "
                   "_<base row> for another --base)")
    p.add_argument("--force", action="store_true", help="re-run fine-tunes whose output exists")
    p.add_argument("--render-only", action="store_true", help="rewrite the Markdown from the JSON and stop")
    args = p.parse_args()
    resolve_paths(args)
    if args.out is None:
        args.out = str(ROOT / "results" / ("smollm2_finetune" + base_suffix(args.base, "_")))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.render_only:
        saved = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).with_suffix(".md").write_text(fmt_md(saved["rows"], saved["meta"]))
        print(Path(args.out).with_suffix(".md").read_text())
        return
    Path(args.work).mkdir(parents=True, exist_ok=True)

    quantize_row(args.base, BASE_ROWS[args.base], quantize_args(args))
    base = Path(args.work) / slug(args.base)
    probes, lrs = probe_lrs(base, args)
    summaries = {name: finetune_row(name, d, flags, base, args)
                 for name, d, flags in finetune_rows(lrs, args.loss, args.base, args.lora)}

    fp, tok, _ = load_model(None)
    source = load_text("wikitext2", "eval", data_dir=args.data_dir)
    all_windows = tokenize_windows(tok, source.text, args.seqlen)
    windows = all_windows[: args.max_windows] if args.max_windows else all_windows
    models = {"FP": fp, args.base: load(base)[0]}
    for name, s in summaries.items():
        models[name] = load(s["out"])[0]
    t0 = time.perf_counter()
    rows = evaluate_many(models, windows, reference=fp)
    log.info("evaluated %d models on %d windows in %.0f s", len(models), windows.shape[0], time.perf_counter() - t0)
    for name, s in summaries.items():
        rows[name]["finetune"] = s
    meta = {
        "command": "python scripts/results_finetune.py " + shlex.join(sys.argv[1:]),
        "date": dt.date.today().isoformat(),
        "machine": machine_description(),
        "windows": int(windows.shape[0]), "windows_total": int(all_windows.shape[0]), "seqlen": args.seqlen,
        "loss": args.loss, "max_steps": args.max_steps, "batch_size": args.batch_size, "max_seqlen": args.max_seqlen,
        "val_fraction": args.val_fraction, "seed": args.seed, "lr": lrs["quad"], "lora_lr": lrs["lora"],
        "lr_probes": probes, "base": args.base,
        "quadllm_version": quadllm.__version__, "data": source.origin,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = portable({"meta": meta, "rows": rows})
    out.with_suffix(".json").write_text(json.dumps(saved, indent=2))
    out.with_suffix(".md").write_text(fmt_md(saved["rows"], saved["meta"]))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
