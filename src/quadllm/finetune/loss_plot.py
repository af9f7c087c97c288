"""The fine-tuning loss curve as a PNG (matplotlib, headless)."""

from __future__ import annotations

import io
import logging
from typing import Any

log = logging.getLogger(__name__)


def loss_curve_png(history: list[dict[str, Any]], title: str) -> bytes | None:
    """PNG bytes of train loss per step (and its running mean) and held-out loss; None without
    matplotlib (the JSON history is written regardless)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss plot (pip install 'quadllm[finetune]')")
        return None
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        xs, ys = zip(*train)
        ax.plot(xs, ys, color="tab:blue", alpha=0.35, lw=1, label="train (per step)")
        k = max(1, len(ys) // 20)
        smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, color="tab:blue", lw=2, label=f"train (mean of {k})")
    if val:
        xs, ys = zip(*val)
        ax.plot(xs, ys, "o-", color="tab:red", lw=2, label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
