"""Attention masks from token positions, shared by the XLA paths and the fused kernels.

Masks are computed from positions rather than slot indices, so one rule serves the plain causal
forward (positions 0..T-1), left-padded prompts (padding has position -1 and is never a key), and
KV-cache decoding (keys are cache slots carrying the position they were written at). A banded
("local") layer additionally requires q_pos - k_pos < window. Document-masked packing
(`data.document_mask`) adds segment ids: a key is then visible only to queries of its own
segment (document) in the window.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# Large negative instead of -inf: a query with no valid key (a padding row) then gets a uniform
# softmax instead of NaN, and its output is never used.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, window: Optional[int],
                   q_seg_BxT: Optional[jax.Array] = None,
                   k_seg_BxS: Optional[jax.Array] = None) -> jax.Array:
    """Boolean [..., T, S]: key s is visible to query t.

    Args:
      q_pos_BxT: position of each query token (-1 for padding); [B, T], or [T] for one tile.
      k_pos_BxS: position of each key (-1 for padding or an empty cache slot); [B, S] or [S].
      window: None for dense causal attention; w for a band of the w most recent positions.
      q_seg_BxT, k_seg_BxS: segment (document) ids of queries and keys, or None (one segment);
        a key is visible only to queries of its own segment.

    Returns:
      [B, T, S] (or [T, S] for unbatched positions) booleans.
    """
    q = q_pos_BxT[..., :, None]
    k = k_pos_BxS[..., None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    if q_seg_BxT is not None:
        mask &= q_seg_BxT[..., :, None] == k_seg_BxS[..., None, :]
    return mask


# Segment ids ride in the Pallas kernel's position tiles as one int32: (segment mod 2**15) << 16 |
# position. A visible pair (same id, key position <= query position) has its packed values in
# the same order and distance as its positions, so the kernel's block skipping (by min/max of
# the tiles' values) never skips one. Ids are compared modulo 2**15: exact for windows of fewer
# than 32768 documents.
SEG_SHIFT = 16
MAX_PACKED_POSITION = (1 << SEG_SHIFT) - 1
_SEG_BITS = (1 << (31 - SEG_SHIFT)) - 1


def pack_segments(pos_BxT: jax.Array, seg_BxT: jax.Array) -> jax.Array:
    """Positions (at most MAX_PACKED_POSITION; -1 stays -1) and segment ids as one int32."""
    return jnp.where(pos_BxT >= 0, ((seg_BxT & _SEG_BITS) << SEG_SHIFT) | pos_BxT,
                     -1).astype(jnp.int32)


def packed_attention_mask(q_packed: jax.Array, k_packed: jax.Array,
                          window: Optional[int]) -> jax.Array:
    """`attention_mask` of positions and segments packed by `pack_segments`."""
    def unpack(p):
        return jnp.where(p >= 0, p & MAX_PACKED_POSITION, -1), p >> SEG_SHIFT
    (qp, qs), (kp, ks) = unpack(q_packed), unpack(k_packed)
    return attention_mask(qp, kp, window, qs, ks)


def default_positions(batch: int, length: int) -> jax.Array:
    """Positions 0..length-1 in every row, [B, T] int32."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
