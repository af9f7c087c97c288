"""The head and the outlier columns of a decode step, each on the kernels cpu-int4 can run them on (issue 22)

- The output head (:class:`quadllm.backends.head.HeadKernel`, the whole call: input cast or rotation
  and quantization, GEMM, scales), on the head shapes of SmolLM2-135M (49,152 x 576) and
  Qwen2.5-Coder-0.5B (151,936 x 896), random tables: ``int8`` (per-row INT8 weights, bfloat16
  inputs, torch's ``_weight_int8pack_mm``), ``w8a8`` on quadllm's VNNI kernel, and ``w8a8`` on
  ``torch._int_mm`` (the same integer sums: ``QUADLLM_INT4_KERNEL=torch``).
- The outlier columns of the residual readers (float32 inputs [M, r] times the outlier weight
  [N, r]), on both models' fused q/k/v, o_proj and gate/up shapes: the float32 ``addmm`` against
  ``quadllm::f16_mm`` on the float16 copy (the values checkpoints store).

Every call reads another copy of the weight, from at least ``--stream-mb`` of copies (more than the
caches hold), as a decode step reads every weight from memory once per token; the kernels of one
shape alternate over 7 rounds, medians. Writes ``--out``.md / .json.

    python scripts/decode_parts_probe.py
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(ROOT / "scripts"))

from int4_gemv_probe import probe_parser, run_probe, timed  # noqa: E402

from quadllm.backends.head import HeadKernel  # noqa: E402
from quadllm.backends.vnni import KERNEL_ENV, f16_mm, pack_f16  # noqa: E402

#: (model, vocabulary, hidden) of the heads
HEADS = [("SmolLM2", 49152, 576), ("Qwen-0.5B", 151936, 896)]
#: (model, linears, N, r) of the outlier columns one decode step multiplies, per layer
OUTLIERS = [("SmolLM2", "q/k/v", 960, 72), ("SmolLM2", "o", 648, 72), ("SmolLM2", "gate/up", 3072, 72),
            ("Qwen-0.5B", "q/k/v", 1152, 70), ("Qwen-0.5B", "o", 966, 112), ("Qwen-0.5B", "gate/up", 9728, 70)]


def alternate(fns: dict, calls: int, rounds: int = 7) -> dict[str, float]:
    """Median microseconds per call of each function, the functions alternating within each round."""
    for f in fns.values():
        timed(f, calls)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(timed(f, calls))
    return {k: statistics.median(v) for k, v in times.items()}


def head_kernel(table: torch.Tensor, precision: str, vnni: bool) -> HeadKernel:
    """A head copy on the VNNI kernel or, with ``vnni`` False, on torch's (the environment switch)."""
    old = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = "auto" if vnni else "torch"
    try:
        return HeadKernel(table, precision)
    finally:
        if old is None:
            os.environ.pop(KERNEL_ENV)
        else:
            os.environ[KERNEL_ENV] = old


def probe_heads(rows: list[int], seed: int, stream_mb: float) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for model, vocab, hidden in HEADS:
        table = torch.randn(vocab, hidden, generator=g) * 0.05
        copies = max(2, int(stream_mb * 1e6 // (vocab * hidden)))  # INT8: a byte per weight
        # one placement per kind, then copies of its tensors (the w8a8 placement rotates the whole table)
        firsts = {"int8": head_kernel(table, "int8", True), "w8a8 vnni": head_kernel(table, "w8a8", True),
                  "w8a8 torch._int_mm": head_kernel(table, "w8a8", False)}
        kinds = {k: [first] + [copy.deepcopy(first) for _ in range(copies - 1)] for k, first in firsts.items()}
        assert all(k.vnni for k in kinds["w8a8 vnni"]) and not any(k.vnni for k in kinds["w8a8 torch._int_mm"])
        del table
        for m in rows:
            x = torch.randn(m, hidden, generator=g)
            same = torch.equal(kinds["w8a8 vnni"][0](x), kinds["w8a8 torch._int_mm"][0](x))
            fns = {k: (lambda i, c=c: c[i % copies](x)) for k, c in kinds.items()}
            us = alternate(fns, copies * 3)
            base = us["int8"]
            out.append({"part": "head", "model": model, "shape": f"{vocab} x {hidden}", "rows": m, "copies": copies,
                        "us": {k: round(v, 1) for k, v in us.items()},
                        "vs_first": {k: round(base / v, 3) for k, v in us.items()},
                        "w8a8_kernels_equal": same})
            print(out[-1], flush=True)
        del kinds
    return out


def probe_outliers(rows: list[int], seed: int, stream_mb: float) -> list[dict]:
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for model, linear, n, r in OUTLIERS:
        w = (torch.randn(n, r, generator=g) * 0.05).half().float()
        copies = max(2, int(stream_mb * 1e6 // (n * r * 4)))  # float32: 4 bytes per weight
        wt32 = [w.t().contiguous().t() for _ in range(copies)]  # [n, r] as the layer holds it
        w16 = [pack_f16(w) for _ in range(copies)]
        for m in rows:
            x = torch.randn(m, r + 1, generator=g)[:, 1:]  # a column slice, as the outlier split gives
            y = torch.zeros(m, n)
            fns = {"float32 addmm": lambda i: y.addmm_(x, wt32[i % copies].t()),
                   "float16 f16_mm": lambda i: y.add_(f16_mm(x, w16[i % copies], n))}
            ref = x.double() @ w.double().t()
            err = (f16_mm(x, w16[0], n).double() - ref).abs().max().item()
            us = alternate(fns, copies * 3)
            base = us["float32 addmm"]
            out.append({"part": "outliers", "model": model, "shape": f"{linear} {n} x {r}", "rows": m,
                        "copies": copies, "us": {k: round(v, 2) for k, v in us.items()},
                        "vs_first": {k: round(base / v, 3) for k, v in us.items()},
                        "f16_max_abs_error_vs_float64": err})
            print(out[-1], flush=True)
    return out


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# The head and the outlier columns of a decode step, per kernel (issue 22)", "",
             f"Generated by `{meta['invocation']}` on {meta['date']} ({meta['machine']}); medians of 7 rounds, the "
             f"kernels of a shape alternating; every call on another copy of the weight, from at least "
             f"{meta['stream_mb']:g} MB of copies (`copies`), as a decode step reads weights from memory. Speedup: "
             "the first kernel's time over each one's. Random weights and inputs (seed recorded).", ""]
    for part, title in (("head", "The head (the whole call)"), ("outliers", "The outlier columns")):
        chosen = [r for r in rows if r["part"] == part]
        if not chosen:
            continue
        kinds = list(chosen[0]["us"])
        lines += [f"## {title}", "", "| model | shape | rows | copies | " + " | ".join(f"{k} us" for k in kinds)
                  + " | " + " | ".join(f"{k} speedup" for k in kinds[1:]) + " |",
                  "| --- | --- | ---: | ---: |" + " ---: |" * (2 * len(kinds) - 1)]
        for r in chosen:
            lines.append(f"| {r['model']} | {r['shape']} | {r['rows']} | {r['copies']} | "
                         + " | ".join(str(r["us"][k]) for k in kinds) + " | "
                         + " | ".join(f"{r['vs_first'][k]}x" for k in kinds[1:]) + " |")
        lines.append("")
    heads = [r for r in rows if r["part"] == "head"]
    if heads:
        lines.append("The two W8A8 kernels gave equal logits on every head shape: "
                     f"{all(r['w8a8_kernels_equal'] for r in heads)}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = probe_parser(__doc__.split("\n")[0], "results/decode_parts_probe")
    p.add_argument("--parts", default="head,outliers")
    args = p.parse_args()
    parts = args.parts.split(",")

    def measure(rows: list[int], seed: int, stream_mb: float) -> list[dict]:
        return (probe_heads(rows, seed, stream_mb) if "head" in parts else []) + \
            (probe_outliers(rows, seed, stream_mb) if "outliers" in parts else [])

    return run_probe(args, "decode_parts_probe.py", measure, render, f" --parts {args.parts}")


if __name__ == "__main__":
    sys.exit(main())
