"""Parameter layouts of the same model: per-layer or stacked for `nn.scan`, and the decode layout.

The numbers never change between layouts; only where they sit. `stack_layers` / `unstack_layers`
convert between the per-layer tree (`h_{i}`, the layout of HF checkpoints) and the scan tree
(`h.block_{j}` stacked over periods of `attention_pattern`). `decode_layout` stores the c_proj
kernels [out, in] for `GPT(config, decode_layout=True)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from gptjax.config import GPTConfig

# The kernels `decode_layout` stores [out, in], with their number of input dims.
_OUT_IN_KERNELS = {("attn", "c_proj"): 2, ("mlp", "c_proj"): 1}


def out_in_perm(ndim: int, n_in: int) -> tuple:
    """The permutation that moves a kernel's first n_in (input) dims behind its output dims.

    Args:
      ndim: the kernel's number of dims.
      n_in: how many of its leading dims are input dims.

    Returns:
      A permutation for `jnp.transpose`.
    """
    return tuple(range(n_in, ndim)) + tuple(range(n_in))


def _map_out_in_kernels(config: GPTConfig, params: Any, inverse: bool) -> Any:
    lead = 1 if config.scan_layers else 0

    def f(path, x):
        names = tuple(getattr(k, "key", None) for k in path)
        n_in = _OUT_IN_KERNELS.get(names[-3:-1]) if names[-1:] == ("kernel",) else None
        if n_in is None:
            return x
        perm = out_in_perm(x.ndim - lead, n_in)
        if inverse:
            perm = tuple(perm.index(i) for i in range(len(perm)))
        return jnp.transpose(x, tuple(range(lead)) + tuple(lead + i for i in perm))
    return jax.tree_util.tree_map_with_path(f, params)


def decode_layout(config: GPTConfig, params: Any) -> Any:
    """The parameters for `GPT(config, decode_layout=True)`: c_proj kernels stored [out, in].

    A decode step multiplies one vector per row by every kernel, so it runs at the speed XLA:CPU
    streams kernels from memory. For the down-projections that speed depends on the layout:
    contracted kernel-first with each output one contiguous row (torch.nn.Linear's layout), they
    stream faster than in the [in, out] layout (BENCHMARKS.md, "Decode"). The up-projections run
    at the same speed either way and are left alone. Copies the two c_proj kernels of every layer
    (about 1/4 of the weights).

    Args:
      config: the model's config (scan_layers decides whether kernels carry a leading layer dim).
      params: parameters in the training layout.

    Returns:
      The same pytree with the c_proj kernels transposed to [out, in].
    """
    return _map_out_in_kernels(config, params, inverse=False)


def from_decode_layout(config: GPTConfig, params: Any) -> Any:
    """Undo `decode_layout`.

    Args:
      config: the model's config.
      params: parameters in the decode layout.

    Returns:
      The parameters in the training layout.
    """
    return _map_out_in_kernels(config, params, inverse=True)


def stack_layers(config: GPTConfig, params: dict) -> dict:
    """Per-layer parameters (`h_{i}`) to the scan layout (`h.block_{j}` stacked over periods).

    Args:
      config: the model's config (its attention_pattern is the period).
      params: parameters with one `h_{i}` subtree per layer.

    Returns:
      The parameters with `h: {block_j: leaves stacked over n_layer / period}`.
    """
    P = len(config.attention_pattern)
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    out["h"] = {
        f"block_{j}": jax.tree_util.tree_map(
            lambda *xs: jnp.stack(xs), *[params[f"h_{i}"] for i in range(j, config.n_layer, P)])
        for j in range(P)}
    return out


def unstack_layers(config: GPTConfig, params: dict) -> dict:
    """The scan layout back to per-layer parameters `h_{i}`.

    Args:
      config: the model's config.
      params: parameters in the scan layout (`h.block_{j}`).

    Returns:
      The parameters with one `h_{i}` subtree per layer.
    """
    P = len(config.attention_pattern)
    out = {k: v for k, v in params.items() if k != "h"}
    for i in range(config.n_layer):
        out[f"h_{i}"] = jax.tree_util.tree_map(lambda x: x[i // P], params["h"][f"block_{i % P}"])
    return out


def _is_params(x: Any) -> bool:
    """Whether `x` is a decoder's parameter tree (or one shaped like it: an Adam moment)."""
    return isinstance(x, dict) and ("h_0" in x or isinstance(x.get("h"), dict) and "block_0"
                                    in x["h"])


def convert_layout(config: GPTConfig, tree: Any, scan_layers: bool) -> Any:
    """Every parameter tree inside `tree` moved to the per-layer or the scan layout.

    Works on a train state as well as on parameters: the optimizer's moments have the
    parameters' tree (optax keeps them in the same dicts, with masked-out leaves as empty
    nodes), so each dict shaped like the parameters is converted and everything else (the step,
    Adam's count) is kept. Stacking and slicing move numbers without changing one.

    Args:
      config: the architecture (its attention_pattern is the scan period).
      tree: any pytree holding parameter-shaped dicts, in either layout.
      scan_layers: the target: stacked for `nn.scan` (True) or one `h_{i}` per layer.

    Returns:
      `tree` with every parameter-shaped dict in the target layout.
    """
    def convert(x):
        if not _is_params(x):
            return x
        if scan_layers:
            return x if "h" in x else stack_layers(config, x)
        return unstack_layers(config, x) if "h" in x else x
    return jax.tree_util.tree_map(convert, tree, is_leaf=_is_params)
