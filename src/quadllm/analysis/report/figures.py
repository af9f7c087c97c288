"""The report's figures as PNG bytes (matplotlib, headless)."""

from __future__ import annotations

import io
import math
from typing import Any


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def outlier_heatmap(before: list[dict[str, Any]], after: list[dict[str, Any]] | None, title: str) -> bytes:
    """log10(channel max / median channel max), layers x channels, before and after."""
    plt = _plt()
    panels = [("original", before)] + ([("after the QUAD transform", after)] if after else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (label, rows) in zip(axes[0], panels):
        grid = [[math.log10(max(v, 1e-12) / max(r["median"], 1e-12)) for v in r["chan_max"]] for r in rows]
        im = ax.imshow(grid, aspect="auto", cmap="magma", vmin=-0.5, vmax=max(2.0, max(max(g) for g in grid)),
                       interpolation="nearest")
        skip = rows[0].get("outlier_columns", 0)
        if skip:
            ax.axvline(skip - 0.5, color="cyan", lw=1)
            ax.text(skip / 2, -1, "FP", color="cyan", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{title}: {label}", fontsize=9)
        ax.set_xlabel("channel")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax, label="log10(max / median)")
    fig.tight_layout()
    return _png(fig)


def crest_plot(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]] | None) -> bytes:
    """Mean per-token crest factor (max / RMS) of every linear input across layers."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (kind, rows) in enumerate(before.items()):
        ax.plot([r["crest"] for r in rows], color=colors[i % len(colors)], ls="--", label=f"{kind} (original)")
        if after and kind in after:
            ax.plot([r["crest"] for r in after[kind]], color=colors[i % len(colors)], label=f"{kind} (QUAD, quantized part)")
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("mean token max / RMS")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return _png(fig)


def spectrum_plot(evals: list[float], energy: dict[int, float], chosen: int) -> bytes:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.semilogy(range(1, len(evals) + 1), [max(e, 1e-30) for e in evals])
    a.axvline(chosen, color="red", lw=1, label=f"r = {chosen}")
    a.set_xlabel("eigenvalue index")
    a.set_ylabel("eigenvalue of E[x xᵀ]")
    a.legend()
    a.grid(alpha=0.3)
    total = sum(evals)
    cum, acc = [], 0.0
    for e in evals:
        acc += e
        cum.append(acc / total)
    b.plot(range(1, len(evals) + 1), cum)
    for r, v in energy.items():
        b.plot([r], [v], "o", color="red" if r == chosen else "black")
        b.annotate(f"r={r}: {100 * v:.1f}%", (r, v), textcoords="offset points", xytext=(5, -12), fontsize=7)
    b.set_xscale("log")
    b.set_xlabel("rank r")
    b.set_ylabel("energy captured")
    b.grid(alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def error_plot(errors: dict[str, dict[str, list[float]]]) -> bytes:
    plt = _plt()
    names = list(next(iter(errors.values())))
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        for method, per in errors.items():
            ax.semilogy(per[name], label=method)
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.supxlabel("layer", fontsize=8)
    fig.supylabel("relative output error", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def memory_plot(parts: dict[str, int], original: int) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 2.4))
    left = 0.0
    for name, n in parts.items():
        ax.barh(["quantized"], [n / 1e6], left=left, label=f"{name} ({n / 1e6:.1f} MB)")
        left += n / 1e6
    ax.barh(["original FP16"], [original / 1e6], color="gray", label=f"original FP16 ({original / 1e6:.1f} MB)")
    ax.set_xlabel("MB")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)
