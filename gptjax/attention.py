"""Attention behind one switch: masks from positions, and the XLA reference implementation.

Einsum letters: B batch, T query length, S key length, H heads, D head width.

Masks are computed from positions rather than slot indices, so one function serves the plain
causal forward (positions 0..T-1), left-padded prompts (padding has position -1 and is never a
key), and KV-cache decoding (keys are cache slots carrying the position they were written at).
A banded ("local") layer additionally requires q_pos - k_pos < window.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

# Large negative instead of -inf: a query with no valid key (a padding row) then gets a uniform
# softmax instead of NaN, and its output is never used.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_pos_BxT: jax.Array, k_pos_BxS: jax.Array,
                   window: Optional[int]) -> jax.Array:
    """Boolean [B, T, S]: key s is visible to query t.

    Args:
      q_pos_BxT: position of each query token (-1 for padding).
      k_pos_BxS: position of each key (-1 for padding or an empty cache slot).
      window: None for dense causal attention; w for a band of the w most recent positions.
    """
    q = q_pos_BxT[:, :, None]
    k = k_pos_BxS[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window is not None:
        mask &= (q - k) < window
    return mask


def xla_attention(q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
                  mask_BxTxS: jax.Array, *, dropout_rate: float = 0.0,
                  dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """The readable reference: einsum scores, fp32 softmax, einsum output. Returns [B, T, H, D]."""
    d = q_BxTxHxD.shape[-1]
    q_BxTxHxD = q_BxTxHxD * jnp.asarray(d ** -0.5, q_BxTxHxD.dtype)
    # Scores accumulate in fp32 whatever the compute dtype: softmax is where bf16 hurts.
    s_BxHxTxS = jnp.einsum("BTHD,BSHD->BHTS", q_BxTxHxD, k_BxSxHxD,
                           preferred_element_type=jnp.float32)
    s_BxHxTxS = jnp.where(mask_BxTxS[:, None], s_BxHxTxS, _MASK_VALUE)
    p_BxHxTxS = jax.nn.softmax(s_BxHxTxS, axis=-1)
    if dropout_rate > 0.0 and dropout_rng is not None:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, p_BxHxTxS.shape)
        p_BxHxTxS = jnp.where(keep, p_BxHxTxS / (1.0 - dropout_rate), 0.0)
    p_BxHxTxS = p_BxHxTxS.astype(v_BxSxHxD.dtype)
    return jnp.einsum("BHTS,BSHD->BTHD", p_BxHxTxS, v_BxSxHxD)


def attention(q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
              q_pos_BxT: jax.Array, k_pos_BxS: jax.Array, *, window: Optional[int],
              impl: str = "xla", dropout_rate: float = 0.0,
              dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Causal (optionally banded) multi-head attention; dispatches on `impl`.

    Args:
      q_BxTxHxD, k_BxSxHxD, v_BxSxHxD: queries, keys, values (compute dtype).
      q_pos_BxT, k_pos_BxS: token positions; -1 marks padding / empty cache slots.
      window: None (dense) or the band width of a local layer.
      impl: attention implementation (GPTConfig.attention_impl).
      dropout_rate: attention-probability dropout; applied only when dropout_rng is given.
      dropout_rng: PRNG key for dropout, or None for deterministic attention.

    Returns:
      [B, T, H, D] attention output.
    """
    if impl not in ("xla", "auto"):
        # The fused kernels (cuDNN, Pallas, splash) are added with their own tests; until then a
        # config that asks for one is refused rather than silently served by another.
        raise NotImplementedError(
            f"attention_impl={impl!r} is not available in this build; use 'xla' or 'auto'")
    mask = attention_mask(q_pos_BxT, k_pos_BxS, window)
    return xla_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, mask,
                         dropout_rate=dropout_rate, dropout_rng=dropout_rng)
