"""Attention behind one switch: the XLA reference, a blocked banded path, cuDNN, Pallas and splash.

Einsum letters: B batch, T query length, S key length, H heads, D head width, N blocks, W
block length.

Masks come from positions (gptjax.nn.masks), so one rule serves the plain causal forward,
left-padded prompts and KV-cache decoding.

Passing `q_pos_BxT=None` (and `k_pos_BxS=None`) states that the keys are the queries' own tokens
at positions 0..T-1 in every row (the training forward). Kernels that only know slot-based
causal/banded masks (cuDNN, splash) and the blocked banded XLA path need that guarantee; calls
with explicit positions (ragged prompts, the KV cache) go to a kernel that reads positions
(`xla`, `pallas`) or fall back to `xla` with the reason logged once.

Implementations (`GPTConfig.attention_impl`):
  xla     einsum scores, fp32 softmax, einsum output; banded layers on long sequences use
          `local_attention_blocked` (cost linear in T at a fixed window, no T x T mask).
  cudnn   jax.nn.dot_product_attention(implementation='cudnn'): NVIDIA GPUs, bf16/fp16.
  pallas  `flash_attention` (gptjax.nn.kernels.flash_pallas): a Pallas (Triton on GPU)
          flash-attention kernel with masks from positions, causal/banded block skipping and a
          Pallas backward; interpret mode off-GPU so CPU tests run it.
  splash  TPU splash attention (gptjax.nn.kernels.splash; CausalMask / LocalMask); interpret
          mode off-TPU.
  auto    the fastest one that applies (cuDNN on GPU, splash on TPU, else xla), with the reason
          for a fallback logged once.
Attention dropout is applied by `xla` only; the fused kernels raise ConfigError when asked for it.

Segment ids (`segment_ids_BxT`, document-masked packing: `data.document_mask`) confine each query
to the keys of its own document in a packed window. `xla` masks them with the positions (the
dense masked path), `pallas` reads them in its tiles, `splash` takes its own SegmentIds; cuDNN
cannot (jax.nn.dot_product_attention has no segment ids) and raises ConfigError, and `auto` then
picks splash on TPU, else xla.

Under a mesh (`jax.set_mesh` or `with mesh:` while the step is traced) the fused kernels run inside
`jax.shard_map` (gptjax.nn.kernels.sharded): batch over the mesh axes of the 'batch' rule, heads
over those of 'heads'. The platform that decides `auto` and the kernels' checks is that of the
mesh's devices (else jax's default backend), so a step compiled ahead of time for a TPU topology
from a CPU host picks splash.
"""

from __future__ import annotations

import logging
from typing import Optional

import jax
import jax.numpy as jnp

from gptjax.config import ConfigError
from gptjax.nn.kernels import (cudnn_attention, cudnn_unsupported, flash_attention,
                               mesh_platform, shard_kernel, splash_attention, splash_unsupported)
from gptjax.nn.masks import MASK_VALUE, attention_mask, default_positions

__all__ = ["attention", "attention_mask", "attention_probs", "causal_attention",
           "cudnn_attention", "default_positions", "flash_attention", "local_attention_blocked",
           "splash_attention", "xla_attention"]

log = logging.getLogger("gptjax.nn.attention")

_FUSED = ("cudnn", "pallas", "splash")
# The kernels that mask by slot: (name in messages, kernel, why it cannot run here or None).
_SLOT_MASKED = {"cudnn": ("cuDNN", cudnn_attention, cudnn_unsupported),
                "splash": ("splash", splash_attention,
                           lambda q, platform: splash_unsupported(platform))}

_logged: set = set()
_CUDNN_NO_SEGMENTS = ("cannot mask documents: jax.nn.dot_product_attention takes no segment ids; "
                      "kernels that can: 'xla', 'pallas', 'splash' (or 'auto')")


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


# ---------------------------------------------------------------------------- XLA paths
def _dropout(p: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    if rate > 0.0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - rate, p.shape)
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return p


def xla_attention(q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
                  mask_BxTxS: jax.Array, *, dropout_rate: float = 0.0,
                  dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """The readable reference: einsum scores, fp32 softmax, einsum output.

    Args:
      q_BxTxHxD, k_BxSxHxD, v_BxSxHxD: queries, keys, values.
      mask_BxTxS: which keys each query sees (`attention_mask`).
      dropout_rate: attention-probability dropout; applied only when dropout_rng is given.
      dropout_rng: PRNG key for dropout, or None.

    Returns:
      [B, T, H, D] attention output.
    """
    p_BxHxTxS = _softmax_probs(q_BxTxHxD, k_BxSxHxD, mask_BxTxS)
    p_BxHxTxS = _dropout(p_BxHxTxS, dropout_rate, dropout_rng)
    p_BxHxTxS = p_BxHxTxS.astype(v_BxSxHxD.dtype)
    return jnp.einsum("BHTS,BSHD->BTHD", p_BxHxTxS, v_BxSxHxD)


def _softmax_probs(q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array,
                   mask_BxTxS: jax.Array) -> jax.Array:
    d = q_BxTxHxD.shape[-1]
    q_BxTxHxD = q_BxTxHxD * jnp.asarray(d ** -0.5, q_BxTxHxD.dtype)
    # Scores accumulate in fp32 whatever the compute dtype: softmax is where bf16 hurts.
    s_BxHxTxS = jnp.einsum("BTHD,BSHD->BHTS", q_BxTxHxD, k_BxSxHxD,
                           preferred_element_type=jnp.float32)
    s_BxHxTxS = jnp.where(mask_BxTxS[:, None], s_BxHxTxS, MASK_VALUE)
    return jax.nn.softmax(s_BxHxTxS, axis=-1)


def attention_probs(q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array, q_pos_BxT: jax.Array,
                    k_pos_BxS: jax.Array, window: Optional[int],
                    segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
    """The attention probabilities [B, H, T, S] (fp32) of `xla_attention`, before dropout.

    Args:
      q_BxTxHxD, k_BxSxHxD: queries and keys.
      q_pos_BxT, k_pos_BxS: their positions (-1: padding / an empty cache slot).
      window: None (dense) or the band width of a local layer.
      segment_ids_BxT: document ids of a packed window (self-attention), or None.
    """
    mask = attention_mask(q_pos_BxT, k_pos_BxS, window, segment_ids_BxT, segment_ids_BxT)
    return _softmax_probs(q_BxTxHxD, k_BxSxHxD, mask)


def local_attention_blocked(q_BxTxHxD: jax.Array, k_BxTxHxD: jax.Array, v_BxTxHxD: jax.Array,
                            window: int, *, dropout_rate: float = 0.0,
                            dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Banded causal self-attention in blocks of `window` queries; positions 0..T-1.

    A query at position t sees keys (t - window, t], which lie in its own block of `window`
    positions or the previous one, so each block of queries attends to a 2 * window slice of
    keys: cost and memory grow as T * window instead of T^2, and no T x T mask exists. The
    scores each query keeps, and the fp32 softmax over them, are those of `xla_attention`
    (masked entries contribute exactly 0 there too), so the two agree to float rounding.

    Args:
      q_BxTxHxD, k_BxTxHxD, v_BxTxHxD: queries, keys, values of the same T tokens.
      window: the band width w.
      dropout_rate: attention-probability dropout; applied only when dropout_rng is given.
      dropout_rng: PRNG key for dropout, or None.

    Returns:
      [B, T, H, D] attention output.
    """
    B, T, H, D = q_BxTxHxD.shape
    W = window
    N = -(-T // W)
    pad = N * W - T

    def blocks(x):  # [B, T, H, D] -> [B, N, W, H, D], zero-padded at the end (future positions)
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(B, N, W, H, D)

    def with_previous(x_BxNxWxHxD):  # keys of the previous block, then this block's: [B,N,2W,H,D]
        prev = jnp.pad(x_BxNxWxHxD, ((0, 0), (1, 0), (0, 0), (0, 0), (0, 0)))[:, :-1]
        return jnp.concatenate([prev, x_BxNxWxHxD], axis=2)

    q_BxNxWxHxD = blocks(q_BxTxHxD) * jnp.asarray(D ** -0.5, q_BxTxHxD.dtype)
    k_BxNxVxHxD = with_previous(blocks(k_BxTxHxD))  # V = 2W keys per block
    v_BxNxVxHxD = with_previous(blocks(v_BxTxHxD))
    s_BxNxHxWxV = jnp.einsum("BNWHD,BNVHD->BNHWV", q_BxNxWxHxD, k_BxNxVxHxD,
                             preferred_element_type=jnp.float32)
    # Key j of block n sits at position (n - 1) * W + j; query i at n * W + i.
    n = jnp.arange(N)[:, None, None]
    q_pos = n * W + jnp.arange(W)[None, :, None]
    k_pos = (n - 1) * W + jnp.arange(2 * W)[None, None, :]
    mask_NxWxV = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < W)
    s_BxNxHxWxV = jnp.where(mask_NxWxV[None, :, None], s_BxNxHxWxV, MASK_VALUE)
    p_BxNxHxWxV = jax.nn.softmax(s_BxNxHxWxV, axis=-1)
    p_BxNxHxWxV = _dropout(p_BxNxHxWxV, dropout_rate, dropout_rng).astype(v_BxTxHxD.dtype)
    o_BxNxWxHxD = jnp.einsum("BNHWV,BNVHD->BNWHD", p_BxNxHxWxV, v_BxNxVxHxD)
    return o_BxNxWxHxD.reshape(B, N * W, H, D)[:, :T]


def causal_attention(q_BxTxHxD: jax.Array, k_BxTxHxD: jax.Array, v_BxTxHxD: jax.Array, *,
                     dropout_rate: float = 0.0,
                     dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Dense causal self-attention at positions 0..T-1: `xla_attention`'s numbers, faster on CPU.

    Three changes from the reference, each the same math: heads are moved in front of the
    sequence ([B, H, T, D], the batch layout the dots want); the softmax is not normalized
    before the value product: exp(s - max) multiplies V and the [B, H, T, D] output is divided
    by the row sums (T x D divisions and no T x S ones, and a shorter backward); and without
    dropout the queries are split in two halves, the first of which only sees the first half of
    the keys, so a quarter of the scores (all masked) are never computed. At 8 x 256 with 6 heads
    its fwd+bwd on a 2-core CPU is as fast as torch's fused SDPA (BENCHMARKS.md, "Attention").

    Args:
      q_BxTxHxD, k_BxTxHxD, v_BxTxHxD: queries, keys, values of the same T tokens.
      dropout_rate: attention-probability dropout; applied only when dropout_rng is given.
      dropout_rng: PRNG key for dropout, or None.

    Returns:
      [B, T, H, D] attention output.
    """
    B, T, H, D = q_BxTxHxD.shape
    dt = v_BxTxHxD.dtype
    dropout = dropout_rate > 0.0 and dropout_rng is not None
    q_BxHxTxD = jnp.transpose(q_BxTxHxD * jnp.asarray(D ** -0.5, q_BxTxHxD.dtype), (0, 2, 1, 3))
    k_BxHxTxD = jnp.transpose(k_BxTxHxD, (0, 2, 1, 3))
    v_BxHxTxD = jnp.transpose(v_BxTxHxD, (0, 2, 1, 3))

    def block(q_BxHxQxD, first, S):  # queries first..first+Q-1 against keys 0..S-1
        Q = q_BxHxQxD.shape[2]
        s_BxHxQxS = jnp.einsum("BHQD,BHSD->BHQS", q_BxHxQxD, k_BxHxTxD[:, :, :S],
                               preferred_element_type=jnp.float32)
        visible_QxS = jnp.arange(S)[None, :] <= (first + jnp.arange(Q))[:, None]
        s_BxHxQxS = jnp.where(visible_QxS, s_BxHxQxS, MASK_VALUE)
        # Any shift gives the same softmax; the max keeps exp in range (no gradient needed).
        m_BxHxQx1 = jax.lax.stop_gradient(jnp.max(s_BxHxQxS, axis=-1, keepdims=True))
        e_BxHxQxS = jnp.exp(s_BxHxQxS - m_BxHxQx1)
        total_BxHxQx1 = jnp.sum(e_BxHxQxS, axis=-1, keepdims=True)
        e_BxHxQxS = _dropout(e_BxHxQxS, dropout_rate, dropout_rng)
        o_BxHxQxD = jnp.einsum("BHQS,BHSD->BHQD", e_BxHxQxS.astype(dt), v_BxHxTxD[:, :, :S],
                               preferred_element_type=jnp.float32)
        return (o_BxHxQxD / total_BxHxQx1).astype(dt)

    if dropout or T < 128 or T % 2:
        # One block: the dropout mask has the reference's shape, so the same key draws it.
        o_BxHxTxD = block(q_BxHxTxD, 0, T)
    else:
        h = T // 2
        o_BxHxTxD = jnp.concatenate([block(q_BxHxTxD[:, :, :h], 0, h),
                                     block(q_BxHxTxD[:, :, h:], h, T)], axis=2)
    return jnp.transpose(o_BxHxTxD, (0, 2, 1, 3))


def _xla(q, k, v, q_pos, k_pos, window, dropout_rate, dropout_rng):
    B, T = q.shape[:2]
    # The blocked path pays 2W scores per query against T for the masked one.
    if q_pos is None and window is not None and T > 2 * window:
        return local_attention_blocked(q, k, v, window, dropout_rate=dropout_rate,
                                       dropout_rng=dropout_rng)
    if q_pos is None and window is None:
        return causal_attention(q, k, v, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
    if q_pos is None:
        q_pos = k_pos = default_positions(B, T)
    mask = attention_mask(q_pos, k_pos, window)
    return xla_attention(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)


def _choose_auto(q, q_pos, dropout, segmented: bool = False) -> tuple:
    """The implementation `auto` picks, and why it is not a fused kernel (None if it is)."""
    if dropout:
        return "xla", "attention dropout is on and only 'xla' applies it"
    platform = mesh_platform()
    if platform == "gpu" and segmented:
        return "xla", f"cuDNN {_CUDNN_NO_SEGMENTS}"
    if platform == "gpu":
        why = cudnn_unsupported(q, platform)
        if why is None and q_pos is None:
            return "cudnn", None
        return "xla", f"cuDNN {why or 'needs positions 0..T-1 (no KV cache, no padding)'}"
    if platform == "tpu":
        if q_pos is None:
            return "splash", None
        return "xla", "splash needs positions 0..T-1 (no KV cache, no padding)"
    return "xla", f"no fused attention kernel is faster on {platform}"


def attention(q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
              q_pos_BxT: Optional[jax.Array], k_pos_BxS: Optional[jax.Array], *,
              window: Optional[int], impl: str = "xla", dropout_rate: float = 0.0,
              dropout_rng: Optional[jax.Array] = None,
              segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
    """Causal (optionally banded) multi-head attention; dispatches on `impl`.

    Args:
      q_BxTxHxD, k_BxSxHxD, v_BxSxHxD: queries, keys, values (compute dtype).
      q_pos_BxT, k_pos_BxS: token positions; -1 marks padding / empty cache slots. Both None:
        self-attention at positions 0..T-1 in every row (S == T), which lets slot-masked kernels
        (cuDNN, splash, the blocked banded path) run.
      window: None (dense) or the band width of a local layer.
      impl: attention implementation (GPTConfig.attention_impl).
      dropout_rate: attention-probability dropout; applied only when dropout_rng is given.
      dropout_rng: PRNG key for dropout, or None for deterministic attention.
      segment_ids_BxT: document ids of a packed window (self-attention, S == T, positions
        counting up by one within each document), or None: a key is then visible only to
        queries of its own document.

    Returns:
      [B, T, H, D] attention output.

    Raises:
      ConfigError: the implementation cannot run here (platform, dtype, head width) or cannot
        apply attention dropout or segment ids.
    """
    dropout = dropout_rate > 0.0 and dropout_rng is not None
    segmented = segment_ids_BxT is not None
    if impl == "auto":
        impl, why = _choose_auto(q_BxTxHxD, q_pos_BxT, dropout, segmented)
        if why:
            _log_once(f"attention_impl='auto' uses 'xla': {why}")
    if impl in _FUSED and dropout:
        raise ConfigError(f"attention_impl={impl!r} does not apply attention dropout "
                          f"(attn_pdrop={dropout_rate}); set attn_pdrop=0 or attention_impl='xla'")
    if segmented:
        return _segmented(impl, q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, k_pos_BxS,
                          segment_ids_BxT, window, dropout_rate, dropout_rng)
    if impl in _SLOT_MASKED:
        out = _slot_masked(impl, q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, window)
        if out is not None:
            return out
        impl = "xla"
    if impl == "pallas":
        platform = _pallas_platform()

        def pallas(q, k, v, q_pos, k_pos):
            return flash_attention(q, k, v, q_pos, k_pos, window=window,
                                   interpret=platform != "gpu")
        return shard_kernel(pallas, q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, k_pos_BxS)
    _check_impl(impl)
    return _xla(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, k_pos_BxS, window, dropout_rate,
                dropout_rng)


def _slot_masked(impl: str, q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
                 q_pos_BxT: Optional[jax.Array], window: Optional[int]) -> Optional[jax.Array]:
    """Run a slot-masked kernel (cuDNN, splash); None when the call has explicit positions."""
    label, kernel, unsupported = _SLOT_MASKED[impl]
    platform = mesh_platform()
    why = unsupported(q_BxTxHxD, platform)
    if why:
        raise ConfigError(f"attention_impl={impl!r} {why}")
    if q_pos_BxT is not None:
        _log_once(f"attention_impl={impl!r} falls back to 'xla' for calls with explicit "
                  f"positions (KV cache, padded prompts): {label} masks by slot, not position")
        return None
    extra = {"interpret": platform != "tpu"} if impl == "splash" else {}

    def one_shard(q, k, v, q_pos, k_pos):  # slot-masked: positions are 0..T-1 (None here)
        return kernel(q, k, v, window=window, **extra)
    return shard_kernel(one_shard, q_BxTxHxD, k_BxSxHxD, v_BxSxHxD)


def _pallas_platform() -> str:
    platform = mesh_platform()
    if platform == "tpu":
        raise ConfigError("attention_impl='pallas' is the Triton kernel for GPUs; "
                          "use attention_impl='splash' on TPU")
    return platform


def _check_impl(impl: str) -> None:
    if impl != "xla":
        raise ConfigError(f"attention_impl={impl!r}: allowed values are "
                          "['xla', 'cudnn', 'pallas', 'splash', 'auto']")


def _segmented(impl: str, q, k, v, q_pos, k_pos, seg, window, dropout_rate, dropout_rng):
    """`attention` with segment ids: each query sees only its own document's keys."""
    if impl == "cudnn":
        raise ConfigError(f"attention_impl='cudnn' {_CUDNN_NO_SEGMENTS}")
    if impl == "splash":
        platform = mesh_platform()
        why = splash_unsupported(platform)
        if why:
            raise ConfigError(f"attention_impl='splash' {why}")
        if q_pos is None:
            def splash(q, k, v, q_pos, k_pos, s):
                return splash_attention(q, k, v, window=window, interpret=platform != "tpu",
                                        segment_ids_BxT=s)
            return shard_kernel(splash, q, k, v, None, None, seg)
        _log_once("attention_impl='splash' falls back to 'xla' for calls with explicit "
                  "positions (KV cache, padded prompts): splash masks by slot, not position")
        impl = "xla"
    if impl == "pallas":
        platform = _pallas_platform()

        def pallas(q, k, v, q_pos, k_pos, s):
            return flash_attention(q, k, v, q_pos, k_pos, window=window,
                                   interpret=platform != "gpu", segment_ids_BxT=s)
        return shard_kernel(pallas, q, k, v, q_pos, k_pos, seg)
    _check_impl(impl)
    if q_pos is None:
        q_pos = k_pos = default_positions(*q.shape[:2])
    mask = attention_mask(q_pos, k_pos, window, seg, seg)
    return xla_attention(q, k, v, mask, dropout_rate=dropout_rate, dropout_rng=dropout_rng)
