"""The decoder's building blocks: initialisers with logical axes, Linear, the token embedding,
layer norm, activations.

Every parameter is created with logical axis names (`vocab`, `embed`, `mlp`, `heads`,
`head_dim`, `position`); gptjax.sharding maps them to mesh axes.

Weight-only bf16/int8 (gptjax.nn.quant): a matrix parameter `name` may be given as a
`WeightOnly` stored under `name_q` instead (`param_or_weight_only`); Linear, Embed and GPT's
untied head then multiply by the stored values as they are (`einsum_fp32`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gptjax.config import GPTConfig
from gptjax.nn import adapter as lora_adapter
from gptjax.nn import quant
from gptjax.nn.param_layout import out_in_perm

Array = jax.Array


def normal_init(std: float, names: tuple):
    """N(0, std^2) initialiser that tags the parameter with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros_init(names: tuple):
    """Zeros initialiser that tags the parameter with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones_init(names: tuple):
    """Ones initialiser that tags the parameter with logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def resid_std(cfg: GPTConfig) -> float:
    """Init std of the residual projections: GPT-2's init_std / sqrt(2 n_layer) when scaled."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layer) if cfg.scale_resid_init else cfg.init_std


def activation(name: str) -> Callable[[Array], Array]:
    """The MLP nonlinearity named by GPTConfig.activation ('gelu_tanh', 'gelu' or 'relu')."""
    if name == "gelu_tanh":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    return jax.nn.relu


def layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    """The LayerNorm submodule `name` of the module being built (scale 1, bias 0 at init)."""
    # flax computes the LayerNorm statistics in fp32 even for bf16 inputs.
    return nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, dtype=jnp.dtype(cfg.dtype),
                        param_dtype=jnp.dtype(cfg.param_dtype), use_bias=cfg.use_bias,
                        scale_init=ones_init(("embed",)),
                        bias_init=zeros_init(("embed",)), name=name)


def param_or_weight_only(module: nn.Module, name: str, init: Callable, shape: tuple,
                         dtype: Any) -> Any:
    """The parameter `name` of `module` (created by `init` when initialising), or the
    gptjax.nn.quant.WeightOnly the parameters hold in its place as `name + "_q"`."""
    if module.has_variable("params", name + "_q"):
        return module.get_variable("params", name + "_q")
    return module.param(name, init, shape, dtype)


def einsum_fp32(eq: str, x: Array, kernel: Any, dtype: Any) -> Array:
    """einsum(eq, x, kernel) as fp32, for a kernel given as an array (both cast to `dtype`, fp32
    accumulation) or as a WeightOnly (read as stored by gptjax.nn.quant.linear, whose kernel
    letters are the input letters, shared with x, and the output letters, in any order)."""
    if isinstance(kernel, quant.WeightOnly):
        return quant.linear(eq, x, kernel, None)
    return jnp.einsum(eq, x.astype(dtype), kernel.astype(dtype),
                      preferred_element_type=jnp.float32)


class Embed(nn.Embed):
    """flax's Embed, also taking its table as a WeightOnly `embedding_q` ([N, C], int8 rows with
    one fp32 scale each, or bf16) in place of `embedding`; `attend` is the tied output head."""

    def setup(self):
        self.embedding = param_or_weight_only(
            self, "embedding", self.embedding_init, (self.num_embeddings, self.features),
            self.param_dtype)

    def __call__(self, ids: Array) -> Array:
        if isinstance(self.embedding, quant.WeightOnly):
            return quant.take(self.embedding, ids, self.dtype)
        return super().__call__(ids)

    def attend(self, x_BxTxC: Array) -> Array:
        """Logits [B, T, N] fp32: x against every row of the table (computed in `dtype`)."""
        return einsum_fp32("BTC,VC->BTV", x_BxTxC, self.embedding, self.dtype)


class Linear(nn.Module):
    """y = einsum(eq, x, kernel) + bias; a Conv1D-like layer with named, shaped parameters.

    Given a `kernel_q` parameter (a gptjax.nn.quant.WeightOnly) instead of `kernel`, the layer
    multiplies by that bf16/int8 kernel (gptjax.nn.quant.quantize_params builds such parameters).
    Given a LoRA adapter in the `lora` collection (gptjax.nn.lora), it adds the adapter's branch.
    """

    eq: str
    kernel_shape: tuple
    kernel_axes: tuple
    bias_shape: tuple
    bias_axes: tuple
    std: float
    use_bias: bool
    dtype: Any
    param_dtype: Any
    out_in: bool = False  # kernel stored [out dims, in dims]; see param_layout.decode_layout
    deterministic: bool = True  # no dropout on a LoRA branch

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = self._base(x)
        if self.has_variable(lora_adapter.COLLECTION, lora_adapter.LEAF):
            adapter = self.get_variable(lora_adapter.COLLECTION, lora_adapter.LEAF)
            y = y + lora_adapter.branch(adapter, self.eq, x, self.dtype, self.deterministic,
                                        self).astype(y.dtype)
        return y

    def _base(self, x: Array) -> Array:
        x_letters, rest = self.eq.split(",")
        k_letters, y_letters = rest.split("->")
        n_in = sum(c in x_letters for c in k_letters)
        perm = out_in_perm(len(k_letters), n_in) if self.out_in else tuple(range(len(k_letters)))
        # Created kernel first, then bias: flax derives each parameter's init rng from that order.
        kernel_axes = tuple(self.kernel_axes[i] for i in perm)
        kernel = param_or_weight_only(self, "kernel", normal_init(self.std, kernel_axes),
                                      tuple(self.kernel_shape[i] for i in perm), self.param_dtype)
        if isinstance(kernel, quant.WeightOnly):  # weight-only bf16/int8 for decoding
            bias = self.get_variable("params", "bias") if self.use_bias else None
            return quant.linear(self.eq, x, kernel, bias)
        bias = None
        if self.use_bias:
            bias = self.param("bias", zeros_init(self.bias_axes), self.bias_shape,
                              self.param_dtype).astype(self.dtype)
        if not self.out_in:
            return _flat_dot(self.eq, x.astype(self.dtype), kernel.astype(self.dtype), bias)
        k_letters = "".join(k_letters[i] for i in perm)
        # The kernel is the dot's first operand, so XLA:CPU streams each output as a dot
        # with one contiguous kernel row (jnp.einsum would put x first).
        contract = ([k_letters.index(c) for c in k_letters[-n_in:]],
                    [x_letters.index(c) for c in k_letters[-n_in:]])
        y = jax.lax.dot_general(kernel.astype(self.dtype), x.astype(self.dtype),
                                (contract, ((), ())))
        y_got = k_letters[:-n_in] + "".join(c for c in x_letters if c not in k_letters)
        y = jnp.transpose(y, [y_got.index(c) for c in y_letters])
        return y if bias is None else y + bias


def _flat_dot(eq: str, x: Array, kernel: Array, bias: Optional[Array]) -> Array:
    """einsum(eq, x, kernel) + bias for a layer "<batch><in>,<in><out>-><batch><out>" as one dot
    over the batch letters flattened into a single row axis.

    Same numbers as the einsum. XLA:CPU runs the flattened form faster (BENCHMARKS.md, "Training
    throughput"): with [B, T] rows the weight gradient contracts two axes and the bias gradient
    reduces two. Kernels keep their own axes, so a sharded head or MLP axis stays a kernel axis.
    Other equations fall back to jnp.einsum.
    """
    x_letters, rest = eq.split(",")
    k_letters, y_letters = rest.split("->")
    n_in = sum(c in x_letters for c in k_letters)
    n_batch = len(x_letters) - n_in
    if (x_letters[n_batch:] != k_letters[:n_in] or n_batch == 0
            or y_letters != x_letters[:n_batch] + k_letters[n_in:]):
        y = jnp.einsum(eq, x, kernel)
        return y if bias is None else y + bias
    batch_shape = x.shape[:n_batch]
    x2 = x.reshape((-1,) + x.shape[n_batch:])
    y = jax.lax.dot_general(x2, kernel, ((tuple(range(1, n_in + 1)), tuple(range(n_in))),
                                         ((), ())))
    if bias is not None:
        y = y + bias
    return y.reshape(batch_shape + y.shape[1:])
