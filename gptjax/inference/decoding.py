"""The model side of decoding: ragged prompts into a KV cache, one token per step after that.

Shape suffixes as in gptjax.nn.model: B batch (prompts), P padded prompt length, S cache slots,
V vocabulary, N rows (prompts x beams), Q stop sequences, L longest stop sequence.

Prompts of different lengths are LEFT-padded to a common length P (rounded up to a bucket, so
repeated calls reuse a compiled loop) with position -1 on the padding; every prompt then ends
at slot P-1 of the cache and decode step t writes slot P+t for all rows, while positions (which
the attention masks and position embeddings read) stay per row: len_b + t.

Here: parameters prepared once for decoding (`prepare_for_decoding`), prompt packing
(`pad_prompts`, `prompt_positions`), the two model calls (`prefill`, `decode_step`), cache row
operations for beams (`repeat_cache`, `gather_cache`) and stop sequences as arrays
(`stop_array`, `stop_hit`), shared by gptjax.inference.sampling, gptjax.inference.beam_search
and the server.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.nn.model import GPT, init_cache
from gptjax.nn.quant import WEIGHT_FORMATS, check_weights  # noqa: F401 (re-exported)
from gptjax.nn.quant import quantize_params
from gptjax.nn.param_layout import decode_layout as to_decode_layout

Array = jax.Array
# (tokens_N, step, state) -> (logits_NxV, state): the model step a decode loop calls.
TokensToLogits = Callable[[Array, Array, Any], tuple]


# ---------------------------------------------------------------------------- prepared params
@flax.struct.dataclass
class DecodeParams:
    """Parameters prepared by `prepare_for_decoding`; every decoding function that takes params
    takes these too. `params` holds the c_proj kernels in `gptjax.nn.param_layout.decode_layout`
    when `out_in` is set, and bf16/int8 kernels (gptjax.nn.quant) when `weights` says so."""

    params: Any
    out_in: bool = flax.struct.field(pytree_node=False, default=False)
    weights: str = flax.struct.field(pytree_node=False, default="fp32")


def _on_cpu(params: Any) -> bool:
    leaf = jax.tree_util.tree_leaves(params)[0]
    devices = leaf.devices() if isinstance(leaf, jax.Array) else jax.local_devices()[:1]
    return all(d.platform == "cpu" for d in devices)


def prepare_for_decoding(config: GPTConfig, params: Any, *, out_in: Optional[bool] = None,
                         weights: Optional[str] = None) -> DecodeParams:
    """Prepare parameters once for many `generate` calls (sample.py and the server do).

    On CPU (`out_in=None` decides by where params live) the c_proj kernels are copied to the
    [out, in] layout of `gptjax.nn.param_layout.decode_layout`, which XLA:CPU streams faster in a
    decode step (measured in bench/decode.py; BENCHMARKS.md). The copy costs memory (about a
    quarter of the weights, kept while the result lives) and a one-off transpose, which is why
    `generate` does not do it by itself on every call. On GPU and TPU params are returned
    unchanged: the layout is a CPU finding and has not been measured there. Outputs are the same
    numbers as with the plain params (to fp32 rounding).

    `weights="bf16"` or `"int8"` stores every Linear kernel and the token embedding / tied head
    in that format (int8: per-output-channel fp32 scales; gptjax.nn.quant), which the model's
    decode step streams with 2x / 4x fewer bytes; activations, cache and logits stay fp32, and
    the outputs are those of the dequantized weights (to fp32 rounding). `out_in` does not apply.

    Args:
      config: the model's GPTConfig.
      params: its parameters, or an earlier result of this function (returned as is).
      out_in: force the [out, in] copy on (True) or off (False); None: on where params live on CPU.
      weights: "fp32" (default), "bf16" or "int8".

    Returns:
      DecodeParams, accepted wherever params are.

    Raises:
      ValueError: an unknown `weights`, or an earlier result in another format.
    """
    if weights is not None:
        check_weights(weights)
    if isinstance(params, DecodeParams):
        if weights is not None and weights != params.weights:
            raise ValueError(f"weights={weights!r}: these params were already prepared with "
                             f"weights={params.weights!r}; prepare the original params instead")
        return params
    if weights not in (None, "fp32"):
        return DecodeParams(quantize_params(config, params, weights), False, weights)
    if out_in is None:
        out_in = _on_cpu(params)
    return DecodeParams(to_decode_layout(config, params) if out_in else params, bool(out_in))


def _unwrap(params: Any) -> tuple[Any, bool, str]:
    if isinstance(params, DecodeParams):
        return params.params, params.out_in, params.weights
    return params, False, "fp32"


def weights_format(params: Any) -> str:
    """The weight format of params (plain params: "fp32"); one of WEIGHT_FORMATS."""
    return _unwrap(params)[2]


# ---------------------------------------------------------------------------- prompts
def pad_prompts(prompts: Any, *, prompt_lengths: Any = None, pad_id: int = 0,
                bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad prompts to a common length rounded up to a multiple of `bucket`.

    Args:
      prompts: a list of token-id lists, or a [B, T] integer array whose row b holds its tokens in
        the first prompt_lengths[b] columns (right padding, as batch tokenizers return).
      prompt_lengths: [B] real lengths for an array input (None: every row is full).
      pad_id: filler for the padding; never attended to, but it is embedded, so it must be a
        valid id (an out-of-range id embeds as NaN, and NaN values poison masked attention).
      bucket: round the padded length up to a multiple of this.

    Returns:
      (tokens_BxP int32 left-padded, lengths_B int32).
    """
    rows = prompt_rows(prompts, prompt_lengths)
    lengths_B = np.array([len(r) for r in rows], np.int32)
    P = max(1, bucket) * math.ceil(int(lengths_B.max()) / max(1, bucket))
    tokens_BxP = np.full((len(rows), P), pad_id, np.int32)
    for b, r in enumerate(rows):
        tokens_BxP[b, P - len(r):] = r
    return tokens_BxP, lengths_B


def prompt_rows(prompts: Any, prompt_lengths: Any) -> list:
    """Each prompt as a list of ints, checked (see `pad_prompts` for the two input forms).

    Raises:
      ValueError: one line naming the malformed prompt.
    """
    if isinstance(prompts, (np.ndarray, jax.Array)):
        arr = np.asarray(prompts)
        if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(f"prompts array of shape {arr.shape}: must be [batch, length] with "
                             "batch >= 1 and length >= 1")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"prompts array has dtype {arr.dtype}: token ids must be integers")
        if prompt_lengths is None:
            lens = [arr.shape[1]] * arr.shape[0]
        else:
            lens = [int(n) for n in np.asarray(prompt_lengths).reshape(-1)]
            if len(lens) != arr.shape[0]:
                raise ValueError(f"prompt_lengths has {len(lens)} entries for {arr.shape[0]} "
                                 "prompts: give one length per row")
            for b, n in enumerate(lens):
                if not 1 <= n <= arr.shape[1]:
                    raise ValueError(f"prompt_lengths[{b}]={n}: must be in [1, {arr.shape[1]}] "
                                     "(an empty prompt has nothing to condition on)")
        return [arr[b, :n].astype(np.int64).tolist() for b, n in enumerate(lens)]
    if prompt_lengths is not None:
        raise ValueError("prompt_lengths is only allowed with a padded [batch, length] array")
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError(f"prompts={short_repr(prompts)}: give a non-empty list of token-id lists "
                         "or a [batch, length] array")
    rows = []
    for b, p in enumerate(prompts):
        if isinstance(p, (int, np.integer)) or not hasattr(p, "__len__"):
            raise ValueError(f"prompts[{b}]={short_repr(p)}: each prompt must be a list of token ids")
        r = [int(t) for t in (p.tolist() if hasattr(p, "tolist") else p)]
        if not r:
            raise ValueError(f"prompts[{b}] is empty: every prompt needs at least one token")
        rows.append(r)
    return rows


def short_repr(x: Any) -> str:
    """repr(x) cut to 60 characters, for one-line errors."""
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def prompt_positions(lengths_B: Array, P: int) -> Array:
    """Positions of left-padded prompts: -1 on the padding, 0..len-1 on the real tokens. [B, P]."""
    pad_B = P - jnp.asarray(lengths_B, jnp.int32)
    pos_BxP = jnp.arange(P, dtype=jnp.int32)[None, :] - pad_B[:, None]
    return jnp.where(pos_BxP < 0, -1, pos_BxP)


# ---------------------------------------------------------------------------- model calls
def prefill(config: GPTConfig, params: Any, tokens_BxP: Array, lengths_B: Array,
            max_len: int, *, last_only: bool = False) -> tuple[Array, dict]:
    """Run left-padded prompts through the model, filling a fresh cache of `max_len` slots.

    Args:
      config: the model's GPTConfig.
      params: its parameters.
      tokens_BxP: left-padded prompt ids (see `pad_prompts`).
      lengths_B: real prompt lengths.
      max_len: cache slots S (>= P plus the tokens to decode).
      last_only: return only the last position's logits [B, V] (all a decode needs; skips the
        [B, P, V] logits).

    Returns:
      (logits_BxPxV fp32, cache); logits_BxPxV[:, -1] predicts every row's first new token.
      With last_only, (logits_BxV, cache).
    """
    B, P = tokens_BxP.shape
    cache = init_cache(config, B, max_len)
    params, decode_layout, _ = _unwrap(params)
    tokens_BxP, pos_BxP = jnp.asarray(tokens_BxP, jnp.int32), prompt_positions(lengths_B, P)
    logits, cache = GPT(config, decode_layout).apply(
        {"params": params}, tokens_BxP, pos_BxP, cache=cache, last_logits_only=last_only)
    return (logits[:, -1] if last_only else logits), cache


def decode_step(config: GPTConfig, params: Any, tokens_B: Array, positions_B: Array,
                cache: dict) -> tuple[Array, dict]:
    """One token per row through the model: appends its key/value to the cache.

    Args:
      config, params: the model.
      tokens_B: the newest token of each row.
      positions_B: its position (the row's previous position + 1).
      cache: the cache after the previous step: a dense one (`init_cache`, as `prefill` makes)
        or a page pool with this step's view (gptjax.nn.kv_cache.PagedCache, the server's).

    Returns:
      (logits_BxV fp32 for the next token, new cache).
    """
    params, decode_layout, _ = _unwrap(params)
    logits_Bx1xV, cache = GPT(config, decode_layout).apply(
        {"params": params}, tokens_B[:, None], positions_B[:, None], cache=cache)
    return logits_Bx1xV[:, 0], cache


def _cache_rows(config: GPTConfig, cache: dict, fn: Callable[[Array, int], Array]) -> dict:
    """Apply fn(array, batch_axis) to every per-row array of the cache.

    Keys/values are stored [B*H, D, S] (gptjax.nn.model.init_cache), so they are viewed as
    [B, H, D, S] for fn; scanned layers stack them over periods in front.
    """
    ax = 1 if config.scan_layers else 0
    H = config.n_head

    def kv(x):
        y = fn(x.reshape(x.shape[:ax] + (x.shape[ax] // H, H) + x.shape[ax + 1:]), ax)
        return y.reshape(y.shape[:ax] + (-1,) + y.shape[ax + 2:])

    return {"layers": jax.tree_util.tree_map(kv, cache["layers"]), "pos": fn(cache["pos"], 0),
            "index": cache["index"]}


def repeat_cache(config: GPTConfig, cache: dict, n: int) -> dict:
    """Each row of the cache repeated n times in place (row b -> rows b*n .. b*n+n-1)."""
    return _cache_rows(config, cache, lambda x, ax: jnp.repeat(x, n, axis=ax))


def gather_cache(config: GPTConfig, cache: dict, rows_N: Array) -> dict:
    """The cache rows `rows_N` (beam reordering)."""
    return _cache_rows(config, cache, lambda x, ax: jnp.take(x, rows_N, axis=ax))


# ---------------------------------------------------------------------------- stop sequences
def stop_array(stop_sequences: Sequence[Sequence[int]]) -> Optional[np.ndarray]:
    """Stop sequences as int32 [Q, L], right-aligned with -1 on the left; None if there are none."""
    if not stop_sequences:
        return None
    L = max(len(s) for s in stop_sequences)
    out = np.full((len(stop_sequences), L), -1, np.int32)
    for q, s in enumerate(stop_sequences):
        out[q, L - len(s):] = s
    return out


def stop_hit(window_XxL: Array, stop_QxL: Array) -> Array:
    """Whether the recent tokens end with any stop sequence.

    `stop_QxL` holds the sequences right-aligned with -1 on the left; -1 matches anything, and
    `window_XxL` (the last L tokens, -1 where nothing was generated yet) never holds -1 where a
    real stop token sits, so a sequence only matches generated tokens.
    """
    eq_XxQxL = (window_XxL[:, None, :] == stop_QxL[None]) | (stop_QxL[None] < 0)
    return jnp.any(jnp.all(eq_XxQxL, axis=-1), axis=-1)


def push_window(window_XxL: Array, tokens_X: Array) -> Array:
    """Shift each row's window of recent tokens left by one and append the new token."""
    return jnp.concatenate([window_XxL[:, 1:], tokens_X[:, None]], axis=1)

