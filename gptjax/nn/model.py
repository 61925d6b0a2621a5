"""The GPT decoder as a functional linen module, with an explicit KV cache for decoding.

Einsum letters and shape suffixes: B batch, T query length, S key length (cache slots),
H heads, D head width, C model width (n_embd), F MLP width, V vocabulary, K the 3 of q/k/v,
L layers.

Parameter names follow Hugging Face GPT-2 (`wte`, `wpe`, `h_{i}.ln_1`, `h_{i}.attn.c_attn`,
`h_{i}.attn.c_proj`, `h_{i}.ln_2`, `h_{i}.mlp.c_fc`, `h_{i}.mlp.c_proj`, `ln_f`), so conversion is
a rename plus a reshape of the attention kernels, which are stored per head ([C, 3, H, D] and
[H, D, C]) so that tensor parallelism can shard heads. Every parameter carries logical axis names
(`vocab`, `embed`, `mlp`, `heads`, `head_dim`, `layers`); gptjax.sharding maps them to a mesh.

With `scan_layers` the blocks are built by `nn.scan` over periods of `attention_pattern` (one
period is one dense block for GPT-2, a dense and a local block for GPT-3), so every block keeps a
static window; parameters are then `h.block_{j}` stacked over n_layer / period.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.config import GPTConfig, check_scan_config
from gptjax.nn import taps
from gptjax.nn.attention import attention, attention_probs, default_positions
from gptjax.nn.kv_cache import DenseView, PagedCache, cache_view, updated_cache
from gptjax.nn.layers import (Embed, Linear, activation, einsum_fp32, layer_norm, normal_init,
                              param_or_weight_only, resid_std)

Array = jax.Array
Cache = dict
# The collection each block's output mean square is sown into, only when a caller makes it
# mutable (the train step's per-layer statistics, gptjax.train.layer_stats); otherwise no op is
# traced and the program is the one without it.
LAYER_STATS = "layer_stats"


class _LayerPart(nn.Module):
    """The fields of a block and of its attention: which layer, and how it runs.

    Attributes:
      config: the architecture.
      window: None for a dense layer, the band width of a local one.
      deterministic: no dropout.
      decode_layout: c_proj kernels stored [out, in] (gptjax.nn.param_layout.decode_layout).
    """

    config: GPTConfig
    window: Optional[int]
    deterministic: bool
    decode_layout: bool = False


class CausalSelfAttention(_LayerPart):
    """Multi-head causal self-attention over positions, optionally banded, optionally cached."""

    @nn.compact
    def __call__(self, x_BxTxC: Array, q_pos_BxT: Array, k_pos_BxS: Optional[Array],
                 layer_cache: Optional[dict], cache_view: Any, seg_BxT: Optional[Array] = None):
        cfg = self.config
        C, H, D = cfg.n_embd, cfg.n_head, cfg.d_head
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        qkv_BxTxKxHxD = Linear("BTC,CKHD->BTKHD", (C, 3, H, D), ("embed", None, "heads", "head_dim"),
                               (3, H, D), (None, "heads", "head_dim"), cfg.init_std, cfg.use_bias,
                               dt, pdt, deterministic=self.deterministic,
                               name="c_attn")(x_BxTxC)
        q_BxTxHxD = qkv_BxTxKxHxD[:, :, 0]
        k_BxTxHxD = qkv_BxTxKxHxD[:, :, 1]
        v_BxTxHxD = qkv_BxTxKxHxD[:, :, 2]
        q_BxTxHxD = nn.with_logical_constraint(q_BxTxHxD, ("batch", "length", "heads", "head_dim"))

        dropout_rng = None
        if not self.deterministic and cfg.attn_pdrop > 0.0:
            dropout_rng = self.make_rng("dropout")
        attend = functools.partial(attention, window=self.window, impl=cfg.attention_impl,
                                   dropout_rate=cfg.attn_pdrop, dropout_rng=dropout_rng,
                                   segment_ids_BxT=seg_BxT)
        if taps.wants(self, "probs"):
            attend = self._tapped_probs(attend, x_BxTxC.shape[0], H, seg_BxT)
        new_cache = None
        if layer_cache is None:
            out_BxTxHxD = attend(q_BxTxHxD, k_BxTxHxD, v_BxTxHxD, q_pos_BxT, q_pos_BxT)
        else:
            # The cache view (gptjax.nn.kv_cache) writes this call's keys/values and attends over
            # what each row may see; a bare index is a dense cache's, with k_pos_BxS its slots'
            # positions.
            view = cache_view if hasattr(cache_view, "attend") else DenseView(cache_view,
                                                                              k_pos_BxS)
            out_BxTxHxD, new_cache = view.attend(layer_cache, q_BxTxHxD, k_BxTxHxD, v_BxTxHxD,
                                                 q_pos_BxT, attend, self.window)
        out_BxTxHxD = taps.tap(self, "z", out_BxTxHxD)
        # jnp.einsum contracts its summed letters in sorted order, D before H, and XLA then
        # transposes this kernel into [D, H, C] on every call; inside the decode loop that copy
        # (a second read and a write of the kernel per step) is not hoisted. Naming the head
        # width `d` (sorted after H) keeps the kernel's own order. The training forward keeps
        # `BTHD,HDC`, whose contraction order fixes the rounding of its losses.
        eq = "BTHD,HDC->BTC" if layer_cache is None else "BTHd,HdC->BTC"
        y_BxTxC = Linear(eq, (H, D, C), ("heads", "head_dim", "embed"), (C,),
                         ("embed",), resid_std(cfg), cfg.use_bias, dt, pdt,
                         out_in=self.decode_layout, deterministic=self.deterministic,
                         name="c_proj")(out_BxTxHxD)
        y_BxTxC = nn.Dropout(cfg.resid_pdrop)(y_BxTxC, deterministic=self.deterministic)
        return taps.tap(self, "out", y_BxTxC), new_cache

    def _tapped_probs(self, attend, B: int, H: int, seg_BxT: Optional[Array]):
        """`attend` that also forms the attention probabilities [B, H, T, S] for the taps.

        They are computed beside the attention (the xla_attention math, fp32), so capturing
        them leaves the output as it was. An intervention adds (p' - p) v to the output: an
        identity leaves it bitwise unchanged, p' = 0 removes the head's attention output.
        """
        def tapped(q, k, v, q_pos, k_pos):  # q may be a dense cache's [B*H, T, 1, D]
            out = attend(q, k, v, q_pos, k_pos)
            if q_pos is None:
                q_pos = k_pos = default_positions(*q.shape[:2])
            p = attention_probs(q, k, q_pos, k_pos, self.window, seg_BxT)
            p_BxHxTxS = p.reshape((B, H) + p.shape[2:])
            new_BxHxTxS = taps.tap(self, "probs", p_BxHxTxS)
            if new_BxHxTxS is p_BxHxTxS:
                return out
            delta = (new_BxHxTxS - p_BxHxTxS).reshape(p.shape).astype(v.dtype)
            return out + jnp.einsum("BHTS,BSHD->BTHD", delta, v).astype(out.dtype)
        return tapped


class Mlp(nn.Module):
    """The position-wise MLP: c_fc, the activation, c_proj, residual dropout."""

    config: GPTConfig
    deterministic: bool
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BxTxC: Array) -> Array:
        cfg = self.config
        C, F = cfg.n_embd, cfg.d_mlp
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        h_BxTxF = Linear("BTC,CF->BTF", (C, F), ("embed", "mlp"), (F,), ("mlp",), cfg.init_std,
                         cfg.use_bias, dt, pdt, deterministic=self.deterministic,
                         name="c_fc")(x_BxTxC)
        h_BxTxF = taps.tap(self, "pre", nn.with_logical_constraint(h_BxTxF,
                                                                  ("batch", "length", "mlp")))
        h_BxTxF = taps.tap(self, "act", activation(cfg.activation)(h_BxTxF))
        y_BxTxC = Linear("BTF,FC->BTC", (F, C), ("mlp", "embed"), (C,), ("embed",),
                         resid_std(cfg), cfg.use_bias, dt, pdt, out_in=self.decode_layout,
                         deterministic=self.deterministic, name="c_proj")(h_BxTxF)
        return taps.tap(self, "out", nn.Dropout(cfg.resid_pdrop)(
            y_BxTxC, deterministic=self.deterministic))


class Block(_LayerPart):
    """One transformer block: post-LN (GPT-1) or pre-LN (GPT-2/3), per config.norm_position."""

    @nn.compact
    def __call__(self, x_BxTxC: Array, q_pos_BxT: Array, k_pos_BxS: Optional[Array],
                 layer_cache: Optional[dict], cache_view: Any, seg_BxT: Optional[Array] = None):
        cfg = self.config
        attn = CausalSelfAttention(cfg, self.window, self.deterministic, self.decode_layout,
                                   name="attn")
        mlp = Mlp(cfg, self.deterministic, self.decode_layout, name="mlp")
        ln_1, ln_2 = layer_norm(cfg, "ln_1"), layer_norm(cfg, "ln_2")
        x_BxTxC = taps.tap(self, "resid_pre", x_BxTxC)
        if cfg.norm_position == "pre":
            a, new_cache = attn(ln_1(x_BxTxC), q_pos_BxT, k_pos_BxS, layer_cache, cache_view,
                                seg_BxT)
            x_BxTxC = taps.tap(self, "resid_mid", x_BxTxC + a)
            x_BxTxC = x_BxTxC + mlp(ln_2(x_BxTxC))
        else:
            a, new_cache = attn(x_BxTxC, q_pos_BxT, k_pos_BxS, layer_cache, cache_view, seg_BxT)
            x_BxTxC = taps.tap(self, "resid_mid", ln_1(x_BxTxC + a))
            x_BxTxC = ln_2(x_BxTxC + mlp(x_BxTxC))
        x_BxTxC = nn.with_logical_constraint(x_BxTxC, ("batch", "length", "embed"))
        if self.is_mutable_collection(LAYER_STATS):
            self.sow(LAYER_STATS, "out_ms", jnp.mean(jnp.square(x_BxTxC.astype(jnp.float32))))
        return taps.tap(self, "resid_post", x_BxTxC), new_cache


def _remat_policy(name: str):
    if name == "dots":
        return jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return None  # 'full': save nothing, recompute the block in the backward pass


class Period(nn.Module):
    """One period of the attention pattern (len(attention_pattern) blocks); the unit of nn.scan."""

    config: GPTConfig
    deterministic: bool
    decode_layout: bool = False

    @nn.compact
    def __call__(self, x_BxTxC, period_cache, q_pos_BxT, k_pos_BxS, cache_view, seg_BxT=None,
                 period_index=None):
        cfg = self.config
        block_cls = Block
        if cfg.remat != "none":
            block_cls = nn.remat(Block, policy=_remat_policy(cfg.remat), prevent_cse=False)
        new_cache = {} if period_cache is not None else None
        with taps.in_period(period_index):  # traced index of this period, for interventions
            for j, kind in enumerate(cfg.attention_pattern):
                window = cfg.local_window if kind == "local" else None
                name = f"block_{j}"
                c = None if period_cache is None else period_cache[name]
                x_BxTxC, c = block_cls(cfg, window, self.deterministic, self.decode_layout,
                                       name=name)(x_BxTxC, q_pos_BxT, k_pos_BxS, c, cache_view,
                                                   seg_BxT)
                if new_cache is not None:
                    new_cache[name] = c
        return x_BxTxC, new_cache


class GPT(nn.Module):
    """GPT-1/2/3 decoder.

    `GPT(config).apply({'params': params}, tokens_BxT)` returns fp32 logits [B, T, V].

    Call arguments:
      tokens_BxT: int token ids.
      positions_BxT: position of each token; defaults to 0..T-1 (or continuing the cache).
        -1 marks padding: such tokens are never attended to.
      deterministic: disable dropout (pass rngs={'dropout': key} when False).
      cache: a KV cache: a dense one from `init_cache` (the call writes its keys/values at the
        cache's index) or a page pool, `gptjax.nn.kv_cache.PagedCache` (at the slots its view
        names; positions_BxT required); the call returns (logits, new_cache). The attention sees
        the cache only through its view's `attend` (gptjax.nn.kv_cache).
      return_hidden: also return the final hidden states [B, T, C] (after ln_f when it exists),
        the features the GPT-1 task heads read.
      inputs_embeds_BxTxC: token embeddings to use instead of looking up tokens_BxT (which may
        then be None); positions are still added. Lets jax.grad reach the inputs (causality tests,
        soft prompts).
      last_logits_only: logits [B, 1, V] for the last position only (a prefill needs no more;
        skips a [B, T, C] x [C, V] matmul and the [B, T, V] buffer).
      segment_ids_BxT: document ids of packed windows (data.document_mask): each token attends
        only within its document. Positions (positions_BxT, or 0..T-1) must count up by one
        within each document (restarting at its start or not); no cache, no padding.

    Returns:
      logits, or a tuple (logits, [hidden], [cache]) with the requested extras in that order.

    Parameters from `gptjax.nn.quant.quantize_params` (weight-only bf16/int8 matrices) are
    taken as they are: the same call then streams the narrow weights (decoding).

    `GPT(config, decode_layout=True)` takes parameters converted by
    `gptjax.nn.param_layout.decode_layout(config, params)`: the same numbers with the c_proj
    kernels stored [out, in], which a CPU decode step reads faster (see
    `gptjax.inference.sampling.prepare_for_decoding`).
    """

    config: GPTConfig
    decode_layout: bool = False

    @nn.compact
    def __call__(self, tokens_BxT: Array, positions_BxT: Optional[Array] = None, *,
                 deterministic: bool = True, cache: Optional[Cache] = None,
                 return_hidden: bool = False, inputs_embeds_BxTxC: Optional[Array] = None,
                 last_logits_only: bool = False, segment_ids_BxT: Optional[Array] = None):
        cfg = self.config
        B, T = (tokens_BxT if inputs_embeds_BxTxC is None else inputs_embeds_BxTxC).shape[:2]
        dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        default_pos = positions_BxT is None and cache is None
        if positions_BxT is None:
            if isinstance(cache, PagedCache):
                raise ValueError("a paged cache (gptjax.nn.kv_cache.PagedCache) needs "
                                 "positions_BxT")
            start = 0 if cache is None else cache["index"]
            positions_BxT = jnp.broadcast_to(start + jnp.arange(T, dtype=jnp.int32), (B, T))
        positions_BxT = positions_BxT.astype(jnp.int32)

        wte = Embed(cfg.vocab_size, cfg.n_embd, dtype=dt, param_dtype=pdt,
                    embedding_init=normal_init(cfg.init_std, ("vocab", "embed")), name="wte")
        wpe = nn.Embed(cfg.n_ctx, cfg.n_embd, dtype=dt, param_dtype=pdt,
                       embedding_init=normal_init(cfg.init_std, ("position", "embed")), name="wpe")
        tok_BxTxC = wte(tokens_BxT) if inputs_embeds_BxTxC is None else inputs_embeds_BxTxC
        x_BxTxC = (taps.tap(self, "wte", tok_BxTxC.astype(dt))
                   + taps.tap(self, "wpe", wpe(jnp.maximum(positions_BxT, 0))))
        x_BxTxC = nn.Dropout(cfg.embd_pdrop)(x_BxTxC, deterministic=deterministic)
        x_BxTxC = nn.with_logical_constraint(x_BxTxC, ("batch", "length", "embed"))

        # Positions as attention sees them: None states "0..T-1 in every row, no cache", which
        # lets slot-masked kernels (cuDNN, splash, the blocked banded path) run.
        attn_pos_BxT = None if default_pos else positions_BxT
        if segment_ids_BxT is not None:
            if cache is not None:
                raise ValueError("segment_ids_BxT (document-masked packing) is for training "
                                 "and evaluation windows; allowed with cache=None only")
            # Within a document positions count up with the slot, so slot order plus the
            # segment ids is the positions' mask: the slot-masked kernels can run.
            attn_pos_BxT, segment_ids_BxT = None, segment_ids_BxT.astype(jnp.int32)
        k_pos_BxS, layers_cache, view = attn_pos_BxT, None, None
        if cache is not None:
            layers_cache, view = cache_view(cache, positions_BxT)
            k_pos_BxS = getattr(view, "k_pos_BxS", None)

        blocks = _scanned_blocks if cfg.scan_layers else _looped_blocks
        x_BxTxC, new_layers = blocks(cfg, deterministic, self.decode_layout, x_BxTxC,
                                     attn_pos_BxT, k_pos_BxS, layers_cache, view,
                                     segment_ids_BxT)

        if cfg.final_norm:
            x_BxTxC = taps.tap(self, "ln_f", layer_norm(cfg, "ln_f")(x_BxTxC))

        x_head_BxTxC = x_BxTxC[:, -1:] if last_logits_only else x_BxTxC
        if cfg.tie_embeddings:
            logits_BxTxV = wte.attend(x_head_BxTxC)
        else:
            head_CxV = param_or_weight_only(self, "lm_head",
                                            normal_init(cfg.init_std, ("embed", "vocab")),
                                            (cfg.n_embd, cfg.vocab_size), pdt)
            logits_BxTxV = einsum_fp32("BTC,CV->BTV", x_head_BxTxC, head_CxV, dt)
        logits_BxTxV = logits_BxTxV.astype(jnp.float32)

        out = [logits_BxTxV]
        if return_hidden:
            out.append(x_BxTxC)
        if cache is not None:
            out.append(updated_cache(cache, new_layers, view, T))
        return out[0] if len(out) == 1 else tuple(out)


def _scanned_blocks(cfg: GPTConfig, deterministic: bool, decode_layout: bool, x_BxTxC: Array,
                    q_pos_BxT: Optional[Array], k_pos_BxS: Optional[Array],
                    layers_cache: Optional[dict], view: Any, seg_BxT: Optional[Array] = None):
    """The blocks as `nn.scan` over periods (submodule `h` of the calling GPT)."""
    n_periods = cfg.n_layer // len(cfg.attention_pattern)
    variable_axes = {"params": 0, "lora": 0, LAYER_STATS: 0}
    in_axes, extra = (0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast), ()
    request = taps.active()  # capture / interventions (gptjax.nn.inspect); None: the plain scan
    if request is not None and request.scan_collection():
        variable_axes[taps.COLLECTION] = 0  # captures stacked over periods
    if request is not None and request.scan_period_index():
        in_axes, extra = in_axes + (0,), (jnp.arange(n_periods, dtype=jnp.int32),)
    scanned = nn.scan(
        Period, variable_axes=variable_axes,
        split_rngs={"params": True, "dropout": True},
        in_axes=in_axes, length=n_periods,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x_BxTxC, new_layers = scanned(cfg, deterministic, decode_layout, name="h")(
        x_BxTxC, None if layers_cache is None else layers_cache["h"], q_pos_BxT, k_pos_BxS, view,
        seg_BxT, *extra)
    return x_BxTxC, None if layers_cache is None else {"h": new_layers}


def _looped_blocks(cfg: GPTConfig, deterministic: bool, decode_layout: bool, x_BxTxC: Array,
                   q_pos_BxT: Optional[Array], k_pos_BxS: Optional[Array],
                   layers_cache: Optional[dict], view: Any, seg_BxT: Optional[Array] = None):
    """The blocks one after another (submodules `h_{i}` of the calling GPT)."""
    block_cls = Block
    if cfg.remat != "none":
        block_cls = nn.remat(Block, policy=_remat_policy(cfg.remat))
    new_layers = {} if layers_cache is not None else None
    for i, window in enumerate(cfg.layer_windows()):
        name = f"h_{i}"
        c = None if layers_cache is None else layers_cache[name]
        w = None if cfg.layer_kinds()[i] == "dense" else window
        x_BxTxC, c = block_cls(cfg, w, deterministic, decode_layout, name=name)(
            x_BxTxC, q_pos_BxT, k_pos_BxS, c, view, seg_BxT)
        if new_layers is not None:
            new_layers[name] = c
    return x_BxTxC, new_layers


# ---------------------------------------------------------------------------- functional helpers
def init_boxed(config: GPTConfig, rng: Array) -> dict:
    """Initialise parameters with their logical-axis metadata (nn.Partitioned boxes).

    Args:
      config: the architecture.
      rng: PRNG key of the initialisation.

    Returns:
      The parameter pytree, each leaf an nn.Partitioned box.
    """
    check_scan_config(config)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return GPT(config).init({"params": rng}, tokens)["params"]


def init_params(config: GPTConfig, rng: Array) -> dict:
    """Initialise a plain parameter pytree (no metadata boxes).

    Args:
      config: the architecture.
      rng: PRNG key of the initialisation.

    Returns:
      The parameter pytree (names follow HF GPT-2; see the module docstring).
    """
    return nn.meta.unbox(init_boxed(config, rng))


def abstract_params(config: GPTConfig, boxed: bool = False):
    """Parameter shapes and dtypes (jax.ShapeDtypeStruct), computed without allocating.

    Args:
      config: the architecture.
      boxed: keep the nn.Partitioned boxes (logical axis names).

    Returns:
      A pytree of jax.ShapeDtypeStruct, boxed or not.
    """
    shapes = jax.eval_shape(lambda: init_boxed(config, jax.random.key(0)))
    return shapes if boxed else nn.meta.unbox(shapes)


def logical_axes(config: GPTConfig):
    """The logical axis names of every parameter, as a pytree of PartitionSpecs.

    Args:
      config: the architecture.

    Returns:
      A pytree of PartitionSpecs of logical names, shaped like the parameters.
    """
    return nn.get_partition_spec(abstract_params(config, boxed=True))


def init_cache(config: GPTConfig, batch_size: int, max_len: Optional[int] = None,
               dtype: Any = None) -> Cache:
    """An empty KV cache: keys/values per layer [B*H, D, S], slot positions [B, S] (-1 = empty).

    Row b*H + h of the keys/values is head h of batch row b, stored transposed ([D, S]), the
    layout that lets a decode step read and update it in place (see CausalSelfAttention).

    Its layout mirrors the parameters: `{'h_0': {'k', 'v'}, ...}`, or `{'h': {'block_j': ...}}`
    stacked over periods when scan_layers is on.

    Args:
      config: the architecture.
      batch_size: rows B.
      max_len: slots S (default n_ctx).
      dtype: storage dtype of keys and values (default the compute dtype).

    Returns:
      {'layers': per-layer {'k', 'v'}, 'pos': [B, S] int32, 'index': int32 scalar}.
    """
    S = config.n_ctx if max_len is None else max_len
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    shape = (batch_size * config.n_head, config.d_head, S)

    def kv(lead=()):
        return {"k": jnp.zeros(lead + shape, dtype), "v": jnp.zeros(lead + shape, dtype)}

    if config.scan_layers:
        check_scan_config(config)
        n_periods = config.n_layer // len(config.attention_pattern)
        layers = {"h": {f"block_{j}": kv((n_periods,))
                        for j in range(len(config.attention_pattern))}}
    else:
        layers = {f"h_{i}": kv() for i in range(config.n_layer)}
    return {"layers": layers, "pos": jnp.full((batch_size, S), -1, jnp.int32),
            "index": jnp.zeros((), jnp.int32)}
