"""Pure loss functions: the language-modelling loss (and, later, task losses)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax


def lm_loss(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
            weights_BxT: Optional[jax.Array] = None) -> jax.Array:
    """Mean next-token cross-entropy, in fp32, over the weighted positions.

    Args:
      logits_BxTxV: logits at each position (any float dtype; upcast to fp32).
      targets_BxT: the token that follows each position.
      weights_BxT: optional per-position weights (0 drops a position, e.g. padding). The mean is
        sum(w * nll) / sum(w); with all weights zero the loss is 0 rather than NaN.

    Returns:
      A scalar fp32 loss.
    """
    nll_BxT = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(jnp.float32), targets_BxT)
    if weights_BxT is None:
        return jnp.mean(nll_BxT)
    w = weights_BxT.astype(jnp.float32)
    return jnp.sum(nll_BxT * w) / jnp.maximum(jnp.sum(w), 1e-8)


def token_nll(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Per-position negative log-likelihood [B, T] in fp32 (for perplexity and scoring)."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits_BxTxV.astype(jnp.float32), targets_BxT)
