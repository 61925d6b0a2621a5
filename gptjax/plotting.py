"""PNG plots of training curves from metrics.jsonl."""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_metrics(metrics_path: str, out_png: str, title: str = "") -> str:
    """Train and validation loss against step (log-scaled step axis off), written as a PNG."""
    import matplotlib  # heavy: matplotlib, only when a plot is written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
