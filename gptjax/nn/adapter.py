"""The LoRA adapter of one Linear and the branch it adds (gptjax.nn.lora builds and merges them).

Kept apart from gptjax.nn.lora, which reads the model's parameter shapes: the layers import this.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

COLLECTION = "lora"  # the variable collection the model reads adapters from
LEAF = "adapter"  # the adapter's name inside its Linear


@flax.struct.dataclass
class Adapter:
    """One Linear's adapter: `a` [lead..., in..., r], `b` [lead..., r, out...] (lead: stacked
    layers). `scale` (alpha / rank) and `dropout` are static: not trained, not saved as arrays."""

    a: Array
    b: Array
    scale: float = flax.struct.field(pytree_node=False, default=1.0)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)


def branch(adapter: Adapter, eq: str, x: Array, dtype: Any, deterministic: bool,
           module: nn.Module) -> Array:
    """(alpha / r) * dropout(x) A B, fp32, laid out as the Linear's output letters of `eq`.

    Args:
      adapter: the Linear's adapter (no lead dims: inside the model each layer sees its own).
      eq: the Linear's einsum; its kernel's input letters are the ones it shares with x.
      x: the Linear's input.
      dtype: the compute dtype (A, B and x are cast to it; accumulation in fp32).
      deterministic: no dropout.
      module: the Linear, for its dropout key.
    """
    x_letters, rest = eq.split(",")
    k_letters, y_letters = rest.split("->")
    in_letters = "".join(c for c in k_letters if c in x_letters)
    out_letters = "".join(c for c in k_letters if c not in x_letters)
    r = next(c for c in "ZYXWRQ" if c not in eq)
    batch = "".join(c for c in x_letters if c not in k_letters)
    if adapter.dropout > 0 and not deterministic:
        keep = 1.0 - adapter.dropout
        mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
        x = jnp.where(mask, x / keep, 0).astype(x.dtype)
    u = jnp.einsum(f"{x_letters},{in_letters}{r}->{batch}{r}", x.astype(dtype),
                   adapter.a.astype(dtype), preferred_element_type=jnp.float32)
    y = jnp.einsum(f"{batch}{r},{r}{out_letters}->{y_letters}", u.astype(dtype),
                   adapter.b.astype(dtype), preferred_element_type=jnp.float32)
    return y * adapter.scale
