"""The sensitivity planner against a naive choice: KL and perplexity against the budget (issue 21).

For one model and its W4A4 checkpoint:

1. ``quadllm plan``'s choice (:func:`quadllm.analysis.planner.plan_quantized`) on windows of the
   checkpoint's calibration source (for WikiText-2, its validation split, never the test windows
   below): by default on the checkpoint as it loads (GPTQ weights, its own clips), each linear's gain
   from a forward and backward pass (``--estimate taylor``), ``--remeasure-every`` linears chosen at a
   time; ``--plan-on float`` plans the transformed model with float weights instead (activations only).
   The choice is an order: for a budget of N modules the plan is its first N (what ``quadllm plan
   --budget N`` chooses when N is a multiple of ``--remeasure-every``).
2. On the checkpoint, for each budget N: the N linears the planner chooses, and the naive N (o_proj
   and down_proj inputs, the ones W4A4A8 raises, in layer order), get INT8 activations at clip 1; at
   N = 2 x layers the naive set is W4A4A8. Perplexity and KL(FP ‖ model) on the first
   ``--max-windows`` windows of WikiText-2 test (seqlen 2048), every point on the same windows, the FP
   reference computed once per window.

Raising a linear's activation bits on the checkpoint is what ``quantize --plan`` does except for the
activation clip of those linears (searched at 8 bits there, 1 here) and GPTQ, which calibrates with
activation quantization off and so sees the same inputs either way.

    python scripts/plan_curve.py --model smollm2 \
        --checkpoint runs/smollm2/quad-w4a4-r64-+-clip-+-o-rank-8-+-smoothing --budgets 0,6,15,30,60 \
        --remeasure-every 3 --out results/smollm2_plan
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import logging
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import quadllm  # noqa: E402
from quadllm.analysis.planner import ESTIMATORS, Budget, linear_costs, plan_model, plan_quantized, set_module_precision  # noqa: E402
from quadllm.arch import get_adapter  # noqa: E402
from quadllm.cli.analysis import disjoint_windows  # noqa: E402
from quadllm.config import QuantConfig  # noqa: E402
from quadllm.data.text import load_text, tokenize_windows  # noqa: E402
from quadllm.evaluation.perplexity import kl_per_position  # noqa: E402
from quadllm.evaluation.speed import machine_description  # noqa: E402
from quadllm.io.files import atomic_write  # noqa: E402
from quadllm.io.sources import load_model  # noqa: E402
from quadllm.nn.modules import QuadLinear  # noqa: E402

log = logging.getLogger("plan_curve")
EVAL_NAME = "WikiText-2 test"
CALIB_NAME = "WikiText-2 (its validation split, quadllm's calibration part)"


def naive_order(adapter) -> list[str]:
    """o_proj and down_proj of layer 0, then layer 1, ...: W4A4A8's linears in layer order."""
    return [f"layers.{i}.{name}" for i in range(adapter.num_layers) for name in (adapter.o_proj, adapter.down_proj)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--checkpoint", help="the W4A4 checkpoint (required unless --render-only)")
    p.add_argument("--budgets", help="comma-separated module counts (required unless --render-only)")
    p.add_argument("--max-windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--plan-on", choices=("checkpoint", "float"), default="checkpoint")
    p.add_argument("--estimate", choices=tuple(ESTIMATORS), default="taylor")
    p.add_argument("--remeasure-every", type=int, default=3)
    p.add_argument("--calib-samples", type=int, default=8, help="(--plan-on float) windows for the moment")
    p.add_argument("--probe-samples", type=int, default=4)
    p.add_argument("--check-samples", type=int, default=2)
    p.add_argument("--plan-seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", required=True, help="stem of the results (.json, .md, .png)")
    p.add_argument("--render-only", action="store_true", help="rewrite the .md and .png from the .json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.render_only:
        result = json.loads(Path(args.out).with_suffix(".json").read_text())
        result["meta"].update(eval=EVAL_NAME, plan_calibration=CALIB_NAME)  # names, not this machine's paths
        write(Path(args.out), result)
        return 0
    if not args.checkpoint or not args.budgets:
        p.error("--checkpoint and --budgets are required")
    budgets = sorted({int(b) for b in args.budgets.split(",")})
    t0 = time.perf_counter()

    step = args.remeasure_every
    if step > 0 and any(n % step for n in budgets):
        p.error(f"--budgets must be multiples of --remeasure-every ({step}): a prefix of the order is then the plan")
    fp, tok, source = load_model(args.model)
    quantized, _, meta = quadllm.load(args.checkpoint)
    ckpt_config = QuantConfig.from_dict(meta["quant_config"])
    adapter = get_adapter(quantized)
    calib_text = load_text(ckpt_config.calib, "calib", data_dir=args.data_dir)
    budget = Budget("modules", max(budgets))
    t_plan = time.perf_counter()
    if args.plan_on == "checkpoint":
        probe, check = disjoint_windows(tok, calib_text.text, args.plan_seqlen,
                                        [args.probe_samples, args.check_samples], args.seed)
        plan = plan_quantized(quantized, fp, ckpt_config, probe, check, budget, "a8", args.estimate, step)
    else:  # the checkpoint's rank and calibration source, activations only
        plan_config = QuantConfig(method="quad", rank=ckpt_config.rank, mode="w4a4", calib=ckpt_config.calib,
                                  seed=args.seed)
        calib, probe, check = disjoint_windows(tok, calib_text.text, args.plan_seqlen,
                                               [args.calib_samples, args.probe_samples, args.check_samples], args.seed)
        plan = plan_model(fp, plan_config, calib, probe, check, budget, "a8", args.estimate, step)
    plan_s = time.perf_counter() - t_plan
    costs = linear_costs(quantized, ckpt_config, "a8")
    curves = {"planner": {n: plan.chosen[:n] for n in budgets},
              "naive (layer order)": {n: naive_order(adapter)[:n] for n in budgets}}

    eval_text = load_text("wikitext2", "eval", data_dir=args.data_dir)
    windows = tokenize_windows(tok, eval_text.text, args.seqlen)[: args.max_windows]
    lins = {n: m for n, m in quantized.named_modules() if isinstance(m, QuadLinear)}
    saved_acts = {n: m.act for n, m in lins.items()}
    points = [(curve, n) for curve in curves for n in budgets]
    sets = {pt: tuple(sorted(curves[pt[0]][pt[1]])) for pt in points}  # equal choices are evaluated once
    tallies = {key: {"nll": 0.0, "kl": 0.0, "tokens": 0} for key in set(sets.values())}
    for w in tqdm(windows, desc="eval", unit="window"):
        ids = w[None]
        with torch.no_grad():
            ref = fp(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
            for chosen, t in tallies.items():
                for name, m in lins.items():
                    m.act = saved_acts[name]
                for key in chosen:
                    set_module_precision(quantized, key, "a8", ckpt_config)
                logp = quantized(input_ids=ids).logits.float().log_softmax(-1)[0, :-1]
                t["nll"] += float(-logp.gather(-1, ids[0, 1:, None]).sum())
                t["kl"] += float(kl_per_position(ref, logp).sum())
                t["tokens"] += logp.shape[0]
    rows = []
    for curve, n in points:
        t = tallies[sets[(curve, n)]]
        chosen = curves[curve][n]
        rows.append({"curve": curve, "modules": n, "chosen": len(chosen),
                     "extra_bits_per_activation": sum(costs[k] for k in chosen),
                     "ppl": float(torch.tensor(t["nll"] / t["tokens"]).exp()), "kl": t["kl"] / t["tokens"],
                     "predicted_kl": plan.predicted(chosen) if curve == "planner" else None})
    result = {
        "meta": {"command": "python scripts/plan_curve.py " + shlex.join(sys.argv[1:]), "model": args.model,
                 "checkpoint": Path(args.checkpoint).name, "date": dt.date.today().isoformat(),
                 "machine": machine_description(), "eval": EVAL_NAME, "windows": int(windows.shape[0]),
                 "seqlen": args.seqlen, "plan_calibration": CALIB_NAME if ckpt_config.calib == "wikitext2"
                 else str(ckpt_config.calib),
                 "plan_on": args.plan_on, "estimate": args.estimate, "remeasure_every": step,
                 "plan_windows": {"calib": args.calib_samples if args.plan_on == "float" else 0,
                                  "probe": args.probe_samples,
                                  "check": args.check_samples, "seqlen": args.plan_seqlen},
                 "seed": args.seed, "plan_seconds": round(plan_s, 1),
                 "seconds": round(time.perf_counter() - t0, 1), "layers": adapter.num_layers,
                 "linears": len(costs), "quadllm_version": quadllm.__version__},
        "plan": plan.to_dict(), "rows": rows}
    write(Path(args.out), result)
    return 0


def write(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".json"), (json.dumps(result, indent=1) + "\n").encode())
    atomic_write(out.with_suffix(".png"), figure(result["rows"], result["meta"]))
    text = markdown(result, out.with_suffix(".png").name)
    atomic_write(out.with_suffix(".md"), text.encode())
    print(text)


def figure(rows: list[dict], meta: dict) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for curve, style in (("planner", "o-"), ("naive (layer order)", "s--")):
        pts = [(r["extra_bits_per_activation"], r["kl"]) for r in rows if r["curve"] == curve]
        axes[2].plot(*zip(*pts), style, label=curve)
    axes[2].set_xlabel("extra bits per activation")
    axes[2].set_ylabel("KL(FP ‖ model) per token")
    axes[2].grid(alpha=0.3)
    axes[2].legend()
    for ax, key in zip(axes, ("kl", "ppl")):
        for curve, style in (("planner", "o-"), ("naive (layer order)", "s--")):
            pts = [(r["modules"], r[key]) for r in rows if r["curve"] == curve]
            ax.plot(*zip(*pts), style, label=curve)
        end = max(r["modules"] for r in rows)
        if end == 2 * meta["layers"]:
            last = next(r for r in rows if r["curve"] == "naive (layer order)" and r["modules"] == end)
            ax.annotate("W4A4A8", (end, last[key]), textcoords="offset points", xytext=(-40, 10))
        ax.set_xlabel("budget: linears with INT8 activations")
        ax.set_ylabel("KL(FP ‖ model) per token" if key == "kl" else "perplexity")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{meta['model']}: planner vs layer order ({meta['eval']}, {meta['windows']} x {meta['seqlen']})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def markdown(result: dict, png: str) -> str:
    meta, plan = result["meta"], result["plan"]
    on = meta.get("plan_on", "float")
    how = (f"measured on the checkpoint as it loads, {meta.get('estimate', 'exact')} estimate, the gains measured "
           f"again after every {meta.get('remeasure_every', 0)} linears chosen" if on == "checkpoint" else
           f"measured on the transformed model with float weights (activations only), {meta.get('estimate', 'exact')} "
           f"estimate, {meta['plan_windows']['calib']} windows for its moment")
    lines = [f"# Sensitivity planner vs layer order: {meta['model']}", "",
             f"Generated by `{meta['command']}` on {meta['date']} ({meta['machine']}; {meta['seconds']} s, the "
             f"plan's measurement {meta['plan_seconds']} s).", "",
             f"Checkpoint `{meta['checkpoint']}` (W4A4, GPTQ). For each budget N, the N linears get INT8 "
             f"activations (clip 1): the planner's choice (the largest KL drop per linear, {how}; on "
             f"{meta['plan_windows']['probe']} x {meta['plan_windows']['seqlen']} tokens of {meta['plan_calibration']}, "
             f"the plan checked on {meta['plan_windows']['check']} more) or the naive one (o_proj and down_proj "
             f"inputs in layer order; all {2 * meta['layers']} of them are W4A4A8). Perplexity and KL on "
             f"{meta['windows']} x {meta['seqlen']} tokens of {meta['eval']}, every point on the same windows.", "",
             "| N | planner: linears | planner KL | naive KL | planner ppl | naive ppl | planner extra bits/act | "
             "naive extra bits/act | predicted KL (probe windows) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    by = {(r["curve"], r["modules"]): r for r in result["rows"]}
    for n in sorted({r["modules"] for r in result["rows"]}):
        a, b = by[("planner", n)], by[("naive (layer order)", n)]
        end = " (W4A4A8)" if n == 2 * meta["layers"] else ""
        predicted = a.get("predicted_kl", a.get("predicted_activation_kl"))
        lines.append(f"| {n}{end} | {a['chosen']} | {a['kl']:.4f} | {b['kl']:.4f} | {a['ppl']:.3f} | {b['ppl']:.3f} | "
                     f"{a['extra_bits_per_activation']:.3f} | {b['extra_bits_per_activation']:.3f} | "
                     f"{predicted:.4f} |")
    kinds: dict[str, int] = {}
    for key in plan["chosen"]:
        kind = key.split(".", 2)[2]
        kinds[kind] = kinds.get(kind, 0) + 1
    lines += ["", f"The plan for N = {plan['budget']['value']:g} takes {len(plan['chosen'])} linears (the planner never "
              "takes one whose measured gain is not positive): " + ", ".join(
        f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])) + f". Its own check "
        f"({plan['check']['windows']} check windows): KL {plan['check']['kl_before']:.4f} -> "
        f"{plan['check']['kl_after']:.4f}; predicted on the probe windows {plan['base_kl']:.4f} -> "
        f"{plan['predicted_kl']:.4f}.", "", f"![KL and perplexity against the budget]({png})"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
