"""Decode that reads packed INT4 weights, and a cheaper head: speed and what they cost (issue 22, first step).

Runs, on the SmolLM2 QUAD W4A4 r=64 checkpoint (scripts/results_smollm2.py):

1. ``quadllm bench model CKPT --prefill 512 --decode 128 --batch 1,8 --backends cpu-int8,cpu-int4
   --heads float,int8``: float32, bfloat16 and the checkpoint on ``cpu-int8`` / ``cpu-int4``, each
   with the stored head and the INT8 head, in one process (every ratio within that run).
2. ``quadllm eval CKPT --data wikitext2 --max-windows 8 --reference --backend cpu-int4 --head H``
   for H = float, bf16, int8: the head's cost on 8 x 2048 tokens (prefill rows run ``cpu-int8``'s
   path, so only the head differs).
3. The same on 256 windows of 32 tokens for ``fake``, ``cpu-int8``, ``cpu-int4`` and ``cpu-int4``
   with the INT8 head: 32 rows per call take ``cpu-int4``'s INT4 path (``decode_rows``), so this
   measures its bfloat16 rounding of the integer sums against the exact paths, on the same windows.

4. A torch.profiler view of one decode step (batch 1, cpu-int4 with the INT8 head): where the
   time goes once the weights are read as INT4.

Writes the JSON of each command under ``--work`` and renders ``--out``.md from them;
``--render-only`` renders what is there, ``--profile-only`` runs step 4 alone.

    python scripts/decode_int4_check.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from quadllm.cli.invocation import child_argv, shown  # noqa: E402
from quadllm.evaluation.speed import machine_description  # noqa: E402

HEADS = ("float", "bf16", "int8")
SHORT = (("fake", "float"), ("cpu-int8", "float"), ("cpu-int4", "float"), ("cpu-int4", "int8"))


def commands(ckpt: str, work: Path) -> list[tuple[list[str], Path]]:
    """(the quadllm command, the JSON it writes) in order."""
    q = child_argv()
    runs = [(q + ["bench", "model", ckpt, "--prefill", "512", "--decode", "128", "--batch", "1,8", "--backends",
                  "cpu-int8,cpu-int4", "--heads", "float,int8"], work / "bench.json")]
    for h in HEADS:
        runs.append((q + ["eval", ckpt, "--data", "wikitext2", "--max-windows", "8", "--reference", "--backend",
                          "cpu-int4", "--head", h], work / f"head_{h}.json"))
    for backend, h in SHORT:
        runs.append((q + ["eval", ckpt, "--data", "wikitext2", "--seqlen", "32", "--max-windows", "256", "--reference",
                          "--backend", backend, "--head", h], work / f"short_{backend}_{h}.json"))
    return runs


def shown_run(cmd: list[str]) -> str:
    """``cmd`` as the results file records it (without its ``--json`` scratch file)."""
    return shown(cmd[:-2] if cmd[-2] == "--json" else cmd)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default="runs/smollm2/quad-w4a4-r64")
    p.add_argument("--work", default="runs/decode_int4_check", help="where each command's JSON goes")
    p.add_argument("--out", default="results/smollm2_decode_int4")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--profile-only", action="store_true")
    args = p.parse_args()
    work = Path(args.work)
    runs = commands(args.checkpoint, work)
    if not args.render_only:
        work.mkdir(parents=True, exist_ok=True)
        for cmd, out in [] if args.profile_only else runs:
            subprocess.run(cmd + ["--json", str(out), "-q"], check=True, stdout=subprocess.DEVNULL)
        (work / "profile.json").write_text(json.dumps(profile_decode(args.checkpoint), indent=1) + "\n")
    results = [json.loads(out.read_text()) for _, out in runs]
    profile = json.loads((work / "profile.json").read_text()) if (work / "profile.json").is_file() else None
    text = render(results, runs, profile)
    Path(args.out).with_suffix(".md").write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"commands": [shown_run(c + ["--json", str(o)]) for c, o in runs], "machine": machine_description(),
         "date": dt.date.today().isoformat(), "bench": results[0]["records"],
         "evals": [{k: r[k] for k in ("ppl", "kl", "top1_agreement", "reference_ppl", "windows", "seqlen", "backend",
                                      "head")} for r in results[1:]]}, indent=1) + "\n")
    print(text)
    return 0


def profile_decode(ckpt: str, steps: int = 20) -> dict:
    """Operators of one decode step (batch 1, 16-token prompt) on cpu-int4 with the INT8 head."""
    import torch
    from transformers import DynamicCache

    from quadllm import load, place
    from quadllm.evaluation.speed import group_ops, top_ops

    model = load(ckpt)[0]
    place(model, "cpu-int4", head="int8")
    cache = DynamicCache()
    with torch.no_grad():
        out = model(input_ids=torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0)),
                    use_cache=True, past_key_values=cache)
    token = out.logits[:, -1:].argmax(-1)
    ops = top_ops(lambda: model(input_ids=token, use_cache=True, past_key_values=cache), repeat=steps, top=None,
                  warmup=3)
    return {"self_ms_per_step": round(sum(o["self_ms_per_call"] for o in ops), 2),
            "operator_calls_per_step": round(sum(o["calls_per_call"] for o in ops)), "top": ops[:10],
            "groups": group_ops(ops)}


def render(results: list[dict], runs: list[tuple[list[str], Path]], profile: dict | None = None) -> str:
    bench, evals = results[0], results[1:]
    lines = ["# Decode reading packed INT4, and a cheaper head: SmolLM2 (issue 22, first step)", "",
             f"Generated by `python scripts/decode_int4_check.py` on {dt.date.today().isoformat()} "
             f"({machine_description()}); the commands, each on its own:", ""]
    lines += [f"- `{shown_run(c + ['--json', str(o)])}`" for c, o in runs]
    lines += ["", "## Speed (one `bench model` run; ratios within it)", "",
              "| variant | phase | batch | tokens/s | vs float32 | vs bfloat16 |", "| --- | --- | ---: | ---: | ---: | ---: |"]
    recs = bench["records"]
    bf16 = {(r["phase"], r["batch"]): r["tokens_per_s"] for r in recs if r["variant"] == "bf16"}
    for r in recs:
        lines.append(f"| {r['variant']} | {r['phase']} {r['tokens']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_fp32']:.2f}x | {r['tokens_per_s'] / bf16[(r['phase'], r['batch'])]:.2f}x |")
    lines += ["", "## What the head costs (8 x 2048 tokens of WikiText-2 test; prefill rows: the linears run cpu-int8's "
              "path in every row)", "", "| head | ppl | KL(FP ‖ model) | top-1 agreement |", "| --- | ---: | ---: | ---: |"]
    for r in evals[:len(HEADS)]:
        lines.append(f"| {r['head']} | {r['ppl']:.4f} | {r['kl']:.5f} | {r['top1_agreement']:.4f} |")
    lines += ["", f"## What the INT4 decode path costs (256 windows of 32 tokens of WikiText-2 test: 32 rows per call, "
              f"the INT4 GEMM's path; FP perplexity {evals[-1]['reference_ppl']:.3f} on these windows)", "",
              "| backend | head | ppl | KL(FP ‖ model) | top-1 agreement |", "| --- | --- | ---: | ---: | ---: |"]
    for r in evals[len(HEADS):]:
        lines.append(f"| {r['backend']} | {r['head']} | {r['ppl']:.4f} | {r['kl']:.5f} | {r['top1_agreement']:.4f} |")
    if profile:
        lines += ["", "## Where a decode step goes (cpu-int4, INT8 head, batch 1; torch.profiler self time, "
                  "`--profile-only`)", "", f"{profile['self_ms_per_step']} ms of operator self time and "
                  f"{profile['operator_calls_per_step']} operator calls per token.", "",
                  "| operator | ms per step | share | calls per step |", "| --- | ---: | ---: | ---: |"]
        for o in profile["top"]:
            lines.append(f"| {o['op']} | {o['self_ms_per_call']} | {o['share']:.3f} | {o['calls_per_call']:g} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
