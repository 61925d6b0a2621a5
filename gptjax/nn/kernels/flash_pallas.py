"""gptjax's flash-attention kernel in Pallas (Triton on GPU), forward and backward.

Masks come from positions (gptjax.nn.masks), so the kernel serves training, left-padded prompts
and KV-cache decoding alike; block pairs in which no query sees any key are skipped. Segment ids
(document-masked packing) travel packed into the position tiles (`gptjax.nn.masks.pack_segments`). Off-GPU it
runs in Pallas interpret mode, which is how the CPU tests check it.

Einsum letters: B batch, T query length, S key length, H heads, D head width.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gptjax.nn.masks import (MASK_VALUE, MAX_PACKED_POSITION, attention_mask, default_positions,
                             pack_segments, packed_attention_mask)

_LOG2E = math.log2(math.e)


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
                      scale, window, bk, precision, mask):
    q = q_ref[...]
    qp = qp_ref[...]
    bq, d = q.shape

    def body(j, carry):
        o, m, l = carry
        sl = pl.ds(j * bk, bk)
        k, v, kp = k_ref[sl, :], v_ref[sl, :], kp_ref[sl]
        # Base-2 scaled scores: exp2(x * log2 e) = exp(x), and exp2 is the fast instruction.
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
        vis = mask(qp, kp, window)
        m_new = jnp.maximum(m, jnp.max(jnp.where(vis, s, MASK_VALUE), axis=-1))
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
                       hi_ref, dk_ref, dv_ref, *, scale, window, bq, precision, mask):
    k, v, kp = k_ref[...], v_ref[...], kp_ref[...]
    bk, d = k.shape

    def body(i, carry):
        dk, dv = carry
        sl = pl.ds(i * bq, bq)
        q, qp, do = q_ref[sl, :], qp_ref[sl], do_ref[sl, :]
        lse, delta = lse_ref[sl], delta_ref[sl]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
        p = jnp.where(mask(qp, kp, window), jnp.exp2(s - lse[:, None]), 0.0)
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
                     hi_ref, dq_ref, *, scale, window, bk, precision, mask):
    q, qp, do = q_ref[...], qp_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    bq, d = q.shape

    def body(j, dq):
        sl = pl.ds(j * bk, bk)
        k, v, kp = k_ref[sl, :], v_ref[sl, :], kp_ref[sl]
        s = plgpu.dot(q, k, trans_b=True, precision=precision) * (scale * _LOG2E)
        p = jnp.where(mask(qp, kp, window), jnp.exp2(s - lse[:, None]), 0.0)
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
    return plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2)


def _mask_fn(segmented):
    # Segmented tiles hold packed positions and segment ids (gptjax.nn.masks.pack_segments).
    return packed_attention_mask if segmented else attention_mask


def _flash_forward(q, k, v, q_pos, k_pos, window, blocks, interpret, segmented):
    B, T, H, D = q.shape
    S = k.shape[1]
    bq, bk = blocks[0], blocks[1]
    lo, hi, _, _ = _block_ranges(q_pos, k_pos, window, bq, bk)
    kernel = functools.partial(_flash_fwd_kernel, scale=D ** -0.5, window=window, bk=bk,
                               precision=_dot_precision(q.dtype), mask=_mask_fn(segmented))
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


def _flash_backward(q, k, v, q_pos, k_pos, o, lse, do, window, blocks, interpret, segmented):
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
                          precision=_dot_precision(q.dtype), mask=_mask_fn(segmented)),
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
                          precision=_dot_precision(q.dtype), mask=_mask_fn(segmented)),
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_pos, k_pos, window, blocks, interpret, segmented):
    return _flash_forward(q, k, v, q_pos, k_pos, window, blocks, interpret, segmented)[0]


def _flash_vjp_fwd(q, k, v, q_pos, k_pos, window, blocks, interpret, segmented):
    o, lse = _flash_forward(q, k, v, q_pos, k_pos, window, blocks, interpret, segmented)
    return o, (q, k, v, q_pos, k_pos, o, lse)


def _flash_vjp_bwd(window, blocks, interpret, segmented, res, do):
    q, k, v, q_pos, k_pos, o, lse = res
    dq, dk, dv = _flash_backward(q, k, v, q_pos, k_pos, o, lse, do, window, blocks, interpret,
                                 segmented)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_vjp_fwd, _flash_vjp_bwd)


def _pow2_block(n: int, cap: int) -> int:
    # Triton tiles are powers of two, and its dot needs at least 16 rows.
    return min(cap, max(16, 1 << max(0, n - 1).bit_length()))


def flash_attention(q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array, v_BxSxHxD: jax.Array,
                    q_pos_BxT: Optional[jax.Array] = None, k_pos_BxS: Optional[jax.Array] = None,
                    *, window: Optional[int] = None, block_q: int = 64, block_k: int = 64,
                    block_q_bwd: int = 64, block_k_bwd: int = 64,
                    interpret: Optional[bool] = None,
                    segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
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
      segment_ids_BxT: document ids of a packed window (self-attention, S == T, positions
        counting up by one within each document), or None: a key is then visible only to
        queries of its own document.

    Returns:
      [B, T, H, D] in q's dtype.
    """
    B, T, H, D = q_BxTxHxD.shape
    S = k_BxSxHxD.shape[1]
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if q_pos_BxT is None:
        q_pos_BxT = k_pos_BxS = default_positions(B, T)
    if segment_ids_BxT is not None:
        if max(T, S) > MAX_PACKED_POSITION:
            raise ValueError(f"flash_attention with segment_ids_BxT: T={T}, S={S}; allowed: at "
                             f"most {MAX_PACKED_POSITION} (positions share an int32 with the ids)")
        seg = segment_ids_BxT.astype(jnp.int32)
        q_pos_BxT = pack_segments(q_pos_BxT.astype(jnp.int32), seg)
        k_pos_BxS = pack_segments(k_pos_BxS.astype(jnp.int32), seg)
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
    out = _flash(q, k, v, q_pos, k_pos, window, (bq, bk, bqb, bkb), bool(interpret),
                 segment_ids_BxT is not None)
    return out[:, :T, :, :D]
