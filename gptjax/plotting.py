"""PNG plots of training curves from metrics.jsonl."""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def plot_metrics(metrics_path: str, out_png: str, title: str = "") -> str:
    """Train and validation loss against step, written as a PNG; a finetuning run's combined
    loss is drawn with its task and LM parts and labelled as such."""
    import matplotlib  # heavy: matplotlib, only when a plot is written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    recs = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    # Finetuning logs the combined loss L3 = task loss + lambda x LM loss (GPT-1) with its
    # parts; only pretraining's "loss" is a per-token cross-entropy.
    combined = any("task_loss" in r for r in recs)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss (task + lambda x LM)" if combined
                else "train loss", lw=1.2)
    for key, label in (("task_loss", "task loss (cross-entropy)"),
                       ("lm_loss", "LM loss (nats/token)")) if combined else ():
        pts = [(r["step"], r[key]) for r in recs if key in r]
        if pts:
            ax.plot(*zip(*pts), label=label, lw=0.9, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)" if combined else "cross-entropy (nats/token)")
    ax.set_title(title or os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_evals(metrics_path: str, out_png: str, prefix: str = "eval/") -> str | None:
    """Each in-training evaluation metric (`eval/<name>/<metric>`, gptjax.train.evals) against
    step, a panel per metric, written as a PNG; None (nothing written) when the log has none."""
    recs = read_metrics(metrics_path)
    keys = list(dict.fromkeys(k for r in recs for k in r if k.startswith(prefix)))
    if not keys:
        return None
    import matplotlib  # heavy: matplotlib, only when a plot is written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    cols = min(len(keys), 3)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), dpi=110,
                             squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = sorted((r["step"], r[key]) for r in recs if key in r)
        ax.plot(*zip(*pts), "o-", lw=1.2, ms=3)
        ax.set_title(key[len(prefix):], fontsize=8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))), fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def plot_layer_stats(metrics_path: str, out_png: str, title: str = "") -> str | None:
    """Per-layer statistics (`layers/<i>/<name>` records, train.layer_stats_every) against step,
    one panel per statistic and one line per layer (dark: first layer, light: last), written as
    a PNG; None (no file) when the log holds none."""
    recs = [r for r in read_metrics(metrics_path) if any(k.startswith("layers/") for k in r)]
    if not recs:
        return None
    import matplotlib  # heavy: matplotlib, only when a plot is written
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    keys = [k.split("/") for k in recs[0] if k.startswith("layers/")]
    names = list(dict.fromkeys(name for _, _, name in keys))  # in the order logged
    n_layer = 1 + max(int(i) for _, i, _ in keys)
    colors = plt.get_cmap("viridis")([i / max(n_layer - 1, 1) * 0.9 for i in range(n_layer)])
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 1.9 * len(names) + 0.6), dpi=110,
                             sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        for i in range(n_layer):
            pts = [(r["step"], r[f"layers/{i}/{name}"]) for r in recs]
            ax.plot(*zip(*pts), color=colors[i], lw=1.0, label=f"layer {i}")
        ys = [y for r in recs for k, y in r.items() if k.endswith(f"/{name}")]
        if min(ys) > 0 and max(ys) > 10 * min(ys):
            ax.set_yscale("log")  # gradient and update norms span decades over a run
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title or "per-layer statistics: " + os.path.basename(
        os.path.dirname(os.path.abspath(metrics_path))))
    if n_layer <= 12:
        axes[0, 0].legend(fontsize=7, ncol=min(n_layer, 6))
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
