"""A small scaling sweep: final loss against non-embedding parameters, with a fitted power law.

  python bench/scaling_sweep.py                                   # about 15 min on a quiet 2-core CPU
  python bench/scaling_sweep.py --tokens 200000 --widths 32,64    # a quick check
  python bench/scaling_sweep.py --smoke --out /tmp/sweep          # end to end in seconds

Character-level Tiny Shakespeare (first 90% train, last 10% validation), 2-layer GPTs of several
widths (d_head 16), each trained for the same number of tokens with the same recipe; every width
trains --seeds models at once with gptjax.sweep (jax.vmap over the train step), so each point has
a spread over seeds. The fit is Kaplan et al.'s L(N) = (N_c / N)^alpha on the mean validation
loss (whole split, non-overlapping windows) against N, the non-embedding parameter count.
Writes scaling.json and scaling.png to --out.

This is a fixed-token budget on a tiny CPU scale, not Kaplan's converged-loss L(N): at a fixed
number of tokens the larger models are further from convergence, which flattens the curve; the
point is the machinery (vmapped seeds, the fit, the plot), measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FormatStrFormatter, NullFormatter  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptjax.defaults import base_config, model_config  # noqa: E402
from gptjax import sweep  # noqa: E402
from gptjax.data.tokenizers import CharTokenizer  # noqa: E402

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                            "shared", "data", "tinyshakespeare", "input.txt")
# --smoke: the defaults it replaces (explicit flags still win): two widths (a fit needs two
# points), one seed, 2 steps of 4 x 32 characters each.
SMOKE = dict(widths="16,32", seeds=1, tokens=256, seq_len=32, batch=4)


def _config(width, args, vocab):
    c = base_config()
    c.model = model_config("tiny", vocab_size=vocab, n_layer=args.n_layer, n_embd=width,
                           n_head=max(width // 16, 1), n_ctx=args.seq_len, embd_pdrop=0.0,
                           attn_pdrop=0.0, resid_pdrop=0.0)
    c.data.sampling = "random_offset"
    c.optim.learning_rate = args.lr
    c.optim.min_lr = args.lr / 10
    c.optim.warmup_steps = max(args.tokens // (args.batch * args.seq_len) // 20, 1)
    c.optim.weight_decay = 0.1
    c.train.steps = args.tokens // (args.batch * args.seq_len)
    c.train.batch_size = args.batch
    c.train.eval_batch_size = 64
    return c


def _plot(points, fit, path):
    n = np.array([p["non_embedding_params"] for p in points])
    mean = np.array([p["val_loss_mean"] for p in points])
    std = np.array([p["val_loss_std"] for p in points])
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    ax.errorbar(n, mean, yerr=std, fmt="o", capsize=3, label="validation loss (mean ± std "
                "over seeds)")
    xs = np.geomspace(n.min() / 1.3, n.max() * 1.3, 50)
    ax.plot(xs, (fit["n_c"] / xs) ** fit["alpha"], "--",
            label=f"L = (N_c / N)^α, α = {fit['alpha']:.3f}, N_c = {fit['n_c']:.2e}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
    ax.set_xlabel("non-embedding parameters N")
    ax.set_ylabel("validation loss (nats/char)")
    ax.set_title(f"{points[0]['tokens']:,} training tokens per model")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default=DEFAULT_DATA)
    ap.add_argument("--widths", default="32,48,64,96,128")
    ap.add_argument("--n_layer", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2, help="models per width, trained at once")
    ap.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per model")
    ap.add_argument("--seq_len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--out", default="runs/scaling_sweep")
    ap.add_argument("--smoke", action="store_true",
                    help="end to end in seconds: widths 16,32, 1 seed, 2 steps of 4 x 32 tokens "
                         "(shows the script works; the numbers mean nothing)")
    args = ap.parse_args()
    if args.smoke:
        ap.set_defaults(**SMOKE)
        args = ap.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    if len(widths) < 2 or args.tokens < args.batch * args.seq_len:
        sys.exit("error: need at least 2 widths and --tokens >= batch * seq_len")

    with open(args.data, encoding="utf-8") as fh:
        text = fh.read()
    tok = CharTokenizer.from_text(text)
    ids = np.asarray(tok.encode(text), np.int32)
    cut = int(len(ids) * 0.9)
    train, val = ids[:cut], ids[cut:]
    load = os.getloadavg()[0]
    t_all = time.time()
    points = []
    for w in widths:
        cfg = _config(w, args, tok.vocab_size)
        out = sweep.train_sweep(cfg, train, val, seeds=range(args.seeds))
        p = dict(width=w, n_layer=args.n_layer,
                 non_embedding_params=out.model_config.num_params(non_embedding=True),
                 params=out.model_config.num_params(), tokens=cfg.train.steps * args.batch *
                 args.seq_len, steps=cfg.train.steps, seeds=out.seeds,
                 val_loss=out.val_loss.tolist(), val_loss_mean=float(out.val_loss.mean()),
                 val_loss_std=float(out.val_loss.std()),
                 final_train_loss=out.losses[:, -1].tolist(), wall_time_s=out.wall_time_s)
        points.append(p)
        print(f"width {w}: N={p['non_embedding_params']:,} val loss "
              f"{p['val_loss_mean']:.4f} ± {p['val_loss_std']:.4f} ({args.seeds} seeds, "
              f"{p['steps']} steps, {out.wall_time_s:.0f}s)", flush=True)
    fit = sweep.fit_power_law([p["non_embedding_params"] for p in points],
                              [p["val_loss_mean"] for p in points])
    os.makedirs(args.out, exist_ok=True)
    result = dict(points=points, fit=fit, args=vars(args), wall_time_s=time.time() - t_all,
                  load_average_start=load, load_average_end=os.getloadavg()[0])
    with open(os.path.join(args.out, "scaling.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    _plot(points, fit, os.path.join(args.out, "scaling.png"))
    print(f"fit: L(N) = ({fit['n_c']:.3e} / N)^{fit['alpha']:.4f}, r2 {fit['r2']:.3f}; "
          f"wall {result['wall_time_s']:.0f}s (load average {load:.1f} -> "
          f"{result['load_average_end']:.1f}); {args.out}/scaling.json, scaling.png")


if __name__ == "__main__":
    main()
