"""Sampling from a GPT: greedy, temperature, top-k and top-p decoding in one compiled loop.

Shape suffixes as in gptjax.nn.model: B batch (prompts), P padded prompt length, S cache slots,
V vocabulary, N new tokens (max_new_tokens), Q stop sequences, L longest stop sequence.

Layers:
  * `warp_logits`, `sample_logits`: temperature, then top-k, then top-p (the order of
    transformers' logits warpers), and the draw; pure functions of logits, testable without a model.
  * `sample_loop`: one `lax.while_loop` over a `tokens_to_logits` function (the flax lm1b
    sampler's design), so it runs on fake logits in tests; `beam_search_loop`
    (gptjax.inference.beam_search) is its beam-search counterpart.
  * `generate`: validates arguments, packs prompts, and calls a jitted core keyed on
    (config, batch, prompt bucket, max_new_tokens, greedy, top_k, top_p on/off, num_beams, stop
    sequence shape); the numeric knobs (temperature, top_p, eos_id, pad_id, length_penalty,
    early_stopping) are traced, so changing them does not recompile.

The model calls (`prefill`, `decode_step`), prompt packing and prepared parameters live in
gptjax.inference.decoding; this module re-exports them, so `gptjax.inference.sampling` is the
one import for decoding.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from gptjax.checks import check_int, is_int
from gptjax.config import GPTConfig
from gptjax.inference.beam_search import BeamScoring, beam_scoring, beam_search_loop
from gptjax.inference.decoding import (
    WEIGHT_FORMATS,
    DecodeParams,
    TokensToLogits,
    decode_step,
    gather_cache,
    pad_prompts,
    prefill,
    prepare_for_decoding,
    prompt_positions,
    prompt_rows,
    push_window,
    repeat_cache,
    short_repr,
    stop_array,
    stop_hit,
)

__all__ = [
    "BeamScoring", "DecodeParams", "GenerateOutput", "TokensToLogits", "beam_scoring",
    "beam_search_loop", "decode_step", "gather_cache", "generate", "pad_prompts", "prefill",
    "prepare_for_decoding", "prompt_positions", "repeat_cache", "sample_logits", "sample_loop",
    "stop_array", "warp_logits", "WEIGHT_FORMATS",
]

Array = jax.Array


class GenerateOutput(NamedTuple):
    """What `generate` returns (numpy arrays).

    Attributes:
      tokens: int32 [R, max_new_tokens] generated ids, pad_id after a row stops. R is the number
        of prompts, times num_return_sequences for beam search (rows grouped by prompt, best first).
      lengths: int32 [R] generated tokens per row, an EOS or stop sequence that ended it included.
      scores: None unless return_scores. Sampling: float32 [R, max_new_tokens] log-probability of
        each generated token under the model (log_softmax of the raw logits, before temperature,
        top-k and top-p), 0 after the row stops. Beam search: float32 [R] sequence scores as
        transformers reports them: sum of log-probabilities / length ** length_penalty.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    scores: Optional[np.ndarray]


# ---------------------------------------------------------------------------- logits -> tokens
def warp_logits(logits_BxV: Array, *, temperature: Any = 1.0, top_k: int = 0,
                top_p: Any = 1.0) -> Array:
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered logits become -inf.

    Matches transformers' TemperatureLogitsWarper, TopKLogitsWarper (ties with the k-th logit are
    kept) and TopPLogitsWarper (keep the most probable tokens until their mass reaches top_p; the
    most probable token is always kept). With both, the nucleus is computed over the k values
    lax.top_k returns, so an exact tie at the k-th logit is the one case that can differ.

    Args:
      logits_BxV: float logits.
      temperature: > 0, Python float or traced scalar.
      top_k: static int; 0 (or >= V) disables it.
      top_p: in (0, 1], Python float or traced scalar; the Python float 1.0 disables it.

    Returns:
      float32 [B, V] logits.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):
        logits_BxV = logits_BxV / jnp.asarray(temperature, jnp.float32)
    V = logits_BxV.shape[-1]
    sorted_BxK = None
    if 0 < top_k < V:
        sorted_BxK = jax.lax.top_k(logits_BxV, top_k)[0]  # descending
        logits_BxV = jnp.where(logits_BxV < sorted_BxK[:, -1:], -jnp.inf, logits_BxV)
    if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        if sorted_BxK is None:
            # A full sort of V per step; only compiled in when top_p is used without top_k.
            sorted_BxK = -jnp.sort(-logits_BxV, axis=-1)
        # After top-k the nucleus is taken among the k survivors, so sorting k values suffices.
        probs_BxK = jax.nn.softmax(sorted_BxK, axis=-1)
        mass_before_BxK = jnp.cumsum(probs_BxK, axis=-1) - probs_BxK
        keep_BxK = mass_before_BxK < jnp.asarray(top_p, jnp.float32)
        n_keep_B = jnp.maximum(jnp.sum(keep_BxK, axis=-1), 1)
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxK, n_keep_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
    return logits_BxV


def sample_logits(rng: Array, logits_BxV: Array, *, temperature: Any = 1.0, top_k: int = 0,
                  top_p: Any = 1.0, greedy: Optional[bool] = None) -> Array:
    """Draw one token per row; greedy (argmax) when temperature is 0.

    Args:
      rng: PRNG key.
      logits_BxV: float logits.
      temperature, top_k, top_p: see `warp_logits`.
      greedy: force greedy (True) or sampling (False); None means `temperature == 0` (which then
        must be a Python number).

    Returns:
      int32 [B] token ids.
    """
    if greedy is None:
        greedy = temperature == 0
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    warped_BxV = warp_logits(logits_BxV, temperature=temperature, top_k=top_k, top_p=top_p)
    return jax.random.categorical(rng, warped_BxV, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------- decode loop
def sample_loop(tokens_to_logits: TokensToLogits, logits_BxV: Array, state: Any, rng: Array, *,
                max_new_tokens: int, temperature: Any = 1.0, top_k: int = 0, top_p: Any = 1.0,
                greedy: bool = False, eos_id: Any = -1, stop_QxL: Optional[Array] = None,
                pad_id: Any = 0, step_callback: Optional[Callable] = None,
                logprobs: bool = True) -> tuple[Array, Array, Array, Array]:
    """Greedy or sampled decoding as one `lax.while_loop` over a token -> logits function.

    Step t draws token t from the current logits with key fold_in(rng, t), records it, and feeds
    it to `tokens_to_logits(tokens_B, t, state) -> (logits_BxV, state)`. A row stops after EOS or a
    stop sequence and then emits pad_id; the loop exits when every row has stopped.

    Args:
      tokens_to_logits: the model step (or a fake one in tests).
      logits_BxV: logits for the first new token (the prefill's last column).
      state: anything tokens_to_logits threads through (the KV cache).
      rng: PRNG key (unused when greedy).
      max_new_tokens: static number of steps N.
      temperature, top_k, top_p: see `warp_logits`.
      greedy: argmax instead of sampling (static).
      eos_id: end-of-sequence id, or -1 for none (traced).
      stop_QxL: stop sequences right-aligned with -1 on the left (see `stop_array`), or None.
      pad_id: filler after a row stops (traced).
      step_callback: a host function called as step_callback(tokens_B, emitted_B) after every
        step (emitted_B: the rows that produced a token), in order, for streaming; None for none.
      logprobs: record each token's log-probability (static); False leaves logprobs_BxN zero and
        spares every step a log_softmax over the vocabulary.

    Returns:
      (tokens_BxN int32, lengths_B int32, logprobs_BxN float32 under the raw logits, steps: the
      number of loop iterations run, < N when every row stopped early).
    """
    B, _ = logits_BxV.shape
    N = max_new_tokens
    L = 1 if stop_QxL is None else stop_QxL.shape[1]
    pad_id = jnp.asarray(pad_id, jnp.int32)

    def cond(carry):
        t, done_B = carry[0], carry[5]
        return (t < N) & ~jnp.all(done_B)

    def body(carry):
        t, logits_BxV, state, tokens_BxN, logprobs_BxN, done_B, lengths_B, window_BxL = carry
        tok_B = sample_logits(jax.random.fold_in(rng, t), logits_BxV, temperature=temperature,
                              top_k=top_k, top_p=top_p, greedy=greedy)
        if logprobs:
            logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BxV.astype(jnp.float32)),
                                         tok_B[:, None], axis=-1)[:, 0]
        # Stopped rows still run through the model (fixed shapes); they are fed the sampled id,
        # always a valid embedding row, whereas pad_id may lie outside the vocabulary.
        fed_B = tok_B
        tok_B = jnp.where(done_B, pad_id, tok_B)
        if step_callback is not None:
            jax.experimental.io_callback(step_callback, None, tok_B, ~done_B, ordered=True)
        tokens_BxN = jax.lax.dynamic_update_slice(tokens_BxN, tok_B[:, None], (0, t))
        if logprobs:
            logprobs_BxN = jax.lax.dynamic_update_slice(
                logprobs_BxN, jnp.where(done_B, 0.0, logp_B)[:, None], (0, t))
        lengths_B = jnp.where(done_B, lengths_B, t + 1)
        window_BxL = push_window(window_BxL, tok_B)
        hit_B = tok_B == eos_id
        if stop_QxL is not None:
            hit_B |= stop_hit(window_BxL, stop_QxL)
        done_B = done_B | hit_B
        # The step after the last token is wasted (1/N of the work); skipping it would need a
        # lax.cond around the model, whose branches may copy the whole cache.
        logits_BxV, state = tokens_to_logits(fed_B, t, state)
        return (t + 1, logits_BxV.astype(jnp.float32), state, tokens_BxN, logprobs_BxN, done_B,
                lengths_B, window_BxL)

    carry = (jnp.zeros((), jnp.int32), logits_BxV.astype(jnp.float32), state,
             jnp.full((B, N), pad_id, jnp.int32), jnp.zeros((B, N), jnp.float32),
             jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32), jnp.full((B, L), -1, jnp.int32))
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[3], carry[6], carry[4], carry[0]


# ---------------------------------------------------------------------------- jitted cores
def _model_step_fn(config: GPTConfig, params: Any, lengths_N: Array) -> TokensToLogits:
    def tokens_to_logits(tokens_N, t, cache):
        return decode_step(config, params, tokens_N, lengths_N + t, cache)
    return tokens_to_logits


# The streaming target of the generate call in progress. The compiled loop calls the fixed
# function `_stream_to_host`, so a new callback per call does not recompile; the lock keeps
# concurrent streaming calls from crossing.
_stream_lock = threading.Lock()
_stream_target: list = [None]


def _stream_to_host(tokens_B, emitted_B) -> None:
    for row in np.flatnonzero(np.asarray(emitted_B)):
        _stream_target[0](int(row), int(tokens_B[row]))


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "greedy", "top_k",
                                             "use_top_p", "stream", "logprobs"))
def _sample_core(params, tokens_BxP, lengths_B, rng, temperature, top_p, eos_id, stop_QxL,
                 pad_id, *, config, max_new_tokens, greedy, top_k, use_top_p, stream, logprobs):
    logits_BxV, cache = prefill(config, params, tokens_BxP, lengths_B,
                                tokens_BxP.shape[1] + max_new_tokens, last_only=True)
    return sample_loop(_model_step_fn(config, params, lengths_B), logits_BxV, cache, rng,
                       max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p if use_top_p else 1.0, greedy=greedy, eos_id=eos_id,
                       stop_QxL=stop_QxL, pad_id=pad_id,
                       step_callback=_stream_to_host if stream else None, logprobs=logprobs)


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "num_beams"))
def _beam_core(params, tokens_BxP, lengths_B, eos_id, stop_QxL, pad_id, scoring, *, config,
               max_new_tokens, num_beams):
    logits_BxV, cache = prefill(config, params, tokens_BxP, lengths_B,
                                tokens_BxP.shape[1] + max_new_tokens, last_only=True)
    # The prompt is run once per prompt, then its cache is copied to every beam.
    cache = repeat_cache(config, cache, num_beams)
    logits_NxV = jnp.repeat(logits_BxV, num_beams, axis=0)
    lengths_N = jnp.repeat(lengths_B, num_beams)
    return beam_search_loop(
        _model_step_fn(config, params, lengths_N), functools.partial(gather_cache, config),
        logits_NxV, cache, num_beams=num_beams, max_new_tokens=max_new_tokens, eos_id=eos_id,
        stop_QxL=stop_QxL, pad_id=pad_id, scoring=scoring)



# ---------------------------------------------------------------------------- entry point
def generate(config: GPTConfig, params: Any, prompts: Any, *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
             eos_id: Optional[int] = None, stop_sequences: Sequence[Sequence[int]] = (),
             length_penalty: float = 1.0, rng: Any = None, pad_id: int = 0,
             return_scores: bool = False, prompt_lengths: Any = None,
             early_stopping: Any = False, num_return_sequences: int = 1,
             prompt_bucket: int = 16,
             stream_callback: Optional[Callable[[int, int], Any]] = None) -> GenerateOutput:
    """Continue a batch of prompts: greedy, sampled (temperature / top-k / top-p) or beam search.

    Args:
      config: the model's GPTConfig.
      params: its parameters (per-layer or scan layout, matching config.scan_layers), or
        `prepare_for_decoding(config, params)` (faster on CPU when called more than once).
      prompts: a list of token-id lists (lengths may differ), or a [B, T] int array with
        `prompt_lengths` (tokens first in each row, right padding).
      max_new_tokens: tokens to generate per row; every prompt length + max_new_tokens must fit
        in config.n_ctx.
      temperature: 0 means greedy; otherwise logits are divided by it before top-k / top-p.
      top_k: keep the k most likely tokens (0: all).
      top_p: keep the most likely tokens up to this probability mass, in (0, 1] (1: all).
      num_beams: 1 for greedy/sampling; > 1 for beam search (deterministic: temperature must be
        0 or 1, top_k 0, top_p 1).
      eos_id: a row (or beam hypothesis) ends after emitting it; None for no EOS.
      stop_sequences: token-id sequences; a row ends once its generated tokens end with one.
        Matching looks at generated tokens only, and the matched tokens stay in the output.
      length_penalty: beam search: hypotheses score sum_logprob / length ** length_penalty.
      rng: a PRNG key or an int seed for sampling (None: seed 0); step t uses fold_in(rng, t).
      pad_id: filler after a row ends (any integer; it is never fed to the model).
      return_scores: also return scores (see GenerateOutput).
      prompt_lengths: real lengths when prompts is a padded array.
      early_stopping: beam search stopping rule, as in transformers: False (heuristic), True
        (stop a prompt once it has num_beams hypotheses) or 'never'.
      num_return_sequences: beam search: the best hypotheses returned per prompt (<= num_beams).
      prompt_bucket: the padded prompt length is rounded up to a multiple of this, so calls with
        similar prompt lengths share one compiled loop.
      stream_callback: greedy/sampling only: called on the host as stream_callback(row, token_id)
        for each token as it is generated (a device-to-host transfer per step).

    Returns:
      GenerateOutput(tokens, lengths, scores) as numpy arrays.

    Raises:
      ValueError: one line naming the bad value and what is allowed.
    """
    _check_options(config, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
                   early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                   eos_id=eos_id, pad_id=pad_id, prompt_bucket=prompt_bucket,
                   stream_callback=stream_callback)
    stop_QxL = stop_array(_checked_stop_sequences(config, stop_sequences))
    rows = _checked_prompts(config, prompts, prompt_lengths, max_new_tokens)
    tokens_BxP, lengths_B = pad_prompts(rows, pad_id=0, bucket=prompt_bucket)
    eos = jnp.int32(-1 if eos_id is None else eos_id)
    if num_beams == 1:
        return _generate_sampled(
            config, params, tokens_BxP, lengths_B, eos, stop_QxL, max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, pad_id=pad_id,
            return_scores=return_scores, stream_callback=stream_callback)
    tokens, lengths, scores = jax.device_get(_beam_core(
        params, tokens_BxP, lengths_B, eos, stop_QxL, jnp.int32(pad_id),
        beam_scoring(length_penalty, max_new_tokens, early_stopping), config=config,
        max_new_tokens=max_new_tokens, num_beams=num_beams))
    R = num_return_sequences
    tokens = tokens[:, :R].reshape(-1, max_new_tokens)
    return GenerateOutput(tokens, lengths[:, :R].reshape(-1),
                          scores[:, :R].reshape(-1) if return_scores else None)


def _generate_sampled(config: GPTConfig, params: Any, tokens_BxP: np.ndarray,
                      lengths_B: np.ndarray, eos: Array, stop_QxL: Optional[np.ndarray], *,
                      max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                      rng: Any, pad_id: int, return_scores: bool,
                      stream_callback: Optional[Callable[[int, int], Any]]) -> GenerateOutput:
    """Greedy or sampled decoding of packed prompts (arguments already checked)."""
    if rng is None:
        rng = jax.random.key(0)
    elif is_int(rng):
        rng = jax.random.key(int(rng))
    greedy = temperature == 0
    run = functools.partial(
        _sample_core, params, tokens_BxP, lengths_B, rng,
        jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p), eos, stop_QxL,
        jnp.int32(pad_id), config=config, max_new_tokens=max_new_tokens, greedy=greedy,
        top_k=0 if top_k >= config.vocab_size else top_k, use_top_p=top_p < 1.0,
        stream=stream_callback is not None, logprobs=return_scores)
    if stream_callback is None:
        tokens, lengths, logprobs, _ = jax.device_get(run())
    else:
        with _stream_lock:
            _stream_target[0] = stream_callback
            try:
                # device_get inside the lock: the callbacks run until the loop finishes.
                tokens, lengths, logprobs, _ = jax.device_get(run())
            finally:
                _stream_target[0] = None
    return GenerateOutput(tokens, lengths, logprobs if return_scores else None)


# ---------------------------------------------------------------------------- argument checks
def _check_options(config: GPTConfig, *, max_new_tokens: Any, temperature: Any, top_k: Any,
                   top_p: Any, num_beams: Any, length_penalty: Any, early_stopping: Any,
                   num_return_sequences: Any, eos_id: Any, pad_id: Any, prompt_bucket: Any,
                   stream_callback: Any) -> None:
    """`generate`'s scalar options; raises ValueError naming the first bad one."""
    V = config.vocab_size
    check_int("max_new_tokens", max_new_tokens, 1)
    if (not isinstance(temperature, (int, float)) or not temperature >= 0.0
            or math.isinf(temperature)):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0 is greedy)")
    check_int("top_k", top_k, 0)
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}: must be in (0, 1] (1 disables nucleus filtering)")
    check_int("num_beams", num_beams, 1)
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty!r}: must be a finite number")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r}: allowed values are True, False, "
                         "'never'")
    check_int("num_return_sequences", num_return_sequences, 1)
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} > num_beams={num_beams}: "
                         "beam search returns at most num_beams hypotheses per prompt")
    if num_beams > 1 and (temperature not in (0, 1) or top_k != 0 or top_p != 1.0):
        raise ValueError(f"num_beams={num_beams} with temperature={temperature}, top_k={top_k}, "
                         f"top_p={top_p}: beam search is deterministic; sampling options need "
                         "num_beams=1")
    if eos_id is not None and (not is_int(eos_id) or not 0 <= eos_id < V):
        raise ValueError(f"eos_id={eos_id!r}: must be None or a token id in [0, {V})")
    if not is_int(pad_id):
        raise ValueError(f"pad_id={pad_id!r}: must be an integer")
    check_int("prompt_bucket", prompt_bucket, 1)
    if stream_callback is not None and (num_beams > 1 or not callable(stream_callback)):
        raise ValueError(f"stream_callback={short_repr(stream_callback)} with "
                         f"num_beams={num_beams}: streaming needs a callable and num_beams=1 "
                         "(beams are final only at the end)")


def _checked_stop_sequences(config: GPTConfig, stop_sequences: Any) -> list:
    """Each stop sequence as a list of ints, each a token id of the vocabulary."""
    V = config.vocab_size
    stops = []
    for q, s in enumerate(stop_sequences):
        s = list(s) if hasattr(s, "__len__") else None
        if not s or not all(is_int(t) and 0 <= t < V for t in s):
            raise ValueError(f"stop_sequences[{q}]={short_repr(stop_sequences[q])}: must be a "
                             f"non-empty sequence of token ids in [0, {V})")
        stops.append([int(t) for t in s])
    return stops


def _checked_prompts(config: GPTConfig, prompts: Any, prompt_lengths: Any,
                     max_new_tokens: int) -> list:
    """The prompts as lists of ids, each fitting the context with max_new_tokens more."""
    V = config.vocab_size
    rows = prompt_rows(prompts, prompt_lengths)
    for b, r in enumerate(rows):
        if len(r) > config.n_ctx:
            raise ValueError(f"prompts[{b}] has {len(r)} tokens: longer than the context "
                             f"n_ctx={config.n_ctx}")
        if len(r) + max_new_tokens > config.n_ctx:
            raise ValueError(f"prompts[{b}] has {len(r)} tokens + max_new_tokens={max_new_tokens} "
                             f"= {len(r) + max_new_tokens} > n_ctx={config.n_ctx}: shorten the "
                             "prompt or generate fewer tokens")
        bad = [t for t in r if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompts[{b}] holds token id {bad[0]}: ids must be in [0, {V})")
    return rows
