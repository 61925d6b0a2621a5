"""Sampling from a GPT: prefill a KV cache from ragged prompts, then decode in one compiled loop.

Shape suffixes as in gptjax.nn.model: B batch (prompts), P padded prompt length, S cache slots,
V vocabulary, N new tokens (max_new_tokens), K beam candidates per prompt (2 x num_beams),
M beams per prompt (num_beams), Q stop sequences, L longest stop sequence.

Prompts of different lengths are LEFT-padded to a common length P (rounded up to a bucket, so
repeated calls reuse the compiled loop) with position -1 on the padding; every prompt then ends
at slot P-1 of the cache and decode step t writes slot P+t for all rows, while positions (which
the attention masks and position embeddings read) stay per row: len_b + t.

Layers:
  * `warp_logits`, `sample_logits`: temperature, then top-k, then top-p (the order of
    transformers' logits warpers), and the draw; pure functions of logits, testable without a model.
  * `prefill`, `decode_step`: the model calls that fill and extend the cache.
  * `sample_loop`, `beam_search_loop`: one `lax.while_loop` each over a `tokens_to_logits`
    function (the flax lm1b sampler's design), so they run on fake logits in tests.
  * `generate`: validates arguments, packs prompts, and calls a jitted core keyed on
    (config, batch, prompt bucket, max_new_tokens, greedy, top_k, top_p on/off, num_beams, stop
    sequence shape); the numeric knobs (temperature, top_p, eos_id, pad_id, length_penalty,
    early_stopping) are traced, so changing them does not recompile.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax
import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.nn.model import GPT, decode_layout as to_decode_layout, init_cache

Array = jax.Array

# transformers' beam search marks impossible candidates by adding -1e9 (not -inf) to their fp32
# scores; the same constant reproduces its tie-breaking and arithmetic exactly.
_BEAM_NEG = -1.0e9


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


def _stop_hit(window_XxL: Array, stop_QxL: Array) -> Array:
    """Whether the recent tokens end with any stop sequence.

    `stop_QxL` holds the sequences right-aligned with -1 on the left; -1 matches anything, and
    `window_XxL` (the last L tokens, -1 where nothing was generated yet) never holds -1 where a
    real stop token sits, so a sequence only matches generated tokens.
    """
    eq_XxQxL = (window_XxL[:, None, :] == stop_QxL[None]) | (stop_QxL[None] < 0)
    return jnp.any(jnp.all(eq_XxQxL, axis=-1), axis=-1)


def _push(window_XxL: Array, tokens_X: Array) -> Array:
    return jnp.concatenate([window_XxL[:, 1:], tokens_X[:, None]], axis=1)


# ---------------------------------------------------------------------------- model calls
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
    rows = _prompt_rows(prompts, prompt_lengths)
    lengths_B = np.array([len(r) for r in rows], np.int32)
    P = max(1, bucket) * math.ceil(int(lengths_B.max()) / max(1, bucket))
    tokens_BxP = np.full((len(rows), P), pad_id, np.int32)
    for b, r in enumerate(rows):
        tokens_BxP[b, P - len(r):] = r
    return tokens_BxP, lengths_B


def _prompt_rows(prompts: Any, prompt_lengths: Any) -> list:
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
        raise ValueError(f"prompts={_short(prompts)}: give a non-empty list of token-id lists "
                         "or a [batch, length] array")
    rows = []
    for b, p in enumerate(prompts):
        if isinstance(p, (int, np.integer)) or not hasattr(p, "__len__"):
            raise ValueError(f"prompts[{b}]={_short(p)}: each prompt must be a list of token ids")
        r = [int(t) for t in (p.tolist() if hasattr(p, "tolist") else p)]
        if not r:
            raise ValueError(f"prompts[{b}] is empty: every prompt needs at least one token")
        rows.append(r)
    return rows


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 60 else s[:57] + "..."


def prompt_positions(lengths_B: Array, P: int) -> Array:
    """Positions of left-padded prompts: -1 on the padding, 0..len-1 on the real tokens. [B, P]."""
    pad_B = P - jnp.asarray(lengths_B, jnp.int32)
    pos_BxP = jnp.arange(P, dtype=jnp.int32)[None, :] - pad_B[:, None]
    return jnp.where(pos_BxP < 0, -1, pos_BxP)


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
    params, decode_layout = _unwrap(params)
    logits, cache = GPT(config, decode_layout).apply(
        {"params": params}, jnp.asarray(tokens_BxP, jnp.int32), prompt_positions(lengths_B, P),
        cache=cache, last_logits_only=last_only)
    return (logits[:, -1] if last_only else logits), cache


def decode_step(config: GPTConfig, params: Any, tokens_B: Array, positions_B: Array,
                cache: dict) -> tuple[Array, dict]:
    """One token per row through the model: appends its key/value to the cache.

    Args:
      config, params: the model.
      tokens_B: the newest token of each row.
      positions_B: its position (the row's previous position + 1).
      cache: the cache after the previous step.

    Returns:
      (logits_BxV fp32 for the next token, new cache).
    """
    params, decode_layout = _unwrap(params)
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


# ---------------------------------------------------------------------------- decode loops
TokensToLogits = Callable[[Array, Array, Any], tuple]


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
        window_BxL = _push(window_BxL, tok_B)
        hit_B = tok_B == eos_id
        if stop_QxL is not None:
            hit_B |= _stop_hit(window_BxL, stop_QxL)
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


class BeamScoring(NamedTuple):
    """transformers' length penalty and early-stopping rule as arrays (see `beam_scoring`).

    Attributes:
      length_denoms: float32 [max_new_tokens + 1]; entry n is n ** length_penalty.
      heuristic_denoms: float32 [max_new_tokens + 1]; what the early-stop heuristic divides the
        best running score by at length n.
      stop_when_full: bool scalar, early_stopping is True.
    """

    length_denoms: Any
    heuristic_denoms: Any
    stop_when_full: Any


def beam_scoring(length_penalty: float, max_new_tokens: int,
                 early_stopping: Any = False) -> BeamScoring:
    """Tabulate the length penalty so a jitted beam search takes it as data, not as a constant.

    transformers computes `length ** length_penalty` in Python (float64) and divides an fp32
    tensor by it; the same float64 values, rounded once, keep the scores identical. Its early-stop
    heuristic scores the best running beam at max length when early_stopping='never' and the
    penalty is positive (longer can only score better), else at the current length.

    Args:
      length_penalty: the exponent (transformers' default 1.0).
      max_new_tokens: the longest hypothesis.
      early_stopping: True, False or 'never'.
    """
    n = np.arange(max_new_tokens + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):
        lengths = n ** float(length_penalty)
    heur = lengths
    if early_stopping == "never" and length_penalty > 0.0:
        heur = np.full_like(n, float(max_new_tokens) ** float(length_penalty))
    return BeamScoring(lengths.astype(np.float32), heur.astype(np.float32),
                       np.bool_(early_stopping is True))


def beam_search_loop(tokens_to_logits: TokensToLogits, reorder_state: Callable[[Any, Array], Any],
                     logits_NxV: Array, state: Any, *, num_beams: int, max_new_tokens: int,
                     eos_id: Any = -1, stop_QxL: Optional[Array] = None, pad_id: Any = 0,
                     scoring: Optional[BeamScoring] = None) -> tuple[Array, Array, Array]:
    """Beam search as one `lax.while_loop`, step for step transformers v5's `_beam_search`.

    Per prompt it keeps M running beams and M finished hypotheses. Each step takes the top
    K = 2M continuations of all running beams by summed log-probability; those that end (EOS, a stop
    sequence, or the last step) and rank among the first M may enter the finished set with score
    sum_logprob / length ** length_penalty; the best M that did not end continue. A prompt is done
    when its best running beam, scored at its current length (or at max length when
    early_stopping='never' and length_penalty > 0), cannot beat its worst finished hypothesis; with
    early_stopping=True, as soon as it has M finished hypotheses.

    Args:
      tokens_to_logits: (tokens_N, step, state) -> (logits_NxV, state), N = batch x num_beams rows,
        row b*M + j is beam j of prompt b.
      reorder_state: (state, rows_N) -> state with rows gathered (beam reordering).
      logits_NxV: logits of the first new token, rows already repeated per beam.
      state: the state after the prompt, rows already repeated per beam.
      num_beams: M (static).
      max_new_tokens: static number of steps.
      eos_id: end-of-sequence id or -1 (traced).
      stop_QxL: stop sequences (see `stop_array`) or None.
      pad_id: filler after a hypothesis ends.
      scoring: length penalty and early-stopping rule from `beam_scoring` (arrays, may be traced);
        None means transformers' defaults (length_penalty=1.0, early_stopping=False).

    Returns:
      (tokens_BxMxT int32 finished hypotheses best first, lengths_BxM int32, scores_BxM float32).
    """
    NM, V = logits_NxV.shape
    M = num_beams
    B = NM // M
    T = max_new_tokens
    K = 2 * M  # transformers keeps max(2, 1 + n_eos) * num_beams candidates; one EOS id here
    L = 1 if stop_QxL is None else stop_QxL.shape[1]
    pad_id = jnp.asarray(pad_id, jnp.int32)
    if scoring is None:
        scoring = beam_scoring(1.0, T, False)
    length_denoms_N1 = jnp.asarray(scoring.length_denoms, jnp.float32)
    heuristic_denoms_N1 = jnp.asarray(scoring.heuristic_denoms, jnp.float32)
    early_true = jnp.asarray(scoring.stop_when_full, bool)
    top_m_K = jnp.arange(K) < M

    def take(x_BxMx, i_BxJ):
        # Gather along the beam axis (1), broadcasting the index over trailing axes.
        return jnp.take_along_axis(x_BxMx, i_BxJ.reshape(i_BxJ.shape + (1,) * (x_BxMx.ndim - 2)),
                                   axis=1)

    def cond(carry):
        return (carry[0] < T) & carry[-1]

    def body(carry):
        (t, logits_NxV, state, run_tok_BxMxT, run_score_BxM, run_win_BxMxL, fin_tok_BxMxT,
         fin_score_BxM, fin_len_BxM, fin_done_BxM, open_B, _) = carry
        logp_BxMxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32)).reshape(B, M, V)
        acc_BxMV = (logp_BxMxV + run_score_BxM[:, :, None]).reshape(B, M * V)
        cand_score_BxK, cand_idx_BxK = jax.lax.top_k(acc_BxMV, K)
        src_BxK = cand_idx_BxK // V
        tok_BxK = (cand_idx_BxK % V).astype(jnp.int32)
        cand_tok_BxKxT = jax.lax.dynamic_update_slice(
            take(run_tok_BxMxT, src_BxK), tok_BxK[:, :, None], (0, 0, t))
        cand_win_BxKxL = _push(take(run_win_BxMxL, src_BxK).reshape(B * K, L),
                               tok_BxK.reshape(B * K)).reshape(B, K, L)
        ends_BxK = (tok_BxK == eos_id) | (t + 1 >= T)
        if stop_QxL is not None:
            ends_BxK |= _stop_hit(cand_win_BxKxL.reshape(B * K, L), stop_QxL).reshape(B, K)

        # Running beams: the best M candidates that did not end.
        masked_BxK = cand_score_BxK + ends_BxK.astype(jnp.float32) * _BEAM_NEG
        next_BxM = jax.lax.top_k(masked_BxK, M)[1]
        run_tok_BxMxT = take(cand_tok_BxKxT, next_BxM)
        run_score_BxM = take(masked_BxK, next_BxM)
        run_win_BxMxL = take(cand_win_BxKxL, next_BxM)
        run_src_BxM = take(src_BxK, next_BxM)

        # Finished hypotheses: ended candidates among the top M, length-penalised, merged with the
        # previous ones; a prompt that is done or full (early_stopping=True) takes no more.
        just_BxK = ends_BxK & top_m_K[None]
        fin_cand_BxK = cand_score_BxK / length_denoms_N1[t + 1]
        full_B = jnp.all(fin_done_BxM, axis=-1) & early_true
        fin_cand_BxK += full_B[:, None].astype(jnp.float32) * _BEAM_NEG
        fin_cand_BxK += (~open_B)[:, None].astype(jnp.float32) * _BEAM_NEG
        fin_cand_BxK += (~just_BxK).astype(jnp.float32) * _BEAM_NEG
        merged_score = jnp.concatenate([fin_score_BxM, fin_cand_BxK], axis=1)
        best_BxM = jax.lax.top_k(merged_score, M)[1]
        fin_score_BxM = take(merged_score, best_BxM)
        fin_tok_BxMxT = take(jnp.concatenate([fin_tok_BxMxT, cand_tok_BxKxT], axis=1), best_BxM)
        fin_len_BxM = take(jnp.concatenate(
            [fin_len_BxM, jnp.broadcast_to(t + 1, (B, K)).astype(jnp.int32)], axis=1), best_BxM)
        fin_done_BxM = take(jnp.concatenate([fin_done_BxM, just_BxK], axis=1), best_BxM)

        # transformers' early-stop heuristic, checked at the new length t + 1 (sticky per prompt).
        best_run_B = run_score_BxM[:, 0] / heuristic_denoms_N1[t + 1]
        worst_fin_BxM = jnp.where(fin_done_BxM, jnp.min(fin_score_BxM, axis=-1, keepdims=True),
                                  _BEAM_NEG)
        open_B = open_B & jnp.any(best_run_B[:, None] > worst_fin_BxM, axis=-1)
        go = (jnp.any(open_B) & ~(jnp.all(fin_done_BxM) & early_true) & ~jnp.all(ends_BxK))

        rows_N = (jnp.arange(B)[:, None] * M + run_src_BxM).reshape(B * M)
        state = reorder_state(state, rows_N)
        logits_NxV, state = tokens_to_logits(
            jax.lax.dynamic_index_in_dim(run_tok_BxMxT, t, axis=2, keepdims=False).reshape(B * M),
            t, state)
        return (t + 1, logits_NxV.astype(jnp.float32), state, run_tok_BxMxT, run_score_BxM,
                run_win_BxMxL, fin_tok_BxMxT, fin_score_BxM, fin_len_BxM, fin_done_BxM, open_B, go)

    # All beams start as copies of the prompt; only beam 0 may expand at the first step.
    run_score_BxM = jnp.where(jnp.arange(M)[None] == 0, 0.0, _BEAM_NEG) * jnp.ones((B, 1))
    carry = (jnp.zeros((), jnp.int32), logits_NxV.astype(jnp.float32), state,
             jnp.full((B, M, T), pad_id, jnp.int32), run_score_BxM.astype(jnp.float32),
             jnp.full((B, M, L), -1, jnp.int32), jnp.full((B, M, T), pad_id, jnp.int32),
             jnp.full((B, M), _BEAM_NEG, jnp.float32), jnp.zeros((B, M), jnp.int32),
             jnp.zeros((B, M), bool), jnp.ones((B,), bool), jnp.array(True))
    carry = jax.lax.while_loop(cond, body, carry)
    return carry[6], carry[8], carry[7]


def stop_array(stop_sequences: Sequence[Sequence[int]]) -> Optional[np.ndarray]:
    """Stop sequences as int32 [Q, L], right-aligned with -1 on the left; None if there are none."""
    if not stop_sequences:
        return None
    L = max(len(s) for s in stop_sequences)
    out = np.full((len(stop_sequences), L), -1, np.int32)
    for q, s in enumerate(stop_sequences):
        out[q, L - len(s):] = s
    return out


# ---------------------------------------------------------------------------- jitted cores
def _model_step_fn(config: GPTConfig, params: Any, lengths_N: Array) -> TokensToLogits:
    def tokens_to_logits(tokens_N, t, cache):
        return decode_step(config, params, tokens_N, lengths_N + t, cache)
    return tokens_to_logits


@flax.struct.dataclass
class DecodeParams:
    """Parameters prepared by `prepare_for_decoding`; every function here that takes params
    takes these too. `params` holds the c_proj kernels in `gptjax.nn.model.decode_layout` when
    `out_in` is set."""

    params: Any
    out_in: bool = flax.struct.field(pytree_node=False, default=False)


def _on_cpu(params: Any) -> bool:
    leaf = jax.tree_util.tree_leaves(params)[0]
    devices = leaf.devices() if isinstance(leaf, jax.Array) else jax.local_devices()[:1]
    return all(d.platform == "cpu" for d in devices)


def prepare_for_decoding(config: GPTConfig, params: Any, *,
                         out_in: Optional[bool] = None) -> DecodeParams:
    """Prepare parameters once for many `generate` calls (sample.py and the server do).

    On CPU (`out_in=None` decides by where params live) the c_proj kernels are copied to the
    [out, in] layout of `gptjax.nn.model.decode_layout`, which XLA:CPU streams faster in a decode
    step: GPT-2 small's batch-1 step went from 24.5 to 22.4 ms (1.07-1.13x tokens/s in
    bench/decode.py). The copy costs memory (about a quarter of the weights, kept while the
    result lives) and a one-off transpose, which is why `generate` does not do it by itself on
    every call. On GPU and TPU params are returned unchanged: the layout is a CPU finding and
    has not been measured there. Outputs are the same numbers as with the plain params (to fp32 rounding).
    """
    if isinstance(params, DecodeParams):
        return params
    if out_in is None:
        out_in = _on_cpu(params)
    return DecodeParams(to_decode_layout(config, params) if out_in else params, bool(out_in))


def _unwrap(params: Any) -> tuple[Any, bool]:
    if isinstance(params, DecodeParams):
        return params.params, params.out_in
    return params, False


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
    V = config.vocab_size
    _check_int("max_new_tokens", max_new_tokens, 1)
    if (not isinstance(temperature, (int, float)) or not temperature >= 0.0
            or math.isinf(temperature)):
        raise ValueError(f"temperature={temperature!r}: must be a finite number >= 0 (0 is greedy)")
    _check_int("top_k", top_k, 0)
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p!r}: must be in (0, 1] (1 disables nucleus filtering)")
    _check_int("num_beams", num_beams, 1)
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty!r}: must be a finite number")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping={early_stopping!r}: allowed values are True, False, "
                         "'never'")
    _check_int("num_return_sequences", num_return_sequences, 1)
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences={num_return_sequences} > num_beams={num_beams}: "
                         "beam search returns at most num_beams hypotheses per prompt")
    if num_beams > 1 and (temperature not in (0, 1) or top_k != 0 or top_p != 1.0):
        raise ValueError(f"num_beams={num_beams} with temperature={temperature}, top_k={top_k}, "
                         f"top_p={top_p}: beam search is deterministic; sampling options need "
                         "num_beams=1")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < V):
        raise ValueError(f"eos_id={eos_id!r}: must be None or a token id in [0, {V})")
    if not _is_int(pad_id):
        raise ValueError(f"pad_id={pad_id!r}: must be an integer")
    _check_int("prompt_bucket", prompt_bucket, 1)
    if stream_callback is not None and (num_beams > 1 or not callable(stream_callback)):
        raise ValueError(f"stream_callback={_short(stream_callback)} with num_beams={num_beams}: "
                         "streaming needs a callable and num_beams=1 (beams are final only at "
                         "the end)")
    stops = []
    for q, s in enumerate(stop_sequences):
        s = list(s) if hasattr(s, "__len__") else None
        if not s or not all(_is_int(t) and 0 <= t < V for t in s):
            raise ValueError(f"stop_sequences[{q}]={_short(stop_sequences[q])}: must be a "
                             f"non-empty sequence of token ids in [0, {V})")
        stops.append([int(t) for t in s])

    rows = _prompt_rows(prompts, prompt_lengths)
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
    tokens_BxP, lengths_B = pad_prompts(rows, pad_id=0, bucket=prompt_bucket)
    stop_QxL = stop_array(stops)
    eos = jnp.int32(-1 if eos_id is None else eos_id)

    if num_beams == 1:
        if rng is None:
            rng = jax.random.key(0)
        elif _is_int(rng):
            rng = jax.random.key(int(rng))
        greedy = temperature == 0
        run = functools.partial(
            _sample_core, params, tokens_BxP, lengths_B, rng,
            jnp.float32(temperature if not greedy else 1.0), jnp.float32(top_p), eos, stop_QxL,
            jnp.int32(pad_id), config=config, max_new_tokens=max_new_tokens, greedy=greedy,
            top_k=0 if top_k >= V else top_k, use_top_p=top_p < 1.0,
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

    tokens, lengths, scores = _beam_core(
        params, tokens_BxP, lengths_B, eos, stop_QxL, jnp.int32(pad_id),
        beam_scoring(length_penalty, max_new_tokens, early_stopping), config=config,
        max_new_tokens=max_new_tokens, num_beams=num_beams)
    tokens, lengths, scores = jax.device_get((tokens, lengths, scores))
    R = num_return_sequences
    tokens = tokens[:, :R].reshape(-1, max_new_tokens)
    return GenerateOutput(tokens, lengths[:, :R].reshape(-1),
                          scores[:, :R].reshape(-1) if return_scores else None)


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name}={value!r}: must be an integer >= {minimum}")
