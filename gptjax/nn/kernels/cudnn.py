"""cuDNN's fused attention through jax.nn.dot_product_attention (NVIDIA GPUs, bf16/fp16).

cuDNN masks by slot, not by position: it serves self-attention over positions 0..T-1 only.
jax.nn.dot_product_attention (jax 0.10) takes sequence lengths (padding) but no segment ids, so
document-masked packing cannot run on it (gptjax.nn.attention raises ConfigError).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def cudnn_attention(q_BxTxHxD: jax.Array, k_BxTxHxD: jax.Array, v_BxTxHxD: jax.Array, *,
                    window: Optional[int] = None, implementation: str = "cudnn") -> jax.Array:
    """Causal (banded) self-attention over positions 0..T-1 through jax.nn.dot_product_attention.

    `implementation='xla'` runs the same call through XLA: the tests use it to check the argument
    mapping (our window w is cuDNN's left window w - 1, right window 0) on any platform.

    Args:
      q_BxTxHxD, k_BxTxHxD, v_BxTxHxD: queries, keys, values.
      window: None (dense causal) or the band width.
      implementation: jax.nn.dot_product_attention's implementation ('cudnn' or 'xla').

    Returns:
      [B, T, H, D] attention output.
    """
    return jax.nn.dot_product_attention(
        q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)


def cudnn_unsupported(q: jax.Array, platform: Optional[str] = None) -> Optional[str]:
    """Why cuDNN cannot run attention on these queries (platform, dtype, head width), or None.

    `platform` is that of the devices the step is compiled for (default: jax's default backend).
    """
    head_dim = q.shape[-1]
    platform = platform or jax.default_backend()
    if platform != "gpu":
        return f"needs an NVIDIA GPU (the platform is {platform})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs bfloat16 or float16 compute (dtype={q.dtype.name}); set dtype='bfloat16'"
    if head_dim % 8 or head_dim > 256:
        return f"needs a head width that is a multiple of 8 and at most 256 (head_dim={head_dim})"
    return None
