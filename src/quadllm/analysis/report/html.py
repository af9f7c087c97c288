"""The report as one self-contained HTML page (inline CSS, base64 images, no scripts, no network)."""

from __future__ import annotations

import base64
import html
from typing import Any

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em}
th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee;margin:.5em 0} .note{color:#555;font-size:.9em}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{html.escape(str(c))}</td>' if isinstance(c, (int, float)) or str(c)[:1].isdigit()
        else f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _outlier_table(before: dict, after: dict) -> str:
    rows = []
    for kind, per in before.items():
        worst = max(range(len(per)), key=lambda i: per[i]["max_over_median"])
        aft = after.get(kind)
        rows.append([kind, f"{max(p['max_over_median'] for p in per):.1f}", worst,
                     f"{sum(p['crest'] for p in per) / len(per):.1f}",
                     f"{max(p['max_over_median'] for p in aft):.1f}" if aft else "-",
                     f"{sum(p['crest'] for p in aft) / len(aft):.1f}" if aft else "-"])
    return _table(["linear input", "max channel / median (original)", "worst layer", "mean token crest (original)",
                   "max channel / median (QUAD, quantized part)", "mean token crest (QUAD)"], rows)


def _top_channels(before: dict, k: int = 8) -> str:
    rows = []
    for kind, per in before.items():
        scores: dict[int, float] = {}
        for p in per:
            for c, v in enumerate(p["chan_max"]):
                scores[c] = max(scores.get(c, 0.0), v / max(p["median"], 1e-12))
        top = sorted(scores.items(), key=lambda kv: -kv[1])[:k]
        rows.append([kind, ", ".join(f"{c} ({v:.0f}x)" for c, v in top)])
    return _table(["linear input", f"top {k} channels (max over layers of channel max / median)"], rows)


def render(data: dict[str, Any], pngs: dict[str, bytes]) -> str:
    e = html.escape
    r = data["rank"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>quadllm report</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>quadllm report</h1><p>{e(data['subject'])}<br>Measured on {data['calibration']['samples']} x "
             f"{data['calibration']['seqlen']} tokens of {e(data['calibration']['origin'])} (seed "
             f"{data['calibration']['seed']}); rank r = {r}, mode {e(data['mode'])}, hidden size "
             f"{data['hidden_size']}, {data['layers']} layers.</p>"]
    # outliers
    parts.append("<section id='outliers'><h2>Activation outliers</h2><p class='note'>Each row is a layer, each "
                 "column a channel of a linear layer's input; the colour is log10 of the channel's largest "
                 "magnitude over the median channel's. After the transform the first r channels (left of the cyan "
                 "line) are the full-precision outlier coordinates; the rest is what gets quantized.</p>")
    parts.append(_outlier_table(data["inputs_before"], data["inputs_after"]))
    for name, png in pngs.items():
        if name.startswith("outliers_"):
            parts.append(_img(png, name))
    parts.append("<p class='note'>Per-token crest factor (largest |x| over the token's RMS): what per-token INT4 "
                 "quantization pays for; lower is better.</p>" + _img(pngs["crest"], "crest factor"))
    parts.append(_top_channels(data["inputs_before"]) + "</section>")
    # spectrum
    en = data["spectrum"]["energy_by_rank"]
    parts.append("<section id='spectrum'><h2>Residual spectrum</h2><p class='note'>Eigenvalues of the residual "
                 "stream's second moment E[x xᵀ] (all layers' norm inputs) and the share of the energy the top-r "
                 "eigenvectors capture.</p>" + _img(pngs["spectrum"], "spectrum")
                 + _table(["r", "energy captured"], [[k, f"{100 * v:.1f}%"] for k, v in en.items()]) + "</section>")
    # errors
    err = data["linear_errors"]
    summary = [[m] + [f"{sum(v) / len(v):.4f}" for v in per.values()] for m, per in err.items()]
    parts.append("<section id='errors'><h2>Per-layer quantization error</h2><p class='note'>Relative output error "
                 "‖y_q − y‖/‖y‖ of every linear with INT4 RTN weights and per-token activations (as the mode says), "
                 "each quantized alone on the inputs of the exactly transformed float model, for the three "
                 "methods.</p>" + _img(pngs["errors"], "errors")
                 + _table(["method"] + [f"mean {n}" for n in next(iter(err.values()))], summary) + "</section>")
    # tokens
    tk = data["tokens"]
    parts.append("<section id='tokens'><h2>Tokens with the largest activations</h2><p class='note'>Largest |x| "
                 "of the residual stream at any layer's input, per token; median over all tokens: "
                 f"{tk['median_peak']:.1f}; mean at the first position: {tk['first_position_mean_peak']:.1f}. "
                 f"These {len(tk['tokens'])} tokens hold {100 * tk['top_energy_share']:.1f}% of the residual "
                 "energy.</p>" + _table(["sample", "position", "token", "peak |x|", "energy share"],
                                          [[t["sample"], t["position"], repr(t["text"]), f"{t['peak']:.1f}",
                                            f"{100 * t['energy_share']:.2f}%"] for t in tk["tokens"]])
                 + "</section>")
    # precision
    prec = data.get("precision")
    if prec:
        names = list(prec[0])
        counts: dict[str, int] = {}
        for row in prec:
            for v in row.values():
                counts[v] = counts.get(v, 0) + 1
        summary = ", ".join(f"{v}: {n}" for v, n in sorted(counts.items()))
        parts.append("<section id='precision'><h2>Precision per module</h2><p class='note'>What each decoder "
                     "linear holds and computes (fp: full-precision weight and input; wWaA: W-bit weights, "
                     "A-bit per-token activations, a16 = weight-only), read from the loaded checkpoint. "
                     f"{e(summary)}.</p>"
                     + _table(["layer", *[n.rpartition('.')[2] for n in names]],
                              [[i, *row.values()] for i, row in enumerate(prec)]) + "</section>")
    else:
        parts.append("<section id='precision'><h2>Precision per module</h2><p>This model is not quantized yet: "
                     "report on a checkpoint to see what each decoder linear holds.</p></section>")
    # memory
    mem = data["memory"]
    if mem:
        rows = [[k.replace("_", " "), f"{v / 1e6:.2f}"] for k, v in mem["parts"].items()]
        rows += [["total", f"{mem['total'] / 1e6:.2f}"], ["original (FP16)", f"{mem['original_fp16'] / 1e6:.2f}"]]
        parts.append("<section id='memory'><h2>Memory</h2>" + _img(pngs["memory"], "memory")
                     + _table(["part", "MB"], rows)
                     + f"<p>Saving: {mem['saving'] / 1e6:.1f} MB ({100 * mem['saving_share']:.1f}%). The r = "
                     f"{mem['rank']} extra dimensions cost the full-precision outlier columns "
                     f"({mem['parts'].get('outlier_columns', 0) / 1e6:.2f} MB) and make every residual-reading "
                     f"matmul {100 * mem['rank'] / mem['hidden_size']:.1f}% wider.</p></section>")
    else:
        parts.append("<section id='memory'><h2>Memory</h2><p>This model is not quantized yet: run "
                     "<code>quadllm quantize</code> and report on the checkpoint to see its memory "
                     "breakdown.</p></section>")
    parts.append(f"<p class='note'>Generated by quadllm in {data.get('seconds', 0)} s.</p></body></html>")
    return "\n".join(parts)
