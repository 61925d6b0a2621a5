"""Looking inside the model: activation capture and interventions as pure functions.

    from gptjax.nn import inspect
    logits, acts = inspect.forward_with_capture(cfg, params, tokens, ["h_*.mlp.act"])
    acts["h_0.mlp.act"]                                   # [B, T, F]
    logits, _ = inspect.forward_with_capture(             # ablate head 3 of layer 1
        cfg, params, tokens, interventions={"h_1.attn.z": inspect.ablate_heads(3)})

Points (names; shapes with B batch, T tokens of this call, S keys, H heads, D head width,
C model width, F MLP width):

  wte, wpe           token / position embeddings [B, T, C] (their sum enters block 0)
  h_{i}.resid_pre    the residual stream entering block i [B, T, C]
  h_{i}.attn.probs   attention probabilities [B, H, T, S] (fp32, before attention dropout)
  h_{i}.attn.z       each head's attention output, before c_proj [B, T, H, D]
  h_{i}.attn.out     the attention sublayer's output (c_proj, dropout) [B, T, C]
  h_{i}.resid_mid    the residual stream between attention and MLP [B, T, C]
  h_{i}.mlp.pre      MLP pre-activation (c_fc) [B, T, F]
  h_{i}.mlp.act      MLP activation [B, T, F]
  h_{i}.mlp.out      the MLP sublayer's output (c_proj, dropout) [B, T, C]
  h_{i}.resid_post   the residual stream leaving block i [B, T, C]
  ln_f               the final layer norm's output [B, T, C] (configs with final_norm)

For post-LN blocks (GPT-1) resid_mid and resid_post are after ln_1 and ln_2. Patterns are
fnmatch patterns over these names ('h_*.mlp.act', '*.resid_post', 'h_3.*'). With scan_layers
the names are the same (per layer): captures are taken stacked over the scan and split.

Everything happens while the model is traced: the functions are pure and compose with
`jax.jit`, `jax.grad` (gradients flow through interventions), `jax.vmap` (e.g. over a sweep's
stacked parameters) and a mesh. With nothing requested the model's program is exactly the plain
forward's (gptjax.nn.taps; tests/test_inspect.py compares the lowered HLO text).

The attention probabilities are computed beside the attention from the same queries and keys
(the 'xla' math), so capturing them leaves the output unchanged; an intervention on them adds
(p' - p) v to the attention output (an identity changes nothing, bitwise). Fused kernels
('cudnn', 'pallas', 'splash') never form them: asking for them there is an error, as it is with a
paged cache (its attention is computed per page).
"""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import ConfigError, GPTConfig
from gptjax.nn import taps
from gptjax.nn.kv_cache import PagedCache
from gptjax.nn.layers import einsum_fp32, layer_norm
from gptjax.nn.model import GPT

Array = jax.Array
Patterns = Union[str, Sequence[str]]

BLOCK_POINTS = ("resid_pre", "attn.probs", "attn.z", "attn.out", "resid_mid", "mlp.pre",
                "mlp.act", "mlp.out", "resid_post")
_NO_PROBS = ("cudnn", "pallas", "splash")


def point_names(config: GPTConfig) -> list[str]:
    """Every point of `config`'s forward, in the order the forward reaches them."""
    blocks = [f"h_{i}.{p}" for i in range(config.n_layer) for p in BLOCK_POINTS]
    return ["wte", "wpe"] + blocks + (["ln_f"] if config.final_norm else [])


def _available(config: GPTConfig) -> str:
    last = ", ln_f" if config.final_norm else ""
    return (f"wte, wpe, h_{{0..{config.n_layer - 1}}}.{{{', '.join(BLOCK_POINTS)}}}{last}")


def select(config: GPTConfig, patterns: Patterns) -> list[str]:
    """The point names matching `patterns` (fnmatch, case-sensitive), in forward order.

    Raises:
      ValueError: a pattern matches no point (the message lists the available names).
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    names = point_names(config)
    hit = set()
    for pattern in patterns:
        found = [n for n in names if fnmatch.fnmatchcase(n, str(pattern))]
        if not found:
            raise ValueError(f"activation pattern {pattern!r} matches no point of this model; "
                             f"available: {_available(config)}")
        hit.update(found)
    return [n for n in names if n in hit]


def _resolve(config: GPTConfig, interventions: Optional[Mapping[str, Callable]]) -> dict:
    """Full name -> function; several patterns on one name compose in the mapping's order."""
    fns: dict = {}
    for pattern, fn in (interventions or {}).items():
        if not callable(fn):
            raise ValueError(f"interventions[{pattern!r}] is {type(fn).__name__}; give a "
                             "function of the activation (x -> x')")
        for name in select(config, pattern):
            prev = fns.get(name)
            fns[name] = fn if prev is None else (lambda x, f=prev, g=fn: g(f(x)))
    return fns


def _check(config: GPTConfig, capture: list, fns: dict, gpt_kwargs: dict) -> None:
    probs = [n for n in list(capture) + list(fns) if n.endswith(".attn.probs")]
    if not probs:
        return
    if config.attention_impl in _NO_PROBS:
        raise ConfigError(f"{probs[0]!r}: attention_impl={config.attention_impl!r} never forms "
                          "the attention probabilities; capture them with attention_impl='xla'")
    if isinstance(gpt_kwargs.get("cache"), PagedCache):
        raise ValueError(f"{probs[0]!r}: a paged cache attends page by page and never forms the "
                         "attention probabilities; use a dense cache (init_cache) or none")
    dropout = not gpt_kwargs.get("deterministic", True) and config.attn_pdrop > 0
    if dropout and any(n.endswith(".attn.probs") for n in fns):
        raise ValueError(f"an intervention on {probs[0]!r} with attention dropout on "
                         f"(attn_pdrop={config.attn_pdrop}, deterministic=False); run with "
                         "deterministic=True")


def forward_with_capture(config: GPTConfig, params: Any, tokens_BxT: Optional[Array],
                         patterns: Patterns = (),
                         interventions: Optional[Mapping[str, Callable]] = None, *,
                         decode_layout: bool = False, variables: Optional[dict] = None,
                         **gpt_kwargs) -> tuple[Any, dict]:
    """The forward pass with named activations captured and interventions applied.

    Args:
      config: the architecture.
      params: its parameters (fp32, or weight-only from gptjax.nn.quant).
      tokens_BxT: token ids (None with inputs_embeds_BxTxC).
      patterns: names or fnmatch patterns of the points to capture ('h_*.mlp.act').
      interventions: name or pattern -> function applied to the value at that point inside the
        forward (x -> x' of the same shape and dtype); gradients flow through. Several patterns
        hitting one point are applied in the mapping's order.
      decode_layout: parameters in gptjax.nn.param_layout.decode_layout.
      variables: further variable collections (e.g. {'lora': adapters}).
      **gpt_kwargs: GPT's call arguments (positions_BxT, cache, deterministic,
        last_logits_only, segment_ids_BxT, inputs_embeds_BxTxC, ...) and `rngs` for dropout.

    Returns:
      (out, captures): `out` as GPT.apply returns it (logits, or a tuple with the new cache),
      and {name: array} for every captured point. A captured point that an
      intervention changes is captured as changed.

    Raises:
      ValueError / ConfigError: a pattern matches nothing (one line listing the names), or the
        attention probabilities are asked of a path that never forms them.
    """
    capture = select(config, patterns) if patterns else []
    fns = _resolve(config, interventions)
    _check(config, capture, fns, gpt_kwargs)
    period = len(config.attention_pattern)
    request = taps.Request(period=period, n_periods=config.n_layer // period,
                           scanned=config.scan_layers, capture=frozenset(capture),
                           interventions=fns)
    all_vars = {"params": params, **(variables or {})}
    model = GPT(config, decode_layout)
    with taps.requesting(request):
        if not capture:
            return model.apply(all_vars, tokens_BxT, **gpt_kwargs), {}
        out, cols = model.apply(all_vars, tokens_BxT, mutable=[taps.COLLECTION], **gpt_kwargs)
    return out, _by_name(request, cols.get(taps.COLLECTION, {}), capture)


def _by_name(request: taps.Request, sown: dict, capture: list) -> dict:
    """The sown collection ({module path: {tap_<point>: (value,)}}) as {name: value}."""
    got = {}
    for path, value in flax.traverse_util.flatten_dict(sown).items():
        x = value[0] if isinstance(value, tuple) else value
        point, mods = path[-1][len(taps.KEY_PREFIX):], path[:-1]
        if mods and mods[0] == "h":  # scanned: stacked over periods
            j, rest = int(mods[1].rsplit("_", 1)[1]), ".".join(mods[2:] + (point,))
            for p in range(request.n_periods):
                got[f"h_{p * request.period + j}.{rest}"] = x[p]
        else:
            got[".".join(mods + (point,))] = x
    missing = [n for n in capture if n not in got]
    if missing:
        raise ValueError(f"points {missing} were not reached by this call")
    return {n: got[n] for n in capture}


# ---------------------------------------------------------------------------- interventions
def patch(value: Array, positions: Any = None) -> Callable[[Array], Array]:
    """x -> value (activation patching); with `positions`, only those token positions (axis 1;
    for attn.probs, axis 1 is the head) are replaced, the rest of x kept."""
    def fn(x):
        v = jnp.asarray(value, x.dtype)
        if positions is None:
            return jnp.broadcast_to(v, x.shape)
        idx = jnp.asarray(positions)
        return x.at[:, idx].set(v[:, idx])
    return fn


def _checked_indices(what: str, idx: Any, size: int) -> Array:
    """`idx` as an index array, refused in one line when a concrete index is outside 0..size-1
    (JAX drops out-of-bounds scatter writes: an ablation of head 7 of 2 would change nothing)."""
    try:
        concrete = np.asarray(idx)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return jnp.asarray(idx)  # traced indices (vmapped over heads, say): the caller's range
    if concrete.size and (concrete.min() < 0 or concrete.max() >= size):
        raise ValueError(f"{what}({idx!r}): indices must be in 0..{size - 1}")
    return jnp.asarray(idx)


def ablate_heads(heads: Any) -> Callable[[Array], Array]:
    """For 'h_{i}.attn.z' ([B, T, H, D]): zero the outputs of `heads` (an index or a list)."""
    return lambda z: z.at[:, :, _checked_indices("ablate_heads", heads, z.shape[2])].set(0)


def ablate_neurons(neurons: Any) -> Callable[[Array], Array]:
    """For 'h_{i}.mlp.act' / 'mlp.pre' ([B, T, F]): zero the `neurons` (last axis)."""
    return lambda h: h.at[..., _checked_indices("ablate_neurons", neurons, h.shape[-1])].set(0)


def add(vector: Array, scale: float = 1.0) -> Callable[[Array], Array]:
    """x -> x + scale * vector (a steering vector, broadcast against x: [C] for every token)."""
    return lambda x: x + (scale * jnp.asarray(vector)).astype(x.dtype)


# ---------------------------------------------------------------------------- readouts
def logit_lens(config: GPTConfig, params: Any, resid_BxTxC: Array) -> Array:
    """Logits [B, T, V] (fp32) read from a residual stream by the model's own final layer norm
    and output head: applied to the last block's resid_post, the model's logits."""
    dt = jnp.dtype(config.dtype)
    x = resid_BxTxC
    if config.final_norm:
        x = layer_norm(config, "ln_f").apply({"params": params["ln_f"]}, x)
    if config.tie_embeddings:
        wte = params["wte"]
        table = wte["embedding"] if "embedding" in wte else wte["embedding_q"]
        return einsum_fp32("BTC,VC->BTV", x, table, dt).astype(jnp.float32)
    head = params["lm_head"] if "lm_head" in params else params["lm_head_q"]
    return einsum_fp32("BTC,CV->BTV", x, head, dt).astype(jnp.float32)
