"""A worked experiment with gptjax.nn.inspect: logit lens and activation patching on a trained GPT.

  python train.py --config configs/shakespeare_char.py --workdir runs/sc        # the model
  python examples/logit_lens_patching.py --workdir runs/sc --out runs/sc/inspect
  python examples/logit_lens_patching.py --smoke --out /tmp/inspect            # seconds, untrained

Logit lens: each block's output residual stream (`h_{i}.resid_post`) read through the model's
own final layer norm and output head (`inspect.logit_lens`); lens.png shows the log-probability
of the actual next token per layer and position.

Activation patching: a clean prompt and a corrupted one of the same length in tokens. The target
is the clean run's top next token at the last position, the foil the corrupted run's (or its
second choice); the metric is logit(target) - logit(foil) there. For every layer i and position
t the corrupted run is repeated with `h_{i}.resid_pre` at position t replaced by the clean run's
value; patching.png shows the fraction of the clean-minus-corrupted metric each patch restores
(1: the prediction is the clean one again), which locates where the prediction is formed: at the
corrupted position in early layers, at the last position in late ones. One jitted program per
layer, `jax.vmap`ped over the positions. Both tables go to inspect.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from gptjax import GPTConfig, init_params, load_pretrained  # noqa: E402
from gptjax.data.tokenizers import CharTokenizer  # noqa: E402
from gptjax.nn import inspect  # noqa: E402

# The clean prompt ends inside "speak"; the corrupted one, two characters back, inside "steal".
CLEAN = "First Citizen:\nBefore we proceed any further, hear me spea"
CORRUPT = "First Citizen:\nBefore we proceed any further, hear me stea"


def logit_lens(cfg, params, tokens_1xT) -> np.ndarray:
    """[L, T-1] log-probability of each next token read from each block's output."""
    names = [f"h_{i}.resid_post" for i in range(cfg.n_layer)]

    @jax.jit
    def run(p, t):
        _, acts = inspect.forward_with_capture(cfg, p, t, names)
        rows = [jax.nn.log_softmax(inspect.logit_lens(cfg, p, acts[n])[0, :-1], -1)
                for n in names]
        return jnp.stack([r[jnp.arange(t.shape[1] - 1), t[0, 1:]] for r in rows])
    return np.asarray(run(params, tokens_1xT))


def patching(cfg, params, clean_1xT, corrupt_1xT) -> dict:
    """Fraction of the clean-vs-corrupted logit difference restored per (layer, position)."""
    T = clean_1xT.shape[1]
    names = [f"h_{i}.resid_pre" for i in range(cfg.n_layer)]
    clean_logits, clean = jax.jit(lambda p: inspect.forward_with_capture(
        cfg, p, clean_1xT, names))(params)
    corrupt_logits, _ = jax.jit(lambda p: inspect.forward_with_capture(
        cfg, p, corrupt_1xT))(params)
    target = int(jnp.argmax(clean_logits[0, -1]))
    order = np.argsort(-np.asarray(corrupt_logits[0, -1]))
    foil = int(order[0] if order[0] != target else order[1])

    def metric(logits):
        return logits[0, -1, target] - logits[0, -1, foil]

    def patched(name, p, t):  # the corrupted run with the clean `name` at position t
        mask = (jnp.arange(T) == t)[None, :, None]
        out, _ = inspect.forward_with_capture(
            cfg, p, corrupt_1xT, (), {name: lambda x: jnp.where(mask, clean[name], x)})
        return metric(out)
    table = np.stack([np.asarray(jax.jit(jax.vmap(functools.partial(patched, n),
                                                  in_axes=(None, 0)))(params, jnp.arange(T)))
                      for n in names])
    m_clean, m_corrupt = float(metric(clean_logits)), float(metric(corrupt_logits))
    if abs(m_clean - m_corrupt) < 1e-6:
        raise SystemExit(f"the corruption leaves logit(target) - logit(foil) at {m_clean:.4g}: "
                         "nothing to restore; choose prompts whose next token differs")
    restored = (table - m_corrupt) / (m_clean - m_corrupt)
    return {"target": target, "foil": foil, "clean_metric": m_clean,
            "corrupt_metric": m_corrupt, "restored": restored}


def _heatmap(table, labels, title, cbar, path):
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * table.shape[1]), 1.2 + 0.4 * table.shape[0]))
    im = ax.imshow(table, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(labels)), [repr(s)[1:-1] for s in labels], fontsize=7)
    ax.set_yticks(range(table.shape[0]), [f"h_{i}" for i in range(table.shape[0])])
    ax.set_xlabel("position (token)")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=cbar)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="a train.py run (its latest checkpoint)")
    ap.add_argument("--out", required=True, help="folder for lens.png, patching.png, inspect.json")
    ap.add_argument("--clean", default=CLEAN)
    ap.add_argument("--corrupt", default=CORRUPT)
    ap.add_argument("--smoke", action="store_true",
                    help="no --workdir: an untrained tiny character model (end to end, seconds)")
    args = ap.parse_args(argv)
    if args.workdir:
        cfg, params, tok = load_pretrained(workdir=args.workdir)
    elif args.smoke:
        tok = CharTokenizer.from_text(args.clean + args.corrupt)
        cfg = GPTConfig.preset("tiny", vocab_size=tok.vocab_size, n_ctx=64)
        params = init_params(cfg, jax.random.key(0))
    else:
        ap.error("give --workdir (a train.py run), or --smoke")
    clean, corrupt = tok.encode(args.clean), tok.encode(args.corrupt)
    if len(clean) != len(corrupt) or len(clean) > cfg.n_ctx:
        ap.error(f"--clean and --corrupt are {len(clean)} and {len(corrupt)} tokens; give "
                 f"prompts of the same length, at most n_ctx={cfg.n_ctx}")
    clean_1xT, corrupt_1xT = jnp.asarray([clean]), jnp.asarray([corrupt])
    lens = logit_lens(cfg, params, clean_1xT)
    patch = patching(cfg, params, clean_1xT, corrupt_1xT)
    os.makedirs(args.out, exist_ok=True)
    pieces = [tok.decode([i]) for i in clean]
    _heatmap(lens, pieces[1:], "logit lens: log p(next token) read from h_i.resid_post",
             "log-probability", os.path.join(args.out, "lens.png"))
    _heatmap(patch["restored"], pieces, f"patching h_i.resid_pre: clean -> corrupted; target "
             f"{tok.decode([patch['target']])!r} vs {tok.decode([patch['foil']])!r}",
             "fraction restored", os.path.join(args.out, "patching.png"))
    result = {"clean": args.clean, "corrupt": args.corrupt,
              "target": tok.decode([patch["target"]]), "foil": tok.decode([patch["foil"]]),
              "clean_metric": patch["clean_metric"], "corrupt_metric": patch["corrupt_metric"],
              "lens_logprob": lens.tolist(), "lens_mean_by_layer": lens.mean(1).tolist(),
              "restored": patch["restored"].tolist()}
    with open(os.path.join(args.out, "inspect.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"target {result['target']!r} foil {result['foil']!r}: logit difference clean "
          f"{result['clean_metric']:.3f}, corrupted {result['corrupt_metric']:.3f}")
    print("logit lens, mean log p(next) by layer:",
          " ".join(f"{x:.3f}" for x in result["lens_mean_by_layer"]))
    return result


if __name__ == "__main__":
    main()
