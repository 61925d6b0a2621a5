"""TPU splash attention (Pallas Mosaic), causal or banded, over positions 0..T-1.

Splash masks by slot, not by position: it serves self-attention over positions 0..T-1 only, plus
splash's own segment ids for document-masked packing. Off TPU it runs in interpret mode, which is
how the CPU tests check it.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=64)
def _splash_kernel(T: int, H: int, window: Optional[int], block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa  # optional: TPU-only kernel

    one = (sa.CausalMask((T, T)) if window is None
           else sa.LocalMask((T, T), (window - 1, 0), offset=0))
    sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                          block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                          block_q_dq=block, block_kv_dq=block)
    # The kernel holds its block-mask tables as arrays: make them concrete even when the first
    # call happens inside a jit trace, so the cached kernel never captures a tracer.
    with jax.ensure_compile_time_eval():
        return sa.make_splash_mha_single_device(sa.MultiHeadMask([one] * H), block_sizes=sizes,
                                                interpret=interpret)


def splash_attention(q_BxTxHxD: jax.Array, k_BxTxHxD: jax.Array, v_BxTxHxD: jax.Array, *,
                     window: Optional[int] = None, block: int = 512,
                     interpret: Optional[bool] = None,
                     segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
    """TPU splash attention, causal or banded, over positions 0..T-1 (interpret mode off-TPU).

    Args:
      q_BxTxHxD, k_BxTxHxD, v_BxTxHxD: queries, keys, values.
      window: None (dense causal) or the band width.
      block: tile size (capped at T rounded up to 128).
      interpret: run the Pallas interpreter (default: unless the default backend is a TPU;
        gptjax.nn.attention passes the platform of the step's mesh).
      segment_ids_BxT: document ids of a packed window, or None: a key is then visible only to
        queries of its own document (splash's SegmentIds).

    Returns:
      [B, T, H, D] attention output.
    """
    B, T, H, D = q_BxTxHxD.shape
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    block = min(block, -(-T // 128) * 128)
    Tp = -(-T // block) * block  # trailing padding is in every real query's future: never seen

    def prep(x):
        return jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    # Splash does not scale the scores: fold 1/sqrt(D) into q.
    q = prep(q_BxTxHxD * jnp.asarray(D ** -0.5, q_BxTxHxD.dtype))
    k, v = prep(k_BxTxHxD.astype(q.dtype)), prep(v_BxTxHxD.astype(q.dtype))
    kernel = _splash_kernel(Tp, H, window, block, bool(interpret))
    if segment_ids_BxT is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        from jax.experimental.pallas.ops.tpu import splash_attention as sa  # optional: TPU kernel
        seg = jnp.pad(segment_ids_BxT.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
        out = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(s, s)))(
            q, k, v, seg)
    return out.transpose(0, 2, 1, 3)[:, :T]


def splash_unsupported(platform: Optional[str] = None) -> Optional[str]:
    """Why splash cannot run on `platform` (default: jax's default backend), or None."""
    platform = platform or jax.default_backend()
    if platform != "tpu":
        return f"needs a TPU (the platform is {platform})"
    return None
