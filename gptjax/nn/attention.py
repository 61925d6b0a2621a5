"""Attention behind one switch: the XLA reference, a blocked banded path, cuDNN, Pallas and splash.

Einsum letters: B batch, T query length, S key length, H heads, D head width, N blocks, W
block length.

Masks are computed from positions rather than slot indices, so one function serves the plain
causal forward (positions 0..T-1), left-padded prompts (padding has position -1 and is never a
key), and KV-cache decoding (keys are cache slots carrying the position they were written at).
A banded ("local") layer additionally requires q_pos - k_pos < window.

Passing `q_pos_BxT=None` (and `k_pos_BxS=None`) states that the keys are the queries' own tokens
at positions 0..T-1 in every row (the training forward). Kernels that only know slot-based
causal/banded masks (cuDNN, splash) and the blocked banded XLA path need that guarantee; calls
with explicit positions (ragged prompts, the KV cache) go to a kernel that reads positions
(`xla`, `pallas`) or fall back to `xla` with the reason logged once.

Implementations (`GPTConfig.attention_impl`):
  xla     einsum scores, fp32 softmax, einsum output; banded layers on long sequences use
          `local_attention_blocked` (cost linear in T at a fixed window, no T x T mask).
  cudnn   jax.nn.dot_product_attention(implementation='cudnn'): NVIDIA GPUs, bf16/fp16.
  pallas  `flash_attention` below: a Pallas (Triton on GPU) flash-attention kernel with masks
          from positions, causal/banded block skipping and a Pallas backward; interpret mode
          off-GPU so CPU tests run it.
  splash  TPU splash attention (CausalMask / LocalMask); interpret mode off-TPU.
  auto    the fastest one that applies (cuDNN on GPU, splash on TPU, else xla), with the reason
          for a fallback logged once.
Attention dropout is applied by `xla` only; the fused kernels raise ConfigError when asked for it.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Optional

import jax
import jax.numpy as jnp

from gptjax.config import ConfigError

log = logging.getLogger("gptjax.nn.attention")

# Large negative instead of -inf: a query with no valid key (a padding row) then gets a uniform
# softmax instead of NaN, and its output is never used.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
_LOG2E = math.log2(math.e)
_FUSED = ("cudnn", "pallas", "splash")

_logged: set = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


# ---------------------------------------------------------------------------- masks and reference
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


def default_positions(batch: int, length: int) -> jax.Array:
    """Positions 0..length-1 in every row, [B, T] int32."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def _dropout(p: jax.Array, rate: float, rng: Optional[jax.Array]) -> jax.Array:
    if rate > 0.0 and rng is not None:
        keep = jax.random.bernoulli(rng, 1.0 - rate, p.shape)
        p = jnp.where(keep, p / (1.0 - rate), 0.0)
    return p


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
    p_BxHxTxS = _dropout(p_BxHxTxS, dropout_rate, dropout_rng)
    p_BxHxTxS = p_BxHxTxS.astype(v_BxSxHxD.dtype)
    return jnp.einsum("BHTS,BSHD->BTHD", p_BxHxTxS, v_BxSxHxD)


def local_attention_blocked(q_BxTxHxD: jax.Array, k_BxTxHxD: jax.Array, v_BxTxHxD: jax.Array,
                            window: int, *, dropout_rate: float = 0.0,
                            dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Banded causal self-attention in blocks of `window` queries; positions 0..T-1.

    A query at position t sees keys (t - window, t], which lie in its own block of `window`
    positions or the previous one, so each block of queries attends to a 2 * window slice of
    keys: cost and memory grow as T * window instead of T^2, and no T x T mask exists. The
    scores each query keeps, and the fp32 softmax over them, are those of `xla_attention`
    (masked entries contribute exactly 0 there too), so the two agree to float rounding.
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
    s_BxNxHxWxV = jnp.where(mask_NxWxV[None, :, None], s_BxNxHxWxV, _MASK_VALUE)
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
    the keys, so a quarter of the scores (all masked) are never computed. On a 2-core CPU a
    6-head, 8 x 256 fwd+bwd went from 42 to 23 ms (torch's fused SDPA: 23 ms), see BENCHMARKS.md.
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
        s_BxHxQxS = jnp.where(visible_QxS, s_BxHxQxS, _MASK_VALUE)
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


# ---------------------------------------------------------------------------- Pallas flash attention
def _visible(qp, kp, window):
    """Mask of a [bq, bk] tile from query positions [bq] and key positions [bk]."""
    q, k = qp[:, None], kp[None, :]
    vis = (k >= 0) & (k <= q)
    if window is not None:
        vis = vis & (q - k < window)
    return vis


def _block_ranges(q_pos_BxT, k_pos_BxS, window, bq, bk):
    """Which key blocks each query block must visit, and which query blocks each key block must.

    A block pair is visited unless no query in one can see any key in the other: its keys all
    come after its last query, all fall outside the band of its first query, or there are no
    valid keys or queries. The pairs visited form one contiguous range per block (for positions
    increasing along the sequence: the causal triangle, or the band of a local layer), so the
    kernels loop over [lo, hi) and mask inside the tile. Returns int32
    (q_lo_BxNq, q_hi_BxNq, k_lo_BxNk, k_hi_BxNk).
    """
    B, T = q_pos_BxT.shape
    S = k_pos_BxS.shape[1]
    nq, nk = T // bq, S // bk
    big = jnp.int32(2 ** 30)
    qv, kv = q_pos_BxT >= 0, k_pos_BxS >= 0
    qmin = jnp.where(qv, q_pos_BxT, big).reshape(B, nq, bq).min(-1)
    qmax = jnp.where(qv, q_pos_BxT, -1).reshape(B, nq, bq).max(-1)
    kmin = jnp.where(kv, k_pos_BxS, big).reshape(B, nk, bk).min(-1)
    kmax = jnp.where(kv, k_pos_BxS, -big).reshape(B, nk, bk).max(-1)
    vis_BxNqxNk = kmin[:, None, :] <= qmax[:, :, None]
    if window is not None:
        vis_BxNqxNk &= kmax[:, None, :] > qmin[:, :, None] - window

    def span(vis):  # first visible index and last + 1 along the last axis; (0, 0) when none
        n = vis.shape[-1]
        anyv = vis.any(-1)
        lo = jnp.argmax(vis, axis=-1)
        hi = n - jnp.argmax(vis[..., ::-1], axis=-1)
        return (jnp.where(anyv, lo, 0).astype(jnp.int32), jnp.where(anyv, hi, 0).astype(jnp.int32))

    q_lo, q_hi = span(vis_BxNqxNk)
    k_lo, k_hi = span(jnp.swapaxes(vis_BxNqxNk, 1, 2))
    return q_lo, q_hi, k_lo, k_hi


def _flash_fwd_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, lo_ref, hi_ref, o_ref, lse_ref, *,
                      scale, window, bk, precision):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    q = q_ref[...]
    qp = qp_ref[...]
    bq, d = q.shape

    def body(j, carry):
        o, m, l = carry
        sl = pl.ds(j * bk, bk)
        k, v, kp = k_ref[sl, :], v_ref[sl, :], kp_ref[sl]
        # Base-2 scaled scores: exp2(x * log2 e) = exp(x), and exp2 is the fast instruction.
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
        vis = _visible(qp, kp, window)
        m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, _MASK_VALUE), axis=-1))
        # Masked entries are zeroed explicitly, so a tile with no visible key adds nothing.
        p = jnp.where(vis, jnp.exp2(s - m_new[:, None]), 0.0)
        corr = jnp.exp2(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        o = o * corr[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=precision)
        return o, m_new, l

    o = jnp.zeros((bq, d), jnp.float32)
    m = jnp.full((bq,), -jnp.inf, jnp.float32)
    l = jnp.zeros((bq,), jnp.float32)
    o, m, l = jax.lax.fori_loop(lo_ref[0], hi_ref[0], body, (o, m, l))
    empty = l == 0.0  # a query with no visible key (padding): output 0, zero gradient
    o_ref[...] = (o / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def _flash_dkdv_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, do_ref, lse_ref, delta_ref, lo_ref,
                       hi_ref, dk_ref, dv_ref, *, scale, window, bq, precision):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    k, v, kp = k_ref[...], v_ref[...], kp_ref[...]
    bk, d = k.shape

    def body(i, carry):
        dk, dv = carry
        sl = pl.ds(i * bq, bq)
        q, qp, do = q_ref[sl, :], qp_ref[sl], do_ref[sl, :]
        lse, delta = lse_ref[sl], delta_ref[sl]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
        p = jnp.where(_visible(qp, kp, window), jnp.exp2(s - lse[:, None]), 0.0)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True, precision=precision)
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True, precision=precision)
        return dk, dv

    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = jax.lax.fori_loop(lo_ref[0], hi_ref[0], body, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _flash_dq_kernel(q_ref, k_ref, v_ref, qp_ref, kp_ref, do_ref, lse_ref, delta_ref, lo_ref,
                     hi_ref, dq_ref, *, scale, window, bk, precision):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    q, qp, do = q_ref[...], qp_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    bq, d = q.shape

    def body(j, dq):
        sl = pl.ds(j * bk, bk)
        k, v, kp = k_ref[sl, :], v_ref[sl, :], kp_ref[sl]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
        p = jnp.where(_visible(qp, kp, window), jnp.exp2(s - lse[:, None]), 0.0)
        dp = plgpu.dot(do, v, trans_b=True, precision=precision)
        ds = p * (dp - delta[:, None])
        return dq + plgpu.dot(ds.astype(k.dtype), k, precision=precision)

    dq = jax.lax.fori_loop(lo_ref[0], hi_ref[0], body, jnp.zeros((bq, d), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dot_precision(dtype):
    # fp32 tiles follow jax_default_matmul_precision ('highest' in the tests: no TF32 on GPUs).
    if jnp.dtype(dtype) == jnp.float32 and str(
            jax.config.jax_default_matmul_precision).lower() in ("highest", "float32"):
        return jax.lax.Precision.HIGHEST
    return None


def _compiler_params(d):
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _flash_forward(q, k, v, q_pos, k_pos, window, blocks, interpret):
    from jax.experimental import pallas as pl

    B, T, H, D = q.shape
    S = k.shape[1]
    bq, bk = blocks[0], blocks[1]
    lo, hi, _, _ = _block_ranges(q_pos, k_pos, window, bq, bk)
    kernel = functools.partial(_flash_fwd_kernel, scale=D ** -0.5, window=window, bk=bk,
                               precision=_dot_precision(q.dtype))
    o, lse = pl.pallas_call(
        kernel,
        grid=(T // bq, B, H),
        in_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, S, None, D), lambda i, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
            pl.BlockSpec((None, 1), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, 1), lambda i, b, h: (b, i)),
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0)),
            pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, T), jnp.float32)],
        compiler_params=None if interpret else _compiler_params(D),
        interpret=interpret,
        name="gptjax_flash_fwd",
    )(q, k, v, q_pos, k_pos, lo, hi)
    return o, lse


def _flash_backward(q, k, v, q_pos, k_pos, o, lse, do, window, blocks, interpret):
    from jax.experimental import pallas as pl

    B, T, H, D = q.shape
    S = k.shape[1]
    bq, bk = blocks[2], blocks[3]
    # delta_t = sum_d o * do: the softmax-Jacobian term shared by every key of query t.
    delta = jnp.einsum("BTHD,BTHD->BHT", o.astype(jnp.float32), do.astype(jnp.float32))
    q_lo, q_hi, k_lo, k_hi = _block_ranges(q_pos, k_pos, window, bq, bk)
    scale = D ** -0.5
    params = None if interpret else _compiler_params(D)
    full_q = pl.BlockSpec((None, T, None, D), lambda j, b, h: (b, 0, h, 0))
    full_k = pl.BlockSpec((None, S, None, D), lambda j, b, h: (b, 0, h, 0))
    blk_q = pl.BlockSpec((None, bq, None, D), lambda i, b, h: (b, i, h, 0))
    blk_k = pl.BlockSpec((None, bk, None, D), lambda j, b, h: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_flash_dkdv_kernel, scale=scale, window=window, bq=bq,
                          precision=_dot_precision(q.dtype)),
        grid=(S // bk, B, H),
        in_specs=[full_q, blk_k, blk_k,
                  pl.BlockSpec((None, T), lambda j, b, h: (b, 0)),
                  pl.BlockSpec((None, bk), lambda j, b, h: (b, j)),
                  full_q,
                  pl.BlockSpec((None, None, T), lambda j, b, h: (b, h, 0)),
                  pl.BlockSpec((None, None, T), lambda j, b, h: (b, h, 0)),
                  pl.BlockSpec((None, 1), lambda j, b, h: (b, j)),
                  pl.BlockSpec((None, 1), lambda j, b, h: (b, j))],
        out_specs=[blk_k, blk_k],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="gptjax_flash_dkdv",
    )(q, k, v, q_pos, k_pos, do, lse, delta, k_lo, k_hi)
    dq = pl.pallas_call(
        functools.partial(_flash_dq_kernel, scale=scale, window=window, bk=bk,
                          precision=_dot_precision(q.dtype)),
        grid=(T // bq, B, H),
        in_specs=[blk_q, full_k, full_k,
                  pl.BlockSpec((None, bq), lambda i, b, h: (b, i)),
                  pl.BlockSpec((None, S), lambda i, b, h: (b, 0)),
                  blk_q,
                  pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
                  pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
                  pl.BlockSpec((None, 1), lambda i, b, h: (b, i)),
                  pl.BlockSpec((None, 1), lambda i, b, h: (b, i))],
        out_specs=blk_q,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="gptjax_flash_dq",
    )(q, k, v, q_pos, k_pos, do, lse, delta, q_lo, q_hi)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_pos, k_pos, window, blocks, interpret):
    return _flash_forward(q, k, v, q_pos, k_pos, window, blocks, interpret)[0]


def _flash_vjp_fwd(q, k, v, q_pos, k_pos, window, blocks, interpret):
    o, lse = _flash_forward(q, k, v, q_pos, k_pos, window, blocks, interpret)
    return o, (q, k, v, q_pos, k_pos, o, lse)


def _flash_vjp_bwd(window, blocks, interpret, res, do):
    q, k, v, q_pos, k_pos, o, lse = res
    dq, dk, dv = _flash_backward(q, k, v, q_pos, k_pos, o, lse, do, window, blocks, interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def _pow2_block(n: int, cap: int) -> int:
    # Triton tiles are powers of two, and its dot needs at least 16 rows.
    return min(cap, max(16, 1 << max(0, n - 1).bit_length()))


def flash_attention(q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
                    q_pos_BxT: Optional[jax.Array] = None, k_pos_BxS: Optional[jax.Array] = None,
                    *, window: Optional[int] = None, block_q: int = 64, block_k: int = 64,
                    block_q_bwd: int = 64, block_k_bwd: int = 64,
                    interpret: Optional[bool] = None) -> jax.Array:
    """Flash attention in Pallas with masks from positions; differentiable (Pallas backward).

    Softmax statistics are kept in fp32 per query block while key blocks stream past (FlashAttention
    2), so memory is linear in T. Masks come from positions exactly as in `attention_mask`, so the
    kernel serves training, left-padded prompts and KV-cache decoding alike; block pairs in which
    no query sees any key (above the causal diagonal, outside a band) are skipped, so a banded
    layer costs T * window. A query that sees no key (padding) returns 0 where `xla_attention`
    returns a uniform average; both are outputs nobody reads.

    Args:
      q_BxTxHxD, k_BxSxHxD, v_BxSxHxD: queries, keys, values.
      q_pos_BxT, k_pos_BxS: positions (-1: padding / empty slot); None means 0..T-1 (self-attention).
      window: None (dense causal) or the band width.
      block_q, block_k: forward tile sizes; block_q_bwd, block_k_bwd: backward tile sizes.
      interpret: run the Pallas interpreter (default: on anything but a GPU).

    Returns:
      [B, T, H, D] in q's dtype.
    """
    B, T, H, D = q_BxTxHxD.shape
    S = k_BxSxHxD.shape[1]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if q_pos_BxT is None:
        q_pos_BxT = k_pos_BxS = default_positions(B, T)
    bq, bk = _pow2_block(T, block_q), _pow2_block(S, block_k)
    bqb, bkb = _pow2_block(T, block_q_bwd), _pow2_block(S, block_k_bwd)
    # Pad the lengths to whole tiles (padding has position -1: never a key, output discarded) and
    # the head width to a power of two (zero columns change no score and are sliced off).
    Tp = -(-T // math.lcm(bq, bqb)) * math.lcm(bq, bqb)
    Sp = -(-S // math.lcm(bk, bkb)) * math.lcm(bk, bkb)
    Dp = 1 << max(0, D - 1).bit_length()
    Dp = max(Dp, 16)

    def pad(x, n):
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, Dp - D)))

    q = pad(q_BxTxHxD, Tp)
    k = pad(k_BxSxHxD.astype(q.dtype), Sp)
    v = pad(v_BxSxHxD.astype(q.dtype), Sp)
    # The softmax scale belongs to the true width D, not the padded one: fold the ratio into q.
    if Dp != D:
        q = q * jnp.asarray(math.sqrt(Dp / D), q.dtype)
    q_pos = jnp.pad(q_pos_BxT.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
    k_pos = jnp.pad(k_pos_BxS.astype(jnp.int32), ((0, 0), (0, Sp - S)), constant_values=-1)
    out = _flash(q, k, v, q_pos, k_pos, window, (bq, bk, bqb, bkb), bool(interpret))
    return out[:, :T, :, :D]


# ---------------------------------------------------------------------------- cuDNN and splash
def cudnn_attention(q_BxTxHxD: jax.Array, k_BxTxHxD: jax.Array, v_BxTxHxD: jax.Array, *,
                    window: Optional[int] = None, implementation: str = "cudnn") -> jax.Array:
    """Causal (banded) self-attention over positions 0..T-1 through jax.nn.dot_product_attention.

    `implementation='xla'` runs the same call through XLA: the tests use it to check the argument
    mapping (our window w is cuDNN's left window w - 1, right window 0) on any platform.
    """
    return jax.nn.dot_product_attention(
        q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, is_causal=True,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)


@functools.lru_cache(maxsize=64)
def _splash_kernel(T: int, H: int, window: Optional[int], block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

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
                     interpret: Optional[bool] = None) -> jax.Array:
    """TPU splash attention, causal or banded, over positions 0..T-1 (interpret mode off-TPU)."""
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
    out = jax.vmap(kernel)(q, k, v)
    return out.transpose(0, 2, 1, 3)[:, :T]


# ---------------------------------------------------------------------------- dispatch
def _cudnn_unsupported(q, head_dim) -> Optional[str]:
    """Why cuDNN cannot run this call (shape/dtype/platform), or None."""
    if jax.default_backend() != "gpu":
        return f"needs an NVIDIA GPU (the platform is {jax.default_backend()})"
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"needs bfloat16 or float16 compute (dtype={q.dtype.name}); set dtype='bfloat16'"
    if head_dim % 8 or head_dim > 256:
        return f"needs a head width that is a multiple of 8 and at most 256 (head_dim={head_dim})"
    return None


def _splash_unsupported() -> Optional[str]:
    if jax.default_backend() != "tpu":
        return f"needs a TPU (the platform is {jax.default_backend()})"
    return None


def _choose_auto(q, q_pos, dropout) -> tuple:
    """The implementation `auto` picks, and why it is not a fused kernel (None if it is)."""
    if dropout:
        return "xla", "attention dropout is on and only 'xla' applies it"
    platform = jax.default_backend()
    if platform == "gpu":
        why = _cudnn_unsupported(q, q.shape[-1])
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
              dropout_rng: Optional[jax.Array] = None) -> jax.Array:
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

    Returns:
      [B, T, H, D] attention output.

    Raises:
      ConfigError: the implementation cannot run here (platform, dtype, head width) or cannot
        apply attention dropout.
    """
    dropout = dropout_rate > 0.0 and dropout_rng is not None
    if impl == "auto":
        impl, why = _choose_auto(q_BxTxHxD, q_pos_BxT, dropout)
        if why:
            _log_once(f"attention_impl='auto' uses 'xla': {why}")
    if impl in _FUSED and dropout:
        raise ConfigError(f"attention_impl={impl!r} does not apply attention dropout "
                          f"(attn_pdrop={dropout_rate}); set attn_pdrop=0 or attention_impl='xla'")
    if impl == "cudnn":
        why = _cudnn_unsupported(q_BxTxHxD, q_BxTxHxD.shape[-1])
        if why:
            raise ConfigError(f"attention_impl='cudnn' {why}")
        if q_pos_BxT is not None:
            _log_once("attention_impl='cudnn' falls back to 'xla' for calls with explicit "
                      "positions (KV cache, padded prompts): cuDNN masks by slot, not position")
            impl = "xla"
        else:
            return cudnn_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, window=window)
    if impl == "splash":
        why = _splash_unsupported()
        if why:
            raise ConfigError(f"attention_impl='splash' {why}")
        if q_pos_BxT is not None:
            _log_once("attention_impl='splash' falls back to 'xla' for calls with explicit "
                      "positions (KV cache, padded prompts): splash masks by slot, not position")
            impl = "xla"
        else:
            return splash_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, window=window)
    if impl == "pallas":
        if jax.default_backend() == "tpu":
            raise ConfigError("attention_impl='pallas' is the Triton kernel for GPUs; "
                              "use attention_impl='splash' on TPU")
        return flash_attention(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, k_pos_BxS,
                               window=window)
    if impl != "xla":
        raise ConfigError(f"attention_impl={impl!r}: allowed values are "
                          "['xla', 'cudnn', 'pallas', 'splash', 'auto']")
    return _xla(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, k_pos_BxS, window, dropout_rate,
                dropout_rng)
