"""Per-layer training statistics (`train.layer_stats_every`): parameter, gradient and update norms,
the update/parameter ratio and the RMS of each block's output, one number per layer.

The set is nanodo's (norms of params, grads and updates, intermediates sown by the model) and
Levanter's watch callbacks' (per-module parameter/gradient/update norms), summed per transformer
layer: layer i is `h_{i}` (blocks one after another) or, with `scan_layers`, period p's
`h.block_{j}` with i = p * len(attention_pattern) + j (parameters stacked over periods: the leading
axis is split here, not summed). The train step computes them on device (gptjax.train.step,
`make_train_step(layer_stats=True)`); this module also turns them into `layers/<i>/<name>` records
of metrics.jsonl and TensorBoard.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig

# Logged per layer, in this order. param_norm is of the parameters the gradient was taken at
# (before the update); update_norm of the optimizer's update (after clipping, the learning rate
# and weight decay); act_rms = sqrt(mean of the block output's squares over batch, positions and
# width), the residual stream after the block.
STATS = ("param_norm", "grad_norm", "update_norm", "update_ratio", "act_rms")


def _sumsq(tree: Any, lead: int = 0) -> jax.Array:
    """The fp32 sum of squares of every leaf of `tree` over all axes but the first `lead`."""
    return sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(lead, x.ndim)))
               for x in jax.tree.leaves(tree))


def _per_layer(model_cfg: GPTConfig, tree: Any, reduce) -> jax.Array:
    """[n_layer] of `reduce(layer subtree, lead)`, in layer order (see the module docstring)."""
    if model_cfg.scan_layers:
        blocks = [reduce(tree["h"][f"block_{j}"], 1)  # each [n_periods]
                  for j in range(len(model_cfg.attention_pattern))]
        return jnp.stack(blocks, axis=1).reshape(-1)
    return jnp.stack([reduce(tree[f"h_{i}"], 0) for i in range(model_cfg.n_layer)])


def layer_norms(model_cfg: GPTConfig, tree: Any) -> jax.Array:
    """The L2 norm of each layer's part of a parameter-shaped `tree` (parameters, gradients or
    updates): [n_layer] fp32."""
    return jnp.sqrt(_per_layer(model_cfg, tree, _sumsq))


def sown_mean_squares(model_cfg: GPTConfig, sown: dict) -> jax.Array:
    """[n_layer] block-output mean squares from the model's sown collection (what
    `GPT.apply(..., mutable=[gptjax.nn.model.LAYER_STATS])` returns under that name)."""
    return _per_layer(model_cfg, sown, lambda t, lead: t["out_ms"][0])


def step_stats(model_cfg: GPTConfig, params: Any, grads: Any, updates: Any,
               mean_squares: jax.Array) -> dict:
    """The step's statistics, `{name: [n_layer] fp32}` for every name of `STATS`.

    Args:
      model_cfg: the architecture (which layers the tree holds, scanned or not).
      params: the parameters the gradients were taken at.
      grads: the gradients (averaged over microbatches; before clipping).
      updates: the optimizer's updates.
      mean_squares: [n_layer] mean squares of the blocks' outputs (`sown_mean_squares`).
    """
    p, u = layer_norms(model_cfg, params), layer_norms(model_cfg, updates)
    return {"param_norm": p, "grad_norm": layer_norms(model_cfg, grads), "update_norm": u,
            "update_ratio": u / p, "act_rms": jnp.sqrt(mean_squares)}


def due(every: int, step: int) -> bool:
    """Whether 0-based `step` is one of every `every`th (1-based steps every, 2 x every, ...);
    never when `every` is 0 (off)."""
    return every > 0 and (step + 1) % every == 0


def record(step: int, layers: dict) -> dict:
    """The metrics.jsonl record of 1-based `step`'s statistics: `layers/<i>/<name>` floats, layer
    by layer."""
    host = {k: np.asarray(v, np.float64) for k, v in jax.device_get(layers).items()}
    out = {"step": step}
    for i in range(len(host[STATS[0]])):
        out.update({f"layers/{i}/{name}": float(host[name][i]) for name in STATS})
    return out
