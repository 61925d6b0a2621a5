"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as pure functions.

The adapters are their own pytree beside the frozen base parameters:

    lora_cfg = LoraConfig(rank=8, alpha=16, targets=("attn.c_attn", "mlp.c_fc"))
    adapters = init_lora(model_cfg, lora_cfg, rng)
    logits = apply(model_cfg, base, adapters, tokens)           # GPT(...) over both trees
    grads = jax.grad(lambda ad: lm_loss(apply(model_cfg, base, ad, x), y))(adapters)

A targeted Linear computes y = x W + b + (alpha / rank) * dropout(x) A B, with A [in..., r] and
B [r, out...] (B starts at zero, A uniform in +-1/sqrt(fan_in), PEFT's initialisation), so a new
adapter leaves the model's outputs as they were. The adapter tree mirrors the parameters' paths
(`h_0.attn.c_attn.adapter`, or `h.block_0...` stacked over layers under `scan_layers`) and is
given to the model as the `lora` variable collection; each leaf is an `Adapter` whose scale and
dropout rate are static, so `jax.grad`, optax and Orbax see only A and B. The base may be fp32,
or weight-only bf16/int8 (gptjax.nn.quant.quantize_params, QLoRA-style): the Linear multiplies
by the stored kernel either way and adds the adapter's branch (computed in the compute dtype with
fp32 accumulation, added in the layer's output dtype).

Targets are the four matrices of a block: `attn.c_attn` (the q/k/v projection), `attn.c_proj`,
`mlp.c_fc`, `mlp.c_proj`; PEFT's GPT-2 names are accepted too (`c_attn`, `c_fc`, and `c_proj`,
which names both projections), and `all` names the four.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from gptjax.config import GPTConfig
from gptjax.nn import quant
from gptjax.nn.adapter import COLLECTION, LEAF, Adapter
from gptjax.nn.model import GPT, abstract_params, logical_axes

Array = jax.Array

# (module, Linear) -> number of input dims of its kernel.
TARGETS = {"attn.c_attn": 1, "attn.c_proj": 2, "mlp.c_fc": 1, "mlp.c_proj": 1}
# Other names a target may be given by (PEFT's GPT-2 module names).
ALIASES = {"c_attn": ("attn.c_attn",), "c_fc": ("mlp.c_fc",),
           "c_proj": ("attn.c_proj", "mlp.c_proj"), "all": tuple(TARGETS)}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """What to adapt and how: rank r, alpha (the branch is scaled by alpha / r), the dropout on
    the branch's input while training, and the target matrices (see the module docstring)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple = ("attn.c_attn",)

    @property
    def scale(self) -> float:
        return float(self.alpha) / int(self.rank)

    def modules(self) -> tuple:
        """The targeted (module.linear) names, resolved; checks every field first."""
        check_lora_config(self)
        return resolve_targets(self.targets)


def resolve_targets(targets: Sequence[str]) -> tuple:
    """The module names `targets` stand for, in TARGETS' order; a one-line ValueError for a name
    that names no module."""
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not targets:
        raise ValueError("lora.targets=(): name at least one of "
                         f"{', '.join(TARGETS)} (or c_attn, c_proj, c_fc, all)")
    chosen = set()
    for t in targets:
        if t in TARGETS:
            chosen.add(t)
        elif t in ALIASES:
            chosen.update(ALIASES[t])
        else:
            raise ValueError(f"lora.targets: {t!r} names no module; allowed: "
                             f"{', '.join(TARGETS)} (or c_attn, c_proj, c_fc, all)")
    return tuple(t for t in TARGETS if t in chosen)


def check_lora_config(cfg: LoraConfig) -> None:
    """A one-line ValueError naming the first impossible field of `cfg`."""
    if not isinstance(cfg.rank, int) or isinstance(cfg.rank, bool) or cfg.rank < 1:
        raise ValueError(f"lora.rank={cfg.rank!r}: must be an integer >= 1")
    if not isinstance(cfg.alpha, (int, float)) or not 0 < cfg.alpha < math.inf:
        raise ValueError(f"lora.alpha={cfg.alpha!r}: must be a finite number > 0")
    if not isinstance(cfg.dropout, (int, float)) or not 0 <= cfg.dropout < 1:
        raise ValueError(f"lora.dropout={cfg.dropout!r}: must be a number in [0, 1)")
    resolve_targets(cfg.targets)


def _kernels(model_cfg: GPTConfig):
    """(path to a targetable Linear, its module name, kernel shape, kernel logical axes)."""
    shapes, axes = abstract_params(model_cfg), logical_axes(model_cfg)
    out = []

    def walk(s, a, path):
        for k, v in s.items():
            if isinstance(v, dict):
                walk(v, a[k], path + (k,))
            elif k == "kernel" and ".".join(path[-2:]) in TARGETS:
                out.append((path, ".".join(path[-2:]), v.shape, tuple(a[k])))
    walk(shapes, axes, ())
    return out


def _set(tree: dict, path: tuple, value: Any) -> None:
    for k in path:
        tree = tree.setdefault(k, {})
    tree[LEAF] = value


def _split(model_cfg: GPTConfig, name: str, shape: tuple) -> tuple:
    """(lead dims, in dims, out dims) of a targeted kernel's shape."""
    lead = 1 if model_cfg.scan_layers else 0
    n_in = TARGETS[name]
    return shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:]


def init_lora(model_cfg: GPTConfig, lora_cfg: LoraConfig, rng: Array) -> dict:
    """New adapters for `model_cfg`'s targeted Linears: A uniform in +-1/sqrt(fan_in), B zero.

    Args:
      model_cfg: the base model's architecture (and its `scan_layers` layout).
      lora_cfg: rank, alpha, dropout, targets.
      rng: the PRNG key (folded with each Linear's index).

    Returns:
      The adapter tree (`{'h_0': {'attn': {'c_attn': {'adapter': Adapter}}}, ...}`).
    """
    targets = lora_cfg.modules()
    tree: dict = {}
    for i, (path, name, shape, _) in enumerate(_kernels(model_cfg)):
        if name not in targets:
            continue
        lead, d_in, d_out = _split(model_cfg, name, shape)
        bound = 1.0 / math.sqrt(math.prod(d_in))
        a = jax.random.uniform(jax.random.fold_in(rng, i), lead + d_in + (lora_cfg.rank,),
                               jnp.float32, -bound, bound)
        b = jnp.zeros(lead + (lora_cfg.rank,) + d_out, jnp.float32)
        _set(tree, path, Adapter(a, b, lora_cfg.scale, float(lora_cfg.dropout)))
    return tree


def abstract_lora(model_cfg: GPTConfig, lora_cfg: LoraConfig) -> dict:
    """The adapters' shapes and dtypes (jax.ShapeDtypeStruct), computed without allocating."""
    return jax.eval_shape(lambda: init_lora(model_cfg, lora_cfg, jax.random.key(0)))


def lora_logical_axes(model_cfg: GPTConfig, lora_cfg: LoraConfig) -> dict:
    """The adapters' logical axis names as PartitionSpecs: A keeps its kernel's input (and layer)
    axes, B its output axes; the rank axis is never split."""
    targets = lora_cfg.modules()
    tree: dict = {}
    for path, name, shape, axes in _kernels(model_cfg):
        if name not in targets:
            continue
        lead = 1 if model_cfg.scan_layers else 0
        n_in = TARGETS[name]
        a = P(*axes[:lead + n_in], None)
        b = P(*axes[:lead], None, *axes[lead + n_in:])
        _set(tree, path, Adapter(a, b, lora_cfg.scale, float(lora_cfg.dropout)))
    return tree


def adapters(tree: Any) -> list:
    """The Adapter leaves of an adapter tree, with their paths ((key, ...), Adapter)."""
    out = []

    def walk(t, path):
        for k, v in t.items():
            if isinstance(v, Adapter):
                out.append((path, v))
            elif isinstance(v, dict):
                walk(v, path + (k,))
    walk(dict(tree), ())
    return out


def num_lora_params(tree: Any) -> int:
    """Trainable numbers in an adapter tree."""
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def apply(model_cfg: GPTConfig, base: Any, lora: Any, tokens: Array, *args, **kwargs):
    """`GPT(model_cfg).apply` over the frozen base and the adapters: the adapted model's forward.

    Takes every argument of GPT's call (positions, deterministic, cache, return_hidden, ...);
    give `rngs={'dropout': key}` with `deterministic=False` when lora.dropout > 0.
    """
    check_adapters(model_cfg, lora)
    rngs = kwargs.pop("rngs", None)
    return GPT(model_cfg).apply({"params": base, COLLECTION: lora}, tokens, *args, rngs=rngs,
                                **kwargs)


def check_adapters(model_cfg: GPTConfig, lora: Any) -> None:
    """A one-line ValueError for an adapter tree that does not fit `model_cfg`: an adapter at no
    targetable Linear, or A/B of other shapes than the kernel's inputs and outputs (an adapter of
    another model, rank mismatched between A and B)."""
    kernels = {path: (name, shape) for path, name, shape, _ in _kernels(model_cfg)}
    for path, ad in adapters(lora):
        where = ".".join(path)
        if path not in kernels:
            raise ValueError(f"adapter {where}: this model has no Linear there to adapt; allowed: "
                             f"{', '.join(TARGETS)} of its layers ({_layout(model_cfg)})")
        name, shape = kernels[path]
        lead, d_in, d_out = _split(model_cfg, name, shape)
        r = ad.a.shape[-1]
        want_a, want_b = lead + d_in + (r,), lead + (r,) + d_out
        if tuple(ad.a.shape) != want_a or tuple(ad.b.shape) != want_b:
            raise ValueError(f"adapter {where} has A {tuple(ad.a.shape)} and B "
                             f"{tuple(ad.b.shape)}; this model's kernel {tuple(shape)} takes A "
                             f"{want_a} and B {want_b} (an adapter of another model or layout)")


def _layout(model_cfg: GPTConfig) -> str:
    return ("h.block_j stacked over layers (scan_layers)" if model_cfg.scan_layers
            else "h_0 .. h_{n_layer - 1}")


def delta(model_cfg: GPTConfig, adapter: Adapter) -> Array:
    """The adapter's full-rank update scale * A B, shaped like its kernel (fp32)."""
    a = adapter.a.astype(jnp.float32)
    b = adapter.b.astype(jnp.float32)

    def one(a, b):
        return jnp.tensordot(a, b, axes=([a.ndim - 1], [0]))
    d = jax.vmap(one)(a, b) if model_cfg.scan_layers else one(a, b)
    return d * adapter.scale


def merge(model_cfg: GPTConfig, base: Any, lora: Any) -> dict:
    """Plain fp32 parameters W + (alpha / r) A B for every adapted kernel: the same model with no
    adapter (export, serving). A weight-only bf16/int8 base is dequantized first."""
    check_adapters(model_cfg, lora)
    params = base
    if _has_weight_only(base):
        params = quant.dequantize_params(model_cfg, base)
    params = jax.tree_util.tree_map(lambda x: x, params)  # a fresh tree of the same leaves
    for path, ad in adapters(lora):
        node = params
        for k in path:
            node = node[k]
        node["kernel"] = node["kernel"].astype(jnp.float32) + delta(model_cfg, ad)
    return params


def _has_weight_only(tree: Any) -> bool:
    return any(isinstance(x, quant.WeightOnly) for x in jax.tree_util.tree_leaves(
        tree, is_leaf=lambda x: isinstance(x, quant.WeightOnly)))
