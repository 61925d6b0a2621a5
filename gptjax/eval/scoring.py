"""Log-likelihood of text under a language model: per continuation, or over weighted targets.

    logp, count = score_continuations(config, params, [(context_ids, continuation_ids), ...])

Perplexity (gptjax.eval.perplexity), few-shot likelihood tasks (gptjax.eval.fewshot), GPT-1's
zero-shot heuristics (gptjax.eval.zero_shot) and the lm-eval backend (gptjax.eval.lm_harness)
all reduce to the one token scorer, `score_targets` (`weighted_nll` is it with next-token targets).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.nn.model import GPT
from gptjax.nn.losses import token_nll


def token_scores(model_cfg: GPTConfig, params, tokens_BxT, targets_BxT, weights_BxT):
    """The token scorer (`score_targets` is it jitted; gptjax.eval.mesh_scoring jits it on a
    mesh): per row, the weighted NLL of the targets (position t predicts
    targets_BxT[:, t]), the summed weights, and whether every weighted target is the argmax.

    Args:
      model_cfg, params: the decoder.
      tokens_BxT: int token ids the model reads.
      targets_BxT: int token ids predicted at each position.
      weights_BxT: float weights of the predictions at each position (0: not scored).

    Returns:
      (sum of weighted NLL in nats, sum of weights, all weighted targets greedy), each [B].
    """
    logits_BxTxV = GPT(model_cfg).apply({"params": params}, tokens_BxT).astype(jnp.float32)
    nll_BxT = token_nll(logits_BxTxV, targets_BxT)
    greedy_BxT = (jnp.argmax(logits_BxTxV, -1) == targets_BxT) | (weights_BxT == 0)
    return jnp.sum(nll_BxT * weights_BxT, -1), jnp.sum(weights_BxT, -1), jnp.all(greedy_BxT, -1)


score_targets = jax.jit(token_scores, static_argnums=0)


def weighted_nll(model_cfg: GPTConfig, params, tokens_BxT, weights_BxT):
    """Summed next-token NLL of each row, position t weighted by weights_BxT[:, t].

    Position t predicts token t + 1 (the last position's target is a dummy 0: give it weight 0).

    Returns:
      (sum of weighted NLL in nats, sum of weights), each [B].
    """
    tokens_BxT = np.asarray(tokens_BxT)
    targets_BxT = np.concatenate([tokens_BxT[:, 1:], np.zeros_like(tokens_BxT[:, :1])], 1)
    nll, n, _ = score_targets(model_cfg, params, tokens_BxT, targets_BxT, weights_BxT)
    return nll, n


def round_up(x: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= x (padded lengths: fewer compilations)."""
    return int(math.ceil(x / multiple) * multiple)


def score_continuations(model_cfg: GPTConfig, params, pairs: Sequence[tuple],
                        batch_size: int = 32, bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood of each continuation given its context, under the language model alone.

    Contexts too long for n_ctx lose their beginning. Pairs are batched longest-first and
    right-padded (padding is causal-invisible), so batching never changes a score.

    Args:
      model_cfg, params: the decoder.
      pairs: (context ids, continuation ids); both non-empty (the first token has no prediction).
      batch_size: sequences per forward pass.
      bucket: padded lengths are multiples of this (fewer compilations).

    Returns:
      (sum of log-probabilities, number of continuation tokens), each [len(pairs)].

    Raises:
      ValueError: a pair with an empty context or continuation.
    """
    seqs, starts = [], []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair {i}: context and continuation must be non-empty token lists")
        cont = list(cont)[: model_cfg.n_ctx - 1]
        ctx = list(ctx)[-(model_cfg.n_ctx - len(cont)):]
        seqs.append(ctx + cont)
        starts.append(len(ctx))
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    logp, count = np.zeros(len(seqs)), np.zeros(len(seqs))
    for b in range(0, len(seqs), batch_size):
        rows = order[b:b + batch_size]
        T = min(round_up(max(len(seqs[r]) for r in rows), bucket), model_cfg.n_ctx)
        tokens = np.zeros((batch_size, T), np.int32)
        weights = np.zeros((batch_size, T), np.float32)
        for j, r in enumerate(rows):
            s = seqs[r]
            tokens[j, :len(s)] = s
            # Position t predicts token t+1: the continuation occupies [start, len).
            weights[j, starts[r] - 1: len(s) - 1] = 1.0
        nll, n = weighted_nll(model_cfg, params, tokens, weights)
        logp[rows], count[rows] = -np.asarray(nll)[: len(rows)], np.asarray(n)[: len(rows)]
    return logp, count

