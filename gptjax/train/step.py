"""The pure train and eval steps and the state they carry; imports only jax, flax and optax.

Kept apart from gptjax.train.loop (which reads ml_collections configs and datasets) so that the step
the trainer runs can be built and benchmarked on a machine with just the numerical stack.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import optax

from gptjax.config import GPTConfig
from gptjax.nn.adapter import COLLECTION
from gptjax.nn.losses import lm_loss
from gptjax.nn.model import GPT, LAYER_STATS
from gptjax.train.layer_stats import sown_mean_squares, step_stats


# Batch arrays of document-masked packing (gptjax.data.documents) -> GPT call arguments.
_DOCUMENT_ARGS = {"segment_ids": "segment_ids_BxT", "positions": "positions_BxT"}


def document_args(batch: dict) -> dict:
    """The batch's document arrays (segment ids, restarted positions) as GPT keyword arguments;
    {} without them, so the step's program is then the one without document masks."""
    return {arg: batch[k] for k, arg in _DOCUMENT_ARGS.items() if k in batch}


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (the data position is the step)."""

    step: jax.Array
    params: Any
    opt_state: Any



def make_train_step(model_cfg: GPTConfig, optimizer: optax.GradientTransformation,
                    schedule: Callable, *, accum_steps: int = 1,
                    nonfinite: str = "skip", spike_guard: bool = False,
                    layer_stats: bool = False) -> Callable:
    """A pure train step: `train_step(state, batch, rng) -> (state, metrics)`.

    Args:
      model_cfg: the architecture.
      optimizer: the optax transformation (clipping + AdamW).
      schedule: the learning-rate schedule, for logging.
      accum_steps: microbatches per update; the batch's leading axis is split into this many and
        gradients are averaged with a `lax.scan` (one update, constant memory in accum_steps).
      nonfinite: 'skip' (a step with a non-finite loss, gradient or update leaves params and
        optimizer state unchanged and reports skipped=1) or 'halt' (the update is applied as is
        and reported the same way; the host loop stops on it).
      spike_guard: the step is `train_step(state, batch, rng, spike_limit)`: a finite loss
        above the float32 `spike_limit` keeps params and optimizer state too (whatever
        `nonfinite` says) and reports spike=1 (gptjax.train.spikes computes the limit). Off, the
        step and its program are as without the guard.
      layer_stats: the metrics also hold `layers`, `{name: [n_layer]}` for each name of
        gptjax.train.layer_stats.STATS (per-layer parameter, gradient and update norms, their
        ratio, the RMS of each block's output); a program of its own, which the trainer runs every
        `train.layer_stats_every` steps. Off, the step and its program are as without it.

    The dropout key is `fold_in(rng, step)`, so a resumed run draws the same masks.
    """
    model = GPT(model_cfg)
    use_dropout = max(model_cfg.embd_pdrop, model_cfg.attn_pdrop, model_cfg.resid_pdrop) > 0

    def loss_fn(params, inputs, targets, weights, rng, docs):
        logits = model.apply({"params": params}, inputs, deterministic=not use_dropout,
                             rngs={"dropout": rng} if use_dropout else None, **docs)
        return lm_loss(logits, targets, weights)

    def stats_loss_fn(params, inputs, targets, weights, rng, docs):
        # The blocks sow their outputs' mean squares only into a mutable LAYER_STATS.
        logits, sown = model.apply({"params": params}, inputs, deterministic=not use_dropout,
                                   rngs={"dropout": rng} if use_dropout else None,
                                   mutable=[LAYER_STATS], **docs)
        return (lm_loss(logits, targets, weights),
                sown_mean_squares(model_cfg, sown[LAYER_STATS]))

    stats = functools.partial(step_stats, model_cfg) if layer_stats else None
    update = _make_update(optimizer, schedule, accum_steps, nonfinite, stats)
    grad_fn = (jax.value_and_grad(stats_loss_fn, has_aux=True) if layer_stats
               else jax.value_and_grad(loss_fn))

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        return update(grad_fn, state, batch, rng)

    def guarded_train_step(state: TrainState, batch: dict, rng: jax.Array,
                           spike_limit: jax.Array):
        return update(grad_fn, state, batch, rng, spike_limit)

    return guarded_train_step if spike_guard else train_step


def make_lora_train_step(model_cfg: GPTConfig, optimizer: optax.GradientTransformation,
                         schedule: Callable, *, lora_dropout: float = 0.0, accum_steps: int = 1,
                         nonfinite: str = "skip", spike_guard: bool = False) -> Callable:
    """The LoRA train step: `train_step(state, base, batch, rng) -> (state, metrics)`.

    `state.params` (and the optimizer state) are the adapters only (gptjax.nn.lora); the frozen
    `base` parameters are an argument (fp32 or weight-only bf16/int8), never differentiated or
    updated. Otherwise as `make_train_step` (accumulation, the non-finite policy, the spike guard's
    trailing `spike_limit`, the dropout key `fold_in(rng, step)`, which also drives the adapters'
    dropout when `lora_dropout` > 0).
    """
    model = GPT(model_cfg)
    use_dropout = max(model_cfg.embd_pdrop, model_cfg.attn_pdrop, model_cfg.resid_pdrop,
                      lora_dropout) > 0
    update = _make_update(optimizer, schedule, accum_steps, nonfinite)

    def step(state, base, batch, rng, spike_limit=None):
        def loss_fn(adapters, inputs, targets, weights, rng, docs):
            logits = model.apply({"params": base, COLLECTION: adapters}, inputs,
                                 deterministic=not use_dropout,
                                 rngs={"dropout": rng} if use_dropout else None, **docs)
            return lm_loss(logits, targets, weights)
        return update(jax.value_and_grad(loss_fn), state, batch, rng, spike_limit)

    def train_step(state: TrainState, base: Any, batch: dict, rng: jax.Array):
        return step(state, base, batch, rng)

    def guarded_train_step(state: TrainState, base: Any, batch: dict, rng: jax.Array,
                           spike_limit: jax.Array):
        return step(state, base, batch, rng, spike_limit)

    return guarded_train_step if spike_guard else train_step


def _make_update(optimizer: optax.GradientTransformation, schedule: Callable, accum_steps: int,
                 nonfinite: str, stats: Optional[Callable] = None) -> Callable:
    """`update(grad_fn, state, batch, rng) -> (state, metrics)`: the gradients of `grad_fn`
    (value_and_grad of a loss of (params, inputs, targets, weights, rng, document_args)) over
    the batch, one
    optimizer update, the non-finite policy and, given `spike_limit`, the spike guard (see
    `make_train_step`). With `stats`, `grad_fn` has an aux output (the blocks' output mean
    squares, averaged over microbatches like the loss) and metrics['layers'] is
    `stats(params, grads, updates, aux)`."""

    def update(grad_fn: Callable, state: TrainState, batch: dict, rng: jax.Array,
               spike_limit: Optional[jax.Array] = None):
        rng = jax.random.fold_in(rng, state.step)
        if accum_steps == 1:
            loss, grads = grad_fn(state.params, batch["inputs"], batch["targets"],
                                  batch.get("weights"), rng, document_args(batch))
        else:
            loss, grads = _accumulated(grad_fn, state.params, batch, rng, accum_steps,
                                       stats is not None)
        if stats is not None:
            loss, mean_squares = loss
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        # A finite gradient can still give a non-finite update (an optimizer state holding NaNs
        # or huge values): one reduction over the update catches it before it reaches the
        # parameters. (Its square overflows above ~1e19 in fp32: such an update is garbage too.)
        update_norm = optax.global_norm(updates).astype(jnp.float32)
        ok = finite & jnp.isfinite(update_norm)
        params = optax.apply_updates(state.params, updates)
        keep_new = ok if nonfinite == "skip" else None
        if spike_limit is not None:  # a finite step whose loss is above the limit: a spike
            spike = ok & (loss > spike_limit)
            keep_new = ~spike if keep_new is None else keep_new & ~spike
        if keep_new is not None:
            # A select per element, not lax.cond: XLA fuses it into the update, which then writes
            # the donated parameter and optimizer buffers in place. A lax.cond's branches return
            # fresh buffers, so the updates, the new parameters and both Adam moments were held
            # at once next to the gradients: 5 fp32 copies of the parameters in temporaries
            # (GPT-2 XL, 8 x 1024, bf16, H100: 29.0 GiB of temporaries with remat=full, 10.1
            # GiB with this select; BENCHMARKS.md "Remat and the update's temporaries").
            def keep(new, old):
                return jnp.where(keep_new, new, old)
            params = jax.tree.map(keep, params, state.params)
            opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "update_norm": update_norm, "skipped": (~ok).astype(jnp.int32)}
        if spike_limit is not None:
            metrics["spike"] = spike.astype(jnp.int32)
        if stats is not None:
            metrics["layers"] = stats(state.params, grads, updates, mean_squares)
        return new_state, metrics

    return update


def _accumulated(grad_fn: Callable, params: Any, batch: dict, rng: jax.Array,
                 accum_steps: int, with_aux: bool = False) -> tuple:
    """(loss, grads) over `accum_steps` microbatches with a `lax.scan`: their mean, or, when the
    batch has `weights` (prompt/completion data), each microbatch's weighted mean counted by its
    share of the batch's weight, so the loss is the whole batch's weighted mean (as without
    accumulation) however unevenly the completion tokens fall into microbatches. `with_aux`:
    `grad_fn` gives ((loss, aux), grads), and the loss slot is (loss, aux), aux averaged alike."""
    def split(x):
        return None if x is None else x.reshape((accum_steps, -1) + x.shape[1:])

    weights = batch.get("weights")
    micro = (split(batch["inputs"]), split(batch["targets"]), split(weights),
             jax.random.split(rng, accum_steps),
             {k: split(v) for k, v in document_args(batch).items()})
    if weights is not None:
        total = jnp.maximum(jnp.sum(weights.astype(jnp.float32)), 1e-8)

    def body(acc, mb):
        inputs, targets, w, r, docs = mb
        l, g = grad_fn(params, inputs, targets, w, r, docs)
        if w is not None:  # the microbatch's share, times accum_steps (divided out below)
            share = jnp.sum(w.astype(jnp.float32)) / total * accum_steps
            if with_aux:  # the loss and gradients only: aux (activation statistics) is uniform
                (l, aux) = l
                l, g = jax.tree_util.tree_map(lambda x: x * share, (l, g))
                l = (l, aux)
            else:
                l, g = jax.tree_util.tree_map(lambda x: x * share, (l, g))
        return jax.tree_util.tree_map(jnp.add, acc, (l, g)), None

    zero_loss = jnp.zeros((), jnp.float32)
    if with_aux:  # zeros shaped as a microbatch's (loss, aux); traced, never run
        (_, aux0), _ = jax.eval_shape(grad_fn, params, *jax.tree.map(lambda x: x[0], micro))
        zero_loss = (zero_loss, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0))
    zero = (zero_loss,
            jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
    (loss, grads), _ = jax.lax.scan(body, zero, micro)
    loss, grads = jax.tree_util.tree_map(lambda x: x / accum_steps, (loss, grads))
    return loss, jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)


def make_eval_step(model_cfg: GPTConfig, lora: bool = False) -> Callable:
    """`eval_step(params, batch) -> (sum of weighted nll, sum of weights)`, no dropout; with
    `lora`, `eval_step(base, adapters, batch)`."""
    model = GPT(model_cfg)

    def weighted_nll(variables, batch):
        logits = model.apply(variables, batch["inputs"], **document_args(batch))
        w = batch["weights"].astype(jnp.float32)
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        return jnp.sum(nll * w), jnp.sum(w)

    def lora_eval_step(base, adapters, batch):
        return weighted_nll({"params": base, COLLECTION: adapters}, batch)

    def eval_step(params, batch):
        return weighted_nll({"params": params}, batch)

    return lora_eval_step if lora else eval_step
