"""Key/value caches as the attention sees them: a dense cache per row, or a pool of pages.

The attention layer knows neither slots nor requests: it gets a cache *view* and calls
`view.attend(layer_cache, q, k, v, q_pos, attend)`, which writes this call's keys/values into the
layer's storage and returns the attention output over everything the row may see, with the new
storage. Two views:

  * `DenseView`: the cache of `gptjax.nn.model.init_cache` (generate, beam search): per layer
    keys/values [B*H, D, S], one shared write index, slot positions [B, S] (-1 = empty).
  * `PagedView`: a pool of fixed-size pages per layer, keys/values [n_pages, page, H, D] (vLLM,
    tpu-inference's ragged paged attention, Levanter's page table); `PagedCache` holds the pool and
    the view. Each row owns a list of pages (its block table, kept by the caller): position p of
    a row lives in slot p % page of its page p // page. A call writes its tokens with one scatter
    into their slots, then attends over a flat list of pages: the pages every row has filled so
    far, concatenated (`page_row` says whose each is), padded to a bucket length. Scores are
    computed per page and reduced per row with segment max / sums (a softmax split over pages),
    so a step costs the pages rows actually hold, not rows x the longest row.

Shape suffixes as in gptjax.nn.model; here also P flat pages, G page size (slots per page),
N pool pages.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp

from gptjax.nn.masks import MASK_VALUE

Array = jax.Array


@flax.struct.dataclass
class DenseView:
    """A dense cache's view: this call writes slots [index, index + T); `k_pos_BxS` is every
    slot's position after the write (-1 = empty)."""

    index: Array
    k_pos_BxS: Array

    def attend(self, layer: dict, q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array,
               q_pos_BxT: Array, attend: Callable, window: Optional[int] = None) -> tuple:
        """Write this call's keys/values at the index, attend over the whole cache (`attend`
        already knows the layer's window).

        Heads are folded into the batch (N = B*H rows, one head each) and the cache holds each
        row's keys and values as one [D, S] matrix, the operand layout XLA:CPU's batched dots
        want for q.k (contracting D) and p.v (contracting S). A decode step then reads and
        updates the cache in place. A [B, S, H, D] cache would be copied whole into this order
        on every step, and [B, H, D, S] still costs copies at batch 1 (XLA drops the unit batch
        axis from the dots, and the reshape between the in-place update and the dot defeats the
        aliasing).

        Returns:
          (out_BxTxHxD, {"k", "v"} after the write).
        """
        k_cache, v_cache = layer["k"], layer["v"]
        B, T, H, D = q_BxTxHxD.shape
        dt = q_BxTxHxD.dtype

        def rows_NxDxT(x_BxTxHxD):
            return jnp.transpose(x_BxTxHxD, (0, 2, 3, 1)).reshape(B * H, D, T)

        k_NxDxS = jax.lax.dynamic_update_slice(
            k_cache, rows_NxDxT(k_BxTxHxD).astype(k_cache.dtype), (0, 0, self.index))
        v_NxDxS = jax.lax.dynamic_update_slice(
            v_cache, rows_NxDxT(v_BxTxHxD).astype(v_cache.dtype), (0, 0, self.index))
        q_NxTx1xD = jnp.transpose(q_BxTxHxD, (0, 2, 1, 3)).reshape(B * H, T, 1, D)
        # The transposes below fold into the attention dots; nothing is copied.
        out_NxTx1xD = attend(q_NxTx1xD, jnp.swapaxes(k_NxDxS, 1, 2)[:, :, None].astype(dt),
                             jnp.swapaxes(v_NxDxS, 1, 2)[:, :, None].astype(dt),
                             jnp.repeat(q_pos_BxT, H, axis=0),
                             jnp.repeat(self.k_pos_BxS, H, axis=0))
        out_BxTxHxD = jnp.transpose(out_NxTx1xD.reshape(B, H, T, D), (0, 2, 1, 3))
        return out_BxTxHxD, {"k": k_NxDxS, "v": v_NxDxS}


@flax.struct.dataclass
class PagedView:
    """Where a call over a page pool writes and what it reads.

    Attributes:
      write_BxT: flat pool slot (page * G + offset) of each of this call's tokens; a value
        outside the pool (e.g. -1) drops the token's write (padding).
      page_ids_P: the pages to attend over, each row's in order, concatenated, padded.
      page_row_P: the row (query batch index) each page belongs to; B marks padding.
      page_pos_P: the position held by slot 0 of each page (its index in its row x G).
      window: None (dense layers), or the band of a local layer (static).
    """

    write_BxT: Array
    page_ids_P: Array
    page_row_P: Array
    page_pos_P: Array

    def attend(self, layer: dict, q_BxTxHxD: Array, k_BxTxHxD: Array, v_BxTxHxD: Array,
               q_pos_BxT: Array, attend: Callable, window: Optional[int] = None) -> tuple:
        """Scatter this call's keys/values into their slots, attend over the rows' pages.

        Returns:
          (out_BxTxHxD, {"k", "v"} pools after the write).
        """
        k_NxGxHxD, v_NxGxHxD = layer["k"], layer["v"]
        N, G, H, D = k_NxGxHxD.shape
        B, T = q_BxTxHxD.shape[:2]
        slots = self.write_BxT.reshape(-1)
        slots = jnp.where((slots >= 0) & (slots < N * G), slots, N * G)  # out of range: dropped

        def write(pool, x_BxTxHxD):
            flat = pool.reshape(N * G, H, D)
            flat = flat.at[slots].set(x_BxTxHxD.reshape(B * T, H, D).astype(pool.dtype),
                                      mode="drop")
            return flat.reshape(N, G, H, D)

        k_NxGxHxD, v_NxGxHxD = write(k_NxGxHxD, k_BxTxHxD), write(v_NxGxHxD, v_BxTxHxD)
        out = ragged_paged_attention(q_BxTxHxD, k_NxGxHxD, v_NxGxHxD, q_pos_BxT, self.page_ids_P,
                                     self.page_row_P, self.page_pos_P, window)
        return out.astype(q_BxTxHxD.dtype), {"k": k_NxGxHxD, "v": v_NxGxHxD}


def ragged_paged_attention(q_BxTxHxD: Array, k_NxGxHxD: Array, v_NxGxHxD: Array,
                           q_pos_BxT: Array, page_ids_P: Array, page_row_P: Array,
                           page_pos_P: Array, window: Optional[int] = None) -> Array:
    """Attention of each row's queries over its own pages (a flat, padded list of pages).

    fp32 scores and softmax as `gptjax.nn.attention.xla_attention`; the softmax is split over
    pages: per page the max and the exp-sums, reduced per row with segment max / sums.
    A key at position p is seen by a query at q when 0 <= p <= q (and q - p < window).
    """
    B, T, H, D = q_BxTxHxD.shape
    G = k_NxGxHxD.shape[1]
    row_P = jnp.minimum(page_row_P, B - 1)
    real_P = page_row_P < B
    q_PxTxHxD = (q_BxTxHxD * jnp.asarray(D ** -0.5, q_BxTxHxD.dtype))[row_P]
    k_PxGxHxD, v_PxGxHxD = k_NxGxHxD[page_ids_P], v_NxGxHxD[page_ids_P]
    s_PxTxHxG = jnp.einsum("PTHD,PGHD->PTHG", q_PxTxHxD, k_PxGxHxD.astype(q_PxTxHxD.dtype),
                           preferred_element_type=jnp.float32)
    k_pos_PxG = page_pos_P[:, None] + jnp.arange(G, dtype=jnp.int32)[None]
    q_pos_PxT = q_pos_BxT[row_P]
    seen_PxTxG = (k_pos_PxG[:, None] <= q_pos_PxT[:, :, None]) & (q_pos_PxT[:, :, None] >= 0)
    if window is not None:
        seen_PxTxG &= q_pos_PxT[:, :, None] - k_pos_PxG[:, None] < window
    seen_PxTxG &= real_P[:, None, None]
    s_PxTxHxG = jnp.where(seen_PxTxG[:, :, None], s_PxTxHxG, MASK_VALUE)
    seg = jnp.where(real_P, page_row_P, B)
    m_BxTxH = jax.ops.segment_max(s_PxTxHxG.max(-1), seg, num_segments=B + 1)[:B]
    p_PxTxHxG = jnp.exp(s_PxTxHxG - jnp.concatenate([m_BxTxH, m_BxTxH[:1]])[seg][..., None])
    p_PxTxHxG = jnp.where(seen_PxTxG[:, :, None], p_PxTxHxG, 0.0)
    l_BxTxH = jax.ops.segment_sum(p_PxTxHxG.sum(-1), seg, num_segments=B + 1)[:B]
    o_PxTxHxD = jnp.einsum("PTHG,PGHD->PTHD", p_PxTxHxG, v_PxGxHxD.astype(jnp.float32))
    o_BxTxHxD = jax.ops.segment_sum(o_PxTxHxD, seg, num_segments=B + 1)[:B]
    # A row with nothing to see (a free slot, padding) gets zeros, not 0/0.
    return o_BxTxHxD / jnp.where(l_BxTxH > 0, l_BxTxH, 1.0)[..., None]


@flax.struct.dataclass
class PagedCache:
    """A page pool (per layer {"k", "v"} [N, G, H, D], laid out like `init_cache`'s layers) and
    the view of one model call over it (`PagedView`)."""

    layers: Any
    view: PagedView


def init_pages(config: Any, n_pages: int, page_size: int, dtype: Any = None) -> Any:
    """An empty page pool per layer: {'h_0': {'k', 'v'}, ...} of [n_pages, page_size, H, D], or
    `{'h': {'block_j': ...}}` stacked over periods when scan_layers is on."""
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    shape = (n_pages, page_size, config.n_head, config.d_head)

    def kv(lead=()):
        return {"k": jnp.zeros(lead + shape, dtype), "v": jnp.zeros(lead + shape, dtype)}

    if config.scan_layers:
        n_periods = config.n_layer // len(config.attention_pattern)
        return {"h": {f"block_{j}": kv((n_periods,))
                      for j in range(len(config.attention_pattern))}}
    return {f"h_{i}": kv() for i in range(config.n_layer)}


def write_positions(cache: dict, positions_BxT: Array) -> Array:
    """A dense cache's slot positions with this call's written at its index."""
    return jax.lax.dynamic_update_slice(cache["pos"], positions_BxT, (0, cache["index"]))


def cache_view(cache: Any, positions_BxT: Array) -> tuple:
    """(per-layer storage, view) of a model call at these positions over `cache`: a dense cache
    dict (`init_cache`) or a PagedCache."""
    if isinstance(cache, PagedCache):
        return cache.layers, cache.view
    return cache["layers"], DenseView(cache["index"], write_positions(cache, positions_BxT))


def updated_cache(cache: Any, layers: Any, view: Any, T: int) -> Any:
    """The cache after a call of T tokens that left `layers` as its per-layer storage."""
    if isinstance(cache, PagedCache):
        return cache.replace(layers=layers)
    return {"layers": layers, "pos": view.k_pos_BxS, "index": cache["index"] + T}
