"""``quadllm advise-rank``, ``quadllm plan``, ``quadllm drift`` and ``quadllm report``: the command-line side
of the analysis tools."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ..analysis.advisor import DEFAULT_RANKS, advise_rank
from ..analysis.calibration_select import select_calibration
from ..analysis.drift import check_drift, compare_on_domains, recalibration_config
from ..analysis.planner import ESTIMATORS, PLAN_TARGETS, parse_budget, plan_model, plan_quantized
from ..analysis.report import build_report
from ..config import DEFAULT_RANK, METHODS, ConfigError, QuantConfig
from ..data.text import DataError, load_text, mixture_counts, sample_calibration, tokenize_windows
from ..io.checkpoint import CheckpointError, check_output_dir, is_checkpoint, read_meta
from ..io.sources import load_model
from ..pipelines.loading import load
from .common import TEXT_SPECS, add_common, write_text
from .quantize import quantize_to

log = logging.getLogger("quadllm")

#: ``quadllm drift`` exit status when the data no longer fits the checkpoint's calibration.
EXIT_RECALIBRATE = 3
#: ``quadllm drift --recalibrate`` exit status when it wrote a recalibrated checkpoint
EXIT_RECALIBRATED = 4


def disjoint_windows(tokenizer, text: str, seqlen: int, counts: list[int], seed: int) -> list[torch.Tensor]:
    """Non-overlapping windows of ``text``, shuffled with ``seed`` and dealt out in groups of
    ``counts`` (no window is in two groups)."""
    windows = tokenize_windows(tokenizer, text, seqlen)
    need = sum(counts)
    if windows.shape[0] < need:
        raise DataError(f"the text has {windows.shape[0]} windows of {seqlen} tokens; {need} are needed "
                        "(lower the sample counts or --seqlen, or give more text)")
    perm = torch.randperm(windows.shape[0], generator=torch.Generator().manual_seed(seed))
    out, start = [], 0
    for c in counts:
        out.append(windows[perm[start:start + c]])
        start += c
    return out


def add_parsers(sub) -> None:
    a = sub.add_parser("advise-rank", help="recommend an outlier rank r from the spectrum and an error probe")
    a.add_argument("--model", default=None, help="original model (default: SmolLM2-135M-Instruct)")
    a.add_argument("--calib", default=None, help="calibration text (default: embedded text / WikiText-2 online)")
    a.add_argument("--calib-samples", type=int, default=8)
    a.add_argument("--probe-samples", type=int, default=4, help="windows for the KL probe (disjoint from calib)")
    a.add_argument("--seqlen", type=int, default=512)
    a.add_argument("--ranks", default=",".join(map(str, DEFAULT_RANKS)))
    a.add_argument("--mode", choices=("w4a4", "w4a4a8", "w4a8"), default="w4a4")
    a.add_argument("--tolerance", type=float, default=0.1, help="relative KL tolerance to the best rank")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--json", default=None)
    add_common(a)

    pl = sub.add_parser("plan", help="choose which linears get INT8 activations (or full precision) within a "
                        "budget, from each one's measured sensitivity; quantize --plan applies it")
    pl.add_argument("model", nargs="?", default=None,
                    help="a quantized checkpoint (planned as it loads, its weights quantized), or an original model "
                         "(transformed here, activations only; default: SmolLM2-135M-Instruct)")
    pl.add_argument("--budget", required=True,
                    help="N or Nmodules (at most N linears), or Xbits (at most X extra bits per activation)")
    pl.add_argument("--target", choices=PLAN_TARGETS, default="a8",
                    help="what the chosen linears get: INT8 activations (default) or full precision")
    pl.add_argument("--estimate", choices=tuple(ESTIMATORS), default="taylor",
                    help="each linear's gain from one forward and backward pass per window (taylor, default) or "
                         "one forward per linear (exact)")
    pl.add_argument("--remeasure-every", type=int, default=8, metavar="N",
                    help="choose N linears at a time, measuring the gains again with them changed (0: once)")
    pl.add_argument("--method", choices=[m for m in METHODS if m != "rtn"], default="quad",
                    help="(an original model) the method")
    pl.add_argument("--rank", type=int, default=None, help=f"(an original model) outlier rank (default {DEFAULT_RANK})")
    pl.add_argument("--mode", choices=("w4a4", "w4a4a8", "w4a8"), default="w4a4", help="(an original model) the mode")
    pl.add_argument("--calib", default=None, help=f"{TEXT_SPECS} (default: a checkpoint's calibration source, or the "
                    "embedded text)")
    pl.add_argument("--calib-samples", type=int, default=8,
                    help="(an original model) windows for the residual second moment")
    pl.add_argument("--probe-samples", type=int, default=4, help="windows the sensitivities are measured on")
    pl.add_argument("--check-samples", type=int, default=2, help="windows the plan's KL is measured on")
    pl.add_argument("--seqlen", type=int, default=512)
    pl.add_argument("--seed", type=int, default=0)
    pl.add_argument("--out", required=True, help="the plan (JSON) for quantize --plan")
    add_common(pl)

    cs = sub.add_parser("calibrate-select", help="choose a calibration mixture of candidate sources whose outlier "
                        "subspace fits a sample of your own traffic; writes it as a .jsonl for --calib")
    cs.add_argument("model", nargs="?", default=None, help="original model (default: SmolLM2-135M-Instruct)")
    cs.add_argument("--candidates", required=True, help=f"comma-separated sources ({TEXT_SPECS})")
    cs.add_argument("--target", required=True, help="a sample of the traffic to serve (.txt or .jsonl)")
    cs.add_argument("--out", required=True, help="the calibration set (.jsonl, one window of text per line)")
    cs.add_argument("--rank", type=int, default=DEFAULT_RANK)
    cs.add_argument("--samples", type=int, default=8, help="windows per candidate (and of the target) for the moments")
    cs.add_argument("--probe-samples", type=int, default=2, help="target windows for the KL probe (disjoint)")
    cs.add_argument("--seqlen", type=int, default=512)
    cs.add_argument("--steps", type=int, default=4, help="mixture weights are multiples of 1/STEPS")
    cs.add_argument("--probes", type=int, default=3, help="mixtures (best by energy left) confirmed by the KL probe")
    cs.add_argument("--windows", type=int, default=64, help="windows written to --out")
    cs.add_argument("--seed", type=int, default=0)
    add_common(cs)

    rp = sub.add_parser("report", help="an HTML report: outliers, spectrum, per-layer error, tokens, memory")
    rp.add_argument("model", nargs="?", default=None, help="quadllm checkpoint or original model (default SmolLM2)")
    rp.add_argument("--out", required=True, help="the HTML file (PNGs and a JSON file are written beside it)")
    rp.add_argument("--calib", default=None, help="text to measure on (default: the checkpoint's calibration source)")
    rp.add_argument("--samples", type=int, default=4)
    rp.add_argument("--seqlen", type=int, default=512)
    rp.add_argument("--rank", type=int, default=None, help=f"for an original model: the r to show (default {DEFAULT_RANK})")
    rp.add_argument("--seed", type=int, default=0)
    add_common(rp)

    d = sub.add_parser("drift", help="does a checkpoint's outlier subspace still fit new data? (exit 3: no)")
    d.add_argument("model", help="quadllm checkpoint (QUAD, rank > 0)")
    d.add_argument("--data", required=True, help=f"the new data: {TEXT_SPECS}")
    d.add_argument("--reference-data", default=None,
                   help="data of the calibration domain (default: the checkpoint's calibration source)")
    d.add_argument("--samples", type=int, default=16, help="windows for the second moments")
    d.add_argument("--eval-windows", type=int, default=2, help="windows for KL and perplexity (0: skip)")
    d.add_argument("--seqlen", type=int, default=512)
    d.add_argument("--fit-drop", type=float, default=0.05,
                   help="recalibrate when the fit (captured / best) drops more than this below the reference's")
    d.add_argument("--kl-factor", type=float, default=2.0,
                   help="recalibrate when the quantized model's KL is more than this times the reference's")
    d.add_argument("--leftover-factor", type=float, default=1.5,
                   help="recalibrate when the energy left to the quantizer (relative to recalibrating) is more "
                        "than this times the reference's")
    d.add_argument("--gain-min", type=float, default=0.1,
                   help="recalibrate when re-estimating the subspace on the new data would lower the "
                        "activation-only KL by more than this (relative)")
    d.add_argument("--no-probe", action="store_true", help="skip the recalibration probe (two KL evaluations)")
    d.add_argument("--recalibrate", default=None, metavar="OUT",
                   help="when the verdict is recalibrate: quantize again with the checkpoint's settings, calibrated "
                   "on a mixture of its calibration data and --data, into OUT (never the input), compare both "
                   "on both domains and exit 4")
    d.add_argument("--new-share", type=float, default=0.5,
                   help="--recalibrate: the share of the calibration windows drawn from the new data")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", default=None)
    add_common(d)


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def cmd_advise_rank(args) -> int:
    try:
        ranks = tuple(int(r) for r in args.ranks.split(","))
    except ValueError as exc:
        raise ConfigError(f"--ranks must be comma-separated integers, got {args.ranks!r}") from exc
    text = load_text(args.calib, "calib", data_dir=args.data_dir)  # before the model
    model, tok, source = load_model(args.model)
    log.info("calibration and probe text: %s", text.origin)
    calib, probe = disjoint_windows(tok, text.text, args.seqlen, [args.calib_samples, args.probe_samples], args.seed)
    advice = advise_rank(model, calib, probe, ranks, args.mode, args.tolerance, args.seed, progress=not args.quiet)
    print(advice.table())
    print(advice.explanation())
    _write_json(args.json, {**advice.to_dict(), "model": source.to_dict() if source else args.model,
                            "calib": text.origin, "calib_samples": args.calib_samples,
                            "probe_samples": args.probe_samples, "seqlen": args.seqlen, "seed": args.seed})
    return 0


def cmd_drift(args) -> int:
    if not is_checkpoint(args.model):
        raise CheckpointError(f"{args.model} is not a quadllm checkpoint; drift checks a quantized model")
    meta = read_meta(args.model)
    if args.recalibrate is not None:
        if Path(args.recalibrate).resolve() == Path(args.model).resolve():
            raise CheckpointError("--recalibrate writes a new checkpoint; it never replaces the one checked")
        check_output_dir(args.recalibrate)
        if not 0.0 < args.new_share <= 1.0:
            raise ConfigError(f"--new-share must be in (0, 1], got {args.new_share}")
        if not args.eval_windows:
            raise ConfigError("--recalibrate compares the checkpoints on evaluation windows: --eval-windows >= 1")
        new_config = recalibration_config(QuantConfig.from_dict(meta["quant_config"]), args.data, args.new_share)
        load_text(new_config.calib, "calib", data_dir=args.data_dir)  # the mixture loads, before any model
    ref_spec = args.reference_data or meta["quant_config"].get("calib")
    texts = [(load_text(spec, split, data_dir=args.data_dir), role) for spec, split, role in (
        (args.data, "eval", "new"), (ref_spec, "calib" if args.reference_data is None else "eval", "reference"))]
    quantized, tok, meta = load(args.model)  # the data are checked before any model is loaded
    original = load_model((meta.get("original_model") or {}).get("spec"))[0]
    n, e = args.samples, args.eval_windows
    groups = []
    for src, role in texts:
        log.info("%s data: %s", role, src.origin)
        groups.append((src.origin, disjoint_windows(tok, src.text, args.seqlen, [n, e] if e else [n], args.seed)))
    (new_origin, new_w), (ref_origin, ref_w) = groups
    report = check_drift(quantized, original, new_w[0], ref_w[0], new_w[1] if e else None, ref_w[1] if e else None,
                         args.fit_drop, args.kl_factor, args.leftover_factor,
                         None if args.no_probe else args.gain_min, progress=not args.quiet)
    print(report.table())
    print(f"verdict: {report.verdict.upper()}")
    for reason in report.reasons:
        print(f"- {reason}")
    record = {**report.to_dict(), "new_data": new_origin, "reference_data": ref_origin,
              "samples": n, "eval_windows": e, "seqlen": args.seqlen, "seed": args.seed}
    if report.fits or args.recalibrate is None:
        _write_json(args.json, record)
        return 0 if report.fits else EXIT_RECALIBRATE
    log.info("recalibrating on %s into %s", new_config.calib, args.recalibrate)
    layout = "stock" if meta.get("format_version") == 2 else "quadllm"
    quantize_to(new_config, (meta.get("original_model") or {}).get("spec"), args.recalibrate, layout, args.data_dir,
                args.quiet)
    del quantized
    new_model, _, _ = load(args.recalibrate)  # evaluated as it loads from disk
    # the checked checkpoint's figures on these very windows are the drift check's own
    rows = [{"model": "checkpoint", "domain": domain, **{k: part[k] for k in ("kl", "ppl", "reference_ppl",
                                                                              "top1_agreement")},
             "windows": int(w.shape[0])}
            for domain, part, w in (("new data", report.new, new_w[1]), ("reference data", report.reference, ref_w[1]))]
    rows += compare_on_domains({"recalibrated": new_model}, original,
                               {"new data": new_w[1], "reference data": ref_w[1]}, progress=not args.quiet)
    print("| model | domain | KL | ppl |\n| --- | --- | ---: | ---: |")
    for row in rows:
        print(f"| {row['model']} | {row['domain']} | {row['kl']:.4f} | {row['ppl']:.2f} |")
    print(f"recalibrated checkpoint: {args.recalibrate} (calibration {new_config.calib})")
    _write_json(args.json, {**record, "recalibrated": {"checkpoint": str(args.recalibrate),
                                                       "calib": new_config.calib, "comparison": rows}})
    return EXIT_RECALIBRATED


def cmd_plan(args) -> int:
    budget = parse_budget(args.budget)
    if args.remeasure_every < 0:
        raise ConfigError(f"--remeasure-every must be >= 0, got {args.remeasure_every}")
    if args.probe_samples < 1 or args.check_samples < 1:
        raise ConfigError("--probe-samples and --check-samples must be at least 1")
    on_checkpoint = args.model is not None and is_checkpoint(args.model)
    if on_checkpoint:
        meta = read_meta(args.model)
        config = QuantConfig.from_dict(meta["quant_config"])
        text = load_text(args.calib or config.calib, "calib", data_dir=args.data_dir)  # before the model
        model, tok, meta = load(args.model)
        original, _, source = load_model((meta.get("original_model") or {}).get("spec"))
        probe, check = disjoint_windows(tok, text.text, args.seqlen, [args.probe_samples, args.check_samples],
                                        args.seed)
        plan = plan_quantized(model, original, config, probe, check, budget, args.target, args.estimate,
                              args.remeasure_every, progress=not args.quiet)
        what = "the checkpoint"
    else:
        config = QuantConfig(method=args.method, rank=args.rank, mode=args.mode, calib=args.calib, seed=args.seed)
        text = load_text(args.calib, "calib", data_dir=args.data_dir)  # before the model
        model, tok, source = load_model(args.model)
        calib, probe, check = disjoint_windows(tok, text.text, args.seqlen,
                                               [args.calib_samples, args.probe_samples, args.check_samples], args.seed)
        plan = plan_model(model, config, calib, probe, check, budget, args.target, args.estimate,
                          args.remeasure_every, progress=not args.quiet)
        what = "activations only, weights float"
    print(f"{len(plan.chosen)} linears to {plan.target} ({budget.describe()}; {plan.extra_bits:.3f} extra bits per "
          f"activation)")
    print(f"KL ({what}), probe windows: {plan.base_kl:.4f} -> predicted {plan.predicted_kl:.4f}")
    print(f"KL ({what}), check windows: {plan.check['kl_before']:.4f} -> measured "
          f"{plan.check['kl_after']:.4f}")
    for key in plan.chosen[:20]:
        print(f"  {key}: gain {plan.chosen_gains[key]:.5f}")
    if len(plan.chosen) > 20:
        print(f"  ... and {len(plan.chosen) - 20} more (all in {args.out})")
    _write_json(args.out, {"format": "quadllm-plan", **plan.to_dict(),
                           "model": source.to_dict() if source else args.model,
                           "checkpoint": str(args.model) if on_checkpoint else None,
                           "quant_config": config.to_dict(), "calib": text.origin,
                           "windows": {"calib": 0 if on_checkpoint else args.calib_samples, "probe": args.probe_samples,
                                       "check": args.check_samples, "seqlen": args.seqlen}, "seed": args.seed})
    return 0


def cmd_calibrate_select(args) -> int:
    names = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--candidates {args.candidates!r}: name distinct sources, comma-separated")
    if not str(args.out).endswith(".jsonl"):
        raise ConfigError(f"--out {args.out}: the calibration set is written as .jsonl")
    texts = {name: load_text(name, "calib", data_dir=args.data_dir) for name in names}  # before the model
    target_text = load_text(args.target, "calib", data_dir=args.data_dir)
    model, tok, source = load_model(args.model)
    target, probe = disjoint_windows(tok, target_text.text, args.seqlen, [args.samples, args.probe_samples], args.seed)
    candidates = {name: sample_calibration(tok, t.text, args.samples, args.seqlen, args.seed) for name, t in texts.items()}
    selection = select_calibration(model, candidates, target, probe, args.rank, args.steps, args.probes,
                                   seed=args.seed, progress=not args.quiet)
    print(selection.table())
    counts = mixture_counts(args.windows, selection.chosen)
    lines = []
    for i, ((name, t), n) in enumerate(zip(texts.items(), counts)):
        if n:
            for row in sample_calibration(tok, t.text, n, args.seqlen, args.seed + 1000 + i):
                lines.append(json.dumps({"text": tok.decode(row.tolist()), "source": name}))
    order = torch.randperm(len(lines), generator=torch.Generator().manual_seed(args.seed)).tolist()
    write_text(args.out, "".join(lines[i] + "\n" for i in order))
    record = {**selection.to_dict(), "target": target_text.origin, "windows_written": counts,
              "model": source.to_dict() if source else args.model, "samples": args.samples,
              "probe_samples": args.probe_samples, "seqlen": args.seqlen, "seed": args.seed, "out": str(args.out)}
    _write_json(str(args.out)[: -len(".jsonl")] + ".selection.json", record)
    print(f"chosen: {selection.spec} (use --calib '{selection.spec}', or --calib {args.out}: "
          f"{sum(counts)} windows of {args.seqlen} tokens)")
    return 0


def cmd_report(args) -> int:
    data = build_report(args.model, args.out, args.calib, args.samples, args.seqlen, args.rank, args.seed,
                        args.data_dir, progress=not args.quiet)
    print(json.dumps({"html": args.out, "figures": data["figures"], "seconds": data["seconds"]}, indent=2))
    return 0


HANDLERS = {"advise-rank": cmd_advise_rank, "plan": cmd_plan, "calibrate-select": cmd_calibrate_select, "drift": cmd_drift, "report": cmd_report}

__all__ = ["add_parsers", "HANDLERS", "EXIT_RECALIBRATE", "EXIT_RECALIBRATED", "disjoint_windows"]
