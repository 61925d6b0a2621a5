"""Weight-only bfloat16 / int8 parameters for decoding, and the cached model call that reads them.

`quantize_params` turns every Linear kernel and the token embedding (which is also the tied
output head, the largest matrix) into gptjax.nn.quant.WeightOnly matrices; layer norms, biases
and position embeddings stay fp32, and so do activations, the KV cache and the logits.
`dequantize_params` gives back ordinary parameters holding the numbers the quantized ones stand
for: the reference for tests, and what perplexity is measured with (bench/decode.py --quality).

`forward` is GPT's cached call (gptjax.nn.model.GPT with a cache) for such parameters: the
blocks are the model's own `Block` / `Period` modules, whose Linear layers take a `kernel_q`;
the embedding gather and the head, which GPT reads straight from its `wte.embedding`, are done
here (one int8 row gathered and scaled per token; the head as a WeightOnly matmul). With plain
parameters it computes exactly what GPT does (tested), which pins the two together.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from gptjax.config import GPTConfig
from gptjax.nn import quant
from gptjax.nn.layers import layer_norm
from gptjax.nn.model import Block, Period, write_positions
from gptjax.nn.quant import WeightOnly

Array = jax.Array

# (module, Linear) -> number of input dims of its kernel (the dims it shares with x).
_LINEAR_N_IN = {("attn", "c_attn"): 1, ("attn", "c_proj"): 2, ("mlp", "c_fc"): 1,
                ("mlp", "c_proj"): 1}


def quantize_params(config: GPTConfig, params: Any, weights: str) -> Any:
    """Parameters (training layout) with their large matrices stored as `weights`.

    Args:
      config: the model's config (scan_layers: kernels carry a leading layer dim).
      params: fp32 parameters as trained or imported (not the decode layout).
      weights: "bf16" or "int8" (per-output-channel fp32 scales).

    Returns:
      The same tree with each Linear's `kernel` replaced by `kernel_q`, `wte.embedding` by
      `wte.embedding_q` ([V, C]: one scale per vocabulary row serves the gather and the head)
      and an untied `lm_head` by `lm_head_q`.
    """
    quant.check_weights(weights)
    lead = 1 if config.scan_layers else 0

    def walk(tree, path):
        out = {}
        for k, v in tree.items():
            if k == "kernel" and tuple(path[-2:]) in _LINEAR_N_IN:
                out["kernel_q"] = quant.quantize(v, _LINEAR_N_IN[tuple(path[-2:])], weights,
                                                 lead=lead)
            elif isinstance(v, dict):
                out[k] = walk(v, path + (k,))
            else:
                out[k] = v
        return out

    out = walk(dict(params), ())
    out["wte"] = {"embedding_q": quant.quantize(params["wte"]["embedding"].T, 1, weights)}
    if "lm_head" in params:
        del out["lm_head"]
        out["lm_head_q"] = quant.quantize(params["lm_head"], 1, weights)
    return out


def dequantize_params(config: GPTConfig, params: Any) -> Any:
    """Plain fp32 parameters holding the numbers `quantize_params`' output stands for."""
    lead = 1 if config.scan_layers else 0

    def kernel(w: WeightOnly) -> Array:
        if not lead:
            return quant.to_kernel(w)
        return jax.vmap(quant.to_kernel)(w)

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if k == "kernel_q":
                out["kernel"] = kernel(v)
            elif k == "embedding_q":
                out["embedding"] = quant.dequantize(v)
            elif k == "lm_head_q":
                out["lm_head"] = quant.to_kernel(v)
            elif isinstance(v, dict):
                out[k] = walk(v)
            else:
                out[k] = v
        return out

    return walk(dict(params))


def _embed(wte: dict, tokens_BxT: Array, dt: Any) -> Array:
    """Token embeddings: flax's Embed for a plain table, one scaled row per token for WeightOnly."""
    if "embedding" in wte:
        return jnp.take(wte["embedding"].astype(dt), tokens_BxT, axis=0)
    w = wte["embedding_q"]
    rows = jnp.take(w.values, tokens_BxT, axis=0).astype(jnp.float32)
    if w.scale is not None:
        rows = rows * jnp.take(w.scale, tokens_BxT, axis=0)[..., None]
    return rows.astype(dt)


def _head(config: GPTConfig, params: Any, x_BxTxC: Array, dt: Any) -> Array:
    """Logits [B, T, V] fp32 from the final hidden states, as GPT computes them."""
    if config.tie_embeddings:
        wte = params["wte"]
        if "embedding" in wte:
            return jnp.einsum("BTC,VC->BTV", x_BxTxC.astype(dt), wte["embedding"].astype(dt),
                              preferred_element_type=jnp.float32)
        return quant.linear("BTC,CV->BTV", x_BxTxC, wte["embedding_q"], None)
    if "lm_head" in params:
        return jnp.einsum("BTC,CV->BTV", x_BxTxC.astype(dt), params["lm_head"].astype(dt),
                          preferred_element_type=jnp.float32)
    return quant.linear("BTC,CV->BTV", x_BxTxC, params["lm_head_q"], None)


def _blocks(config: GPTConfig, params: Any, x_BxTxC: Array, q_pos_BxT: Array, k_pos_BxS: Array,
            layers: dict, index: Array) -> tuple:
    """The model's blocks over the cache, per layer or scanned over periods like GPT."""
    if config.scan_layers:
        def body(x, p_and_c):
            p, c = p_and_c
            return Period(config, True).apply({"params": p}, x, c, q_pos_BxT, k_pos_BxS, index)

        x_BxTxC, new = jax.lax.scan(body, x_BxTxC, (params["h"], layers["h"]))
        return x_BxTxC, {"h": new}
    new = {}
    for i, window in enumerate(config.layer_windows()):
        w = None if config.layer_kinds()[i] == "dense" else window
        x_BxTxC, new[f"h_{i}"] = Block(config, w, True).apply(
            {"params": params[f"h_{i}"]}, x_BxTxC, q_pos_BxT, k_pos_BxS, layers[f"h_{i}"], index)
    return x_BxTxC, new


def forward(config: GPTConfig, params: Any, tokens_BxT: Array, positions_BxT: Array,
            cache: dict, *, last_logits_only: bool = False) -> tuple:
    """`GPT(config).apply({'params': params}, tokens, positions, cache=cache)` for parameters
    from `quantize_params` (plain parameters work too, with GPT's numbers).

    Args:
      config: the model's config.
      params: quantized (or plain) parameters.
      tokens_BxT: token ids.
      positions_BxT: their positions (-1 on padding).
      cache: a KV cache (gptjax.nn.model.init_cache), or several grouped (group_caches); this
        call's keys/values go at its index.
      last_logits_only: logits for the last position only ([B, 1, V]).

    Returns:
      (logits_BxTxV fp32, new cache).
    """
    dt = jnp.dtype(config.dtype)
    T = tokens_BxT.shape[1]
    index: Optional[Array] = cache["index"]
    positions_BxT = positions_BxT.astype(jnp.int32)
    wpe_PxC = params["wpe"]["embedding"].astype(dt)
    x_BxTxC = (_embed(params["wte"], tokens_BxT, dt)
               + jnp.take(wpe_PxC, jnp.maximum(positions_BxT, 0), axis=0))
    k_pos_BxS = write_positions(cache, positions_BxT)
    x_BxTxC, layers = _blocks(config, params, x_BxTxC, positions_BxT, k_pos_BxS,
                              cache["layers"], index)
    if config.final_norm:
        x_BxTxC = layer_norm(config, None).apply({"params": params["ln_f"]}, x_BxTxC)
    if last_logits_only:
        x_BxTxC = x_BxTxC[:, -1:]
    logits_BxTxV = _head(config, params, x_BxTxC, dt).astype(jnp.float32)
    return logits_BxTxV, {"layers": layers, "pos": k_pos_BxS,
                          "index": jax.tree_util.tree_map(lambda i: i + T, index)}
