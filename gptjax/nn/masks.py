"""Attention masks from token positions, shared by the XLA paths and the fused kernels.

Masks are computed from positions rather than slot indices, so one rule serves the plain causal
forward (positions 0..T-1), left-padded prompts (padding has position -1 and is never a key), and
KV-cache decoding (keys are cache slots carrying the position they were written at). A banded
("local") layer additionally requires q_pos - k_pos < window.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# Large negative instead of -inf: a query with no valid key (a padding row) then gets a uniform
# softmax instead of NaN, and its output is never used.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array,
                   window: Optional[int]) -> jax.Array:
    """Boolean [..., T, S]: key s is visible to query t.

    Args:
      q_pos_BxT: position of each query token (-1 for padding); [B, T], or [T] for one tile.
      k_pos_BxS: position of each key (-1 for padding or an empty cache slot); [B, S] or [S].
      window: None for dense causal attention; w for a band of the w most recent positions.

    Returns:
      [B, T, S] (or [T, S] for unbatched positions) booleans.
    """
    q = q_pos_BxT[..., :, None]
    k = k_pos_BxS[..., None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    return mask


def default_positions(batch: int, length: int) -> jax.Array:
    """Positions 0..length-1 in every row, [B, T] int32."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
