"""Weight-only bfloat16 and int8 kernels for decoding: the format, the model's parameters in it,
and the matmul and row gather that read it as stored.

A decode step multiplies a few rows of activations by every kernel, so its speed is the speed at
which the kernels stream from memory, and fewer bytes per weight is the way past the fp32
roofline. `quantize` turns a kernel into a `WeightOnly` matrix [O, I] (output channels by input
channels, each output one contiguous row): bfloat16 values, or int8 values with one fp32 scale per
output channel (symmetric, max |w| / 127). Activations stay fp32.

`matmul` computes x @ dequantize(w).T. With few rows (a decode step) it is written as a
multiply-and-reduce over each row, which XLA:CPU emits as one loop fusion that converts the
int8/bf16 row in registers and reads each weight byte once; a `dot` of a converted kernel is
not fused on XLA:CPU (the convert runs first and writes a full fp32 copy, then the dot reads
it: more bytes than fp32 weights), and int8 x int8 -> int32 dots run XLA:CPU's slow generic
integer path (bench/decode.py's docstring has the measurements). With many rows (a prefill)
the kernel is dequantized once and multiplied with a dot.

`quantize_params` turns every Linear kernel and the token embedding (which is also the tied output
head, the largest matrix) of a GPT's parameters into WeightOnly matrices, each stored under its
name + `_q` (`kernel_q`, `embedding_q`, `lm_head_q`); layer norms, biases and position embeddings
stay fp32, and so do activations, the KV cache and the logits. The model itself reads them:
`Linear`, `Embed` (lookup and tied head) and GPT's untied head take the WeightOnly in place of the
plain parameter (gptjax.nn.layers.param_or_weight_only), so
`GPT(config).apply({"params": quantize_params(config, params, "int8")}, ...)` decodes with int8
weights. `dequantize_params` gives back ordinary parameters holding the numbers the quantized ones
stand for: the reference for tests, and what perplexity is measured with (bench/decode.py
--quality).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from gptjax.config import GPTConfig

Array = jax.Array

WEIGHT_FORMATS = ("fp32", "bf16", "int8")
# Up to this many rows the multiply-and-reduce form runs; above it a dequantized dot does.
REDUCE_MAX_ROWS = 16


def check_weights(weights: Any) -> str:
    """`weights` if it names a format, else a one-line ValueError naming the allowed ones."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: must be one of {', '.join(WEIGHT_FORMATS)}")
    return weights


@flax.struct.dataclass
class WeightOnly:
    """A kernel stored [O, I] in a narrow type: `values` bf16 or int8, `scale` [O] fp32 for int8.

    `out_shape` / `in_shape` are the kernel's output and input dims before flattening (static).
    Leading dims (e.g. stacked layers) may precede O and I in `values` and `scale`.
    """

    values: Array
    scale: Optional[Array]
    out_shape: tuple = flax.struct.field(pytree_node=False, default=())
    in_shape: tuple = flax.struct.field(pytree_node=False, default=())


def quantize(kernel: Array, n_in: int, weights: str, *, lead: int = 0) -> WeightOnly:
    """A kernel [lead..., in..., out...] as a WeightOnly [lead..., O, I].

    Args:
      kernel: fp32 (or any float) kernel with its `n_in` input dims before its output dims,
        after `lead` leading dims (stacked layers).
      n_in: how many input dims it has.
      weights: "bf16" or "int8".
      lead: leading dims kept in front.

    Returns:
      WeightOnly holding bfloat16 values, or int8 values in [-127, 127] with per-output scales.
    """
    check_weights(weights)
    if weights == "fp32":
        raise ValueError("weights='fp32' keeps kernels as they are: nothing to quantize")
    shape = kernel.shape[lead:]
    in_shape, out_shape = tuple(shape[:n_in]), tuple(shape[n_in:])
    w = kernel.reshape(kernel.shape[:lead] + (math.prod(in_shape), math.prod(out_shape)))
    w = jnp.swapaxes(w, -1, -2).astype(jnp.float32)  # [lead..., O, I]
    if weights == "bf16":
        return WeightOnly(w.astype(jnp.bfloat16), None, out_shape, in_shape)
    amax = jnp.max(jnp.abs(w), axis=-1)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(w / scale[..., None]), -127, 127).astype(jnp.int8)
    return WeightOnly(q, scale, out_shape, in_shape)


def dequantize(w: WeightOnly, dtype: Any = jnp.float32) -> Array:
    """The [lead..., O, I] matrix the stored values stand for (the reference computation)."""
    m = w.values.astype(jnp.float32)
    if w.scale is not None:
        m = m * w.scale[..., None]
    return m.astype(dtype)


def to_kernel(w: WeightOnly, dtype: Any = jnp.float32) -> Array:
    """The dequantized kernel back in its [in..., out...] layout (no leading dims)."""
    return jnp.swapaxes(dequantize(w, dtype), -1, -2).reshape(w.in_shape + w.out_shape)


def matmul(x_RxI: Array, w: WeightOnly) -> Array:
    """x_RxI @ dequantize(w).T in fp32: [R, O].

    Few rows: per output channel, convert its stored row, multiply by each activation row and
    sum, in one fusion that streams the narrow values (output [O, R], so a weight row is used by
    all R activation rows while it is in cache). Many rows: dequantize once, then a dot.
    """
    x_RxI = x_RxI.astype(jnp.float32)
    if x_RxI.shape[0] == 1:  # a [O, 1, I] reduce runs ~100x slower on XLA:CPU than [O, I]
        y_O = jnp.sum(w.values.astype(jnp.float32) * x_RxI, axis=-1)
        return (y_O if w.scale is None else y_O * w.scale)[None, :]
    if x_RxI.shape[0] <= REDUCE_MAX_ROWS:
        w_OxI = w.values.astype(jnp.float32)
        y_OxR = jnp.sum(w_OxI[:, None, :] * x_RxI[None, :, :], axis=-1)
        if w.scale is not None:
            y_OxR = y_OxR * w.scale[:, None]
        return y_OxR.T
    y_RxO = jax.lax.dot_general(x_RxI, w.values.astype(jnp.float32), (((1,), (1,)), ((), ())))
    return y_RxO if w.scale is None else y_RxO * w.scale[None, :]


def take(w: WeightOnly, ids: Array, dtype: Any) -> Array:
    """Rows `ids` of dequantize(w) in `dtype` (an embedding lookup): one stored row gathered and
    scaled per id, never the whole table converted."""
    rows = jnp.take(w.values, ids, axis=0).astype(jnp.float32)
    if w.scale is not None:
        rows = rows * jnp.take(w.scale, ids, axis=0)[..., None]
    return rows.astype(dtype)


def linear(eq: str, x: Array, w: WeightOnly, bias: Optional[Array]) -> Array:
    """einsum(eq, x, kernel) + bias with the kernel given as a WeightOnly (see `Linear`).

    Args:
      eq: the layer's einsum "<x letters>,<kernel letters>-><y letters>"; the kernel's input
        letters (those it shares with x) come before its output letters.
      x: activations.
      w: the quantized kernel.
      bias: fp32 bias over the output dims, or None.

    Returns:
      fp32 outputs in the order of the y letters.
    """
    x_letters, rest = eq.split(",")
    k_letters, y_letters = rest.split("->")
    in_letters = [c for c in k_letters if c in x_letters]
    out_letters = [c for c in k_letters if c not in x_letters]
    batch_letters = [c for c in x_letters if c not in k_letters]
    order = batch_letters + in_letters
    x = jnp.transpose(x, [x_letters.index(c) for c in order])
    batch_shape = x.shape[:len(batch_letters)]
    y = matmul(x.reshape((-1, math.prod(w.in_shape))), w)
    y = y.reshape(batch_shape + w.out_shape)
    got = batch_letters + out_letters
    y = jnp.transpose(y, [got.index(c) for c in y_letters])
    return y if bias is None else y + bias.astype(y.dtype)


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
      `wte.embedding_q` ([V, C]: one scale per vocabulary row serves the lookup and the head)
      and an untied `lm_head` by `lm_head_q`; GPT(config).apply takes it as it takes `params`.
    """
    check_weights(weights)
    lead = 1 if config.scan_layers else 0

    def walk(tree, path):
        out = {}
        for k, v in tree.items():
            if k == "kernel" and tuple(path[-2:]) in _LINEAR_N_IN:
                out["kernel_q"] = quantize(v, _LINEAR_N_IN[tuple(path[-2:])], weights, lead=lead)
            elif isinstance(v, dict):
                out[k] = walk(v, path + (k,))
            else:
                out[k] = v
        return out

    out = walk(dict(params), ())
    out["wte"] = {"embedding_q": quantize(params["wte"]["embedding"].T, 1, weights)}
    if "lm_head" in params:
        del out["lm_head"]
        out["lm_head_q"] = quantize(params["lm_head"], 1, weights)
    return out


def dequantize_params(config: GPTConfig, params: Any) -> Any:
    """Plain fp32 parameters holding the numbers `quantize_params`' output stands for."""
    lead = 1 if config.scan_layers else 0

    def kernel(w: WeightOnly) -> Array:
        return jax.vmap(to_kernel)(w) if lead else to_kernel(w)

    def walk(tree):
        out = {}
        for k, v in tree.items():
            if k == "kernel_q":
                out["kernel"] = kernel(v)
            elif k == "embedding_q":
                out["embedding"] = dequantize(v)
            elif k == "lm_head_q":
                out["lm_head"] = to_kernel(v)
            elif isinstance(v, dict):
                out[k] = walk(v)
            else:
                out[k] = v
        return out

    return walk(dict(params))
