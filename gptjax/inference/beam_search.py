"""Beam search over one KV cache, step for step transformers v5's `_beam_search`.

Shape suffixes: B prompts, M beams per prompt (num_beams), K = 2M candidates per prompt and step,
N = B x M rows, V vocabulary, T max_new_tokens, L longest stop sequence.

`beam_search_loop` is one `lax.while_loop` over a `tokens_to_logits` function (the flax lm1b
sampler's design), so it runs on fake logits in tests; each step is four named pieces: expand
the running beams into candidates, keep the best that did not end running, merge the ones that
ended into the finished hypotheses, and apply transformers' early-stop rule.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.inference.decoding import TokensToLogits, push_window, stop_hit

Array = jax.Array

# transformers' beam search marks impossible candidates by adding -1e9 (not -inf) to their fp32
# scores; the same constant reproduces its tie-breaking and arithmetic exactly.
_BEAM_NEG = -1.0e9


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




class _Running(NamedTuple):
    """The M running beams of each prompt: tokens so far, summed log-probability, recent tokens."""
    tok_BxMxT: Array
    score_BxM: Array
    win_BxMxL: Array


class _Finished(NamedTuple):
    """The M best finished hypotheses of each prompt (done: the slot holds one)."""
    tok_BxMxT: Array
    score_BxM: Array
    len_BxM: Array
    done_BxM: Array


class _Candidates(NamedTuple):
    """The top K continuations of a step: scores, source beam, tokens, windows, whether they end."""
    score_BxK: Array
    src_BxK: Array
    tok_BxKxT: Array
    win_BxKxL: Array
    ends_BxK: Array


def _take(x_BxMx: Array, i_BxJ: Array) -> Array:
    """Gather along the beam axis (1), broadcasting the index over trailing axes."""
    return jnp.take_along_axis(x_BxMx, i_BxJ.reshape(i_BxJ.shape + (1,) * (x_BxMx.ndim - 2)),
                               axis=1)


def _initial_beams(B: int, M: int, T: int, L: int, pad_id: Array) -> tuple:
    """All beams start as copies of the prompt; only beam 0 may expand at the first step."""
    run_score_BxM = jnp.where(jnp.arange(M)[None] == 0, 0.0, _BEAM_NEG) * jnp.ones((B, 1))
    run = _Running(jnp.full((B, M, T), pad_id, jnp.int32), run_score_BxM.astype(jnp.float32),
                   jnp.full((B, M, L), -1, jnp.int32))
    fin = _Finished(jnp.full((B, M, T), pad_id, jnp.int32),
                    jnp.full((B, M), _BEAM_NEG, jnp.float32), jnp.zeros((B, M), jnp.int32),
                    jnp.zeros((B, M), bool))
    return run, fin


def _candidates(logits_NxV: Array, run: _Running, t: Array, *, K: int, T: int, eos_id: Any,
                stop_QxL: Optional[Array]) -> _Candidates:
    """The top K continuations of all running beams by summed log-probability, and which end
    (EOS, a stop sequence, or the last step)."""
    B, M, L = run.win_BxMxL.shape
    V = logits_NxV.shape[-1]
    logp_BxMxV = jax.nn.log_softmax(logits_NxV.astype(jnp.float32)).reshape(B, M, V)
    acc_BxMV = (logp_BxMxV + run.score_BxM[:, :, None]).reshape(B, M * V)
    score_BxK, idx_BxK = jax.lax.top_k(acc_BxMV, K)
    src_BxK = idx_BxK // V
    tok_BxK = (idx_BxK % V).astype(jnp.int32)
    tok_BxKxT = jax.lax.dynamic_update_slice(
        _take(run.tok_BxMxT, src_BxK), tok_BxK[:, :, None], (0, 0, t))
    win_BxKxL = push_window(_take(run.win_BxMxL, src_BxK).reshape(B * K, L),
                            tok_BxK.reshape(B * K)).reshape(B, K, L)
    ends_BxK = (tok_BxK == eos_id) | (t + 1 >= T)
    if stop_QxL is not None:
        ends_BxK |= stop_hit(win_BxKxL.reshape(B * K, L), stop_QxL).reshape(B, K)
    return _Candidates(score_BxK, src_BxK, tok_BxKxT, win_BxKxL, ends_BxK)


def _keep_running(cand: _Candidates, M: int) -> tuple[_Running, Array]:
    """The best M candidates that did not end, and the beam each came from."""
    masked_BxK = cand.score_BxK + cand.ends_BxK.astype(jnp.float32) * _BEAM_NEG
    next_BxM = jax.lax.top_k(masked_BxK, M)[1]
    run = _Running(_take(cand.tok_BxKxT, next_BxM), _take(masked_BxK, next_BxM),
                   _take(cand.win_BxKxL, next_BxM))
    return run, _take(cand.src_BxK, next_BxM)


def _merge_finished(fin: _Finished, cand: _Candidates, open_B: Array, t: Array, *,
                    length_denom: Array, early_true: Array) -> _Finished:
    """Ended candidates among the top M, length-penalised, merged with the previous finished
    hypotheses; a prompt that is done or full (early_stopping=True) takes no more."""
    B, K = cand.ends_BxK.shape
    M = fin.score_BxM.shape[1]
    just_BxK = cand.ends_BxK & (jnp.arange(K) < M)[None]
    fin_cand_BxK = cand.score_BxK / length_denom
    full_B = jnp.all(fin.done_BxM, axis=-1) & early_true
    fin_cand_BxK += full_B[:, None].astype(jnp.float32) * _BEAM_NEG
    fin_cand_BxK += (~open_B)[:, None].astype(jnp.float32) * _BEAM_NEG
    fin_cand_BxK += (~just_BxK).astype(jnp.float32) * _BEAM_NEG
    merged_score = jnp.concatenate([fin.score_BxM, fin_cand_BxK], axis=1)
    best_BxM = jax.lax.top_k(merged_score, M)[1]
    return _Finished(
        _take(jnp.concatenate([fin.tok_BxMxT, cand.tok_BxKxT], axis=1), best_BxM),
        _take(merged_score, best_BxM),
        _take(jnp.concatenate([fin.len_BxM, jnp.broadcast_to(t + 1, (B, K)).astype(jnp.int32)],
                              axis=1), best_BxM),
        _take(jnp.concatenate([fin.done_BxM, just_BxK], axis=1), best_BxM))


def _still_open(open_B: Array, run: _Running, fin: _Finished, heuristic_denom: Array) -> Array:
    """transformers' early-stop heuristic at the new length (sticky per prompt): a prompt stays
    open while its best running beam can still beat its worst finished hypothesis."""
    best_run_B = run.score_BxM[:, 0] / heuristic_denom
    worst_fin_BxM = jnp.where(fin.done_BxM, jnp.min(fin.score_BxM, axis=-1, keepdims=True),
                              _BEAM_NEG)
    return open_B & jnp.any(best_run_B[:, None] > worst_fin_BxM, axis=-1)


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
    M, T = num_beams, max_new_tokens
    B = logits_NxV.shape[0] // M
    K = 2 * M  # transformers keeps max(2, 1 + n_eos) * num_beams candidates; one EOS id here
    L = 1 if stop_QxL is None else stop_QxL.shape[1]
    if scoring is None:
        scoring = beam_scoring(1.0, T, False)
    length_denoms_N1 = jnp.asarray(scoring.length_denoms, jnp.float32)
    heuristic_denoms_N1 = jnp.asarray(scoring.heuristic_denoms, jnp.float32)
    early_true = jnp.asarray(scoring.stop_when_full, bool)

    def cond(carry):
        return (carry[0] < T) & carry[-1]

    def body(carry):
        t, logits_NxV, state, run, fin, open_B, _ = carry
        cand = _candidates(logits_NxV, run, t, K=K, T=T, eos_id=eos_id, stop_QxL=stop_QxL)
        run, src_BxM = _keep_running(cand, M)
        fin = _merge_finished(fin, cand, open_B, t, length_denom=length_denoms_N1[t + 1],
                              early_true=early_true)
        open_B = _still_open(open_B, run, fin, heuristic_denoms_N1[t + 1])
        go = (jnp.any(open_B) & ~(jnp.all(fin.done_BxM) & early_true)
              & ~jnp.all(cand.ends_BxK))
        rows_N = (jnp.arange(B)[:, None] * M + src_BxM).reshape(B * M)
        state = reorder_state(state, rows_N)
        logits_NxV, state = tokens_to_logits(
            jax.lax.dynamic_index_in_dim(run.tok_BxMxT, t, axis=2, keepdims=False).reshape(B * M),
            t, state)
        return t + 1, logits_NxV.astype(jnp.float32), state, run, fin, open_B, go

    run, fin = _initial_beams(B, M, T, L, jnp.asarray(pad_id, jnp.int32))
    carry = (jnp.zeros((), jnp.int32), logits_NxV.astype(jnp.float32), state, run, fin,
             jnp.ones((B,), bool), jnp.array(True))
    fin = jax.lax.while_loop(cond, body, carry)[4]
    return fin.tok_BxMxT, fin.len_BxM, fin.score_BxM
