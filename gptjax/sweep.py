"""Train N small models at once: `jax.vmap` over the pure train step (seeds and learning rates).

The trainer's step `train_step(state, batch, rng) -> (state, metrics)` is a pure function of
pytrees, so `jax.jit(jax.vmap(train_step))` trains N models in one compiled program: every leaf
of the state gets a leading model axis, and each model reads its own batch stream (the batches
of its own data seed) and its own dropout key. On one device this costs about N times one
model's step (the matmuls are batched), minus N - 1 dispatches and compilations; it is the cheap
way to get error bars over seeds or a learning-rate scan of a small model.

    from gptjax import sweep
    out = sweep.train_sweep(config, train_tokens, val_tokens, seeds=[0, 1, 2])
    out.losses      # [N, steps] training loss of every model at every step
    out.val_loss    # [N] whole-split validation loss
    out = sweep.train_sweep(config, train_tokens, val_tokens, seeds=[0],
                            learning_rates=[3e-4, 1e-3, 3e-3])

Model i with seed s is the model `train.py` trains with `--config.seed=s` (same init key, same
batches, same dropout keys): the sweep's losses equal the trainer's, per seed, to fp32 rounding
(tests/test_sweep.py). Learning rates enter through the optimizer state: the config's optimizer
runs with a peak learning rate of 1 (its warmup/decay shape and the ratio min_lr / learning_rate
kept) and its update is scaled by a per-model `step_size` that `optax.inject_hyperparams` keeps
in the state, where vmap gives each model its own.

LoRA adapters share their base: `finetune_lora_sweep` trains N sets of adapters (GPT-1 task-head
finetuning with `lora.rank > 0`, gptjax.finetune.lora) over ONE frozen decoder, with
`jax.vmap(step, in_axes=(0, None, 0, 0))`: the adapters, task-token deltas, heads and their
optimizer states carry the model axis, the base none (one copy in memory, never donated).

    out = sweep.finetune_lora_sweep(config, workdir, seeds=[0, 1, 2],
                                    learning_rates=[1e-4, 3e-4, 1e-3])
    out.losses, out.dev     # [N, steps]; per model the dev metrics of its final adapters
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gptjax import defaults
from gptjax.config import GPTConfig
from gptjax.data import LMBatcher, eval_batches
from gptjax.finetune import batches as ft_batches
from gptjax.finetune import heads
from gptjax.finetune import lora as ft_lora
from gptjax.finetune import loop as ft_loop
from gptjax.nn.model import init_boxed
from gptjax.train.experiment import model_config_from
from gptjax.train.optim import make_optimizer
from gptjax.train.step import TrainState, make_eval_step, make_train_step


@dataclasses.dataclass
class SweepResult:
    """What a sweep returns.

    Attributes:
      seeds, learning_rates: per model.
      losses: [N, steps] training loss of every model at every step.
      val_loss: [N] validation loss (whole split, non-overlapping windows), or None.
      state: the final TrainState, every leaf with a leading model axis N.
      model_config: the architecture (shared).
      wall_time_s: the training loop's wall time (compilation included).
      dev: finetune_lora_sweep: per model, its dev splits' metrics after the last step.
    """

    seeds: list
    learning_rates: list
    losses: np.ndarray
    val_loss: Optional[np.ndarray]
    state: Any
    model_config: GPTConfig
    wall_time_s: float
    dev: Optional[list] = None


def sweep_optimizer(opt_cfg: ml_collections.ConfigDict, total_steps: int
                    ) -> tuple[optax.GradientTransformation, Callable]:
    """The config's optimizer with a unit peak learning rate, times a per-model `step_size`.

    Returns:
      (optimizer, unit schedule). `optimizer.init` gives step_size = 1; `init_opt_state` sets it.
    """
    unit = ml_collections.ConfigDict(opt_cfg.to_dict())
    lr = float(opt_cfg.learning_rate)
    unit.learning_rate = 1.0
    unit.min_lr = float(opt_cfg.min_lr) / lr if lr else 0.0
    base, schedule = make_optimizer(unit, total_steps)
    return optax.chain(base, optax.inject_hyperparams(optax.scale)(step_size=1.0)), schedule


def init_opt_state(optimizer, params, learning_rate) -> Any:
    """optimizer.init(params) with the injected step_size set to `learning_rate` (traceable)."""
    state = optimizer.init(params)
    base_state, scale_state = state
    hp = dict(scale_state.hyperparams)
    hp["step_size"] = jnp.asarray(learning_rate, jnp.float32)
    return (base_state, scale_state._replace(hyperparams=hp))


def make_sweep_step(step_fn: Callable) -> Callable:
    """jit(vmap(step_fn)) over the model axis of state, batch and rng; the state is donated."""
    return jax.jit(jax.vmap(step_fn), donate_argnums=0)


def _check_models(seeds, learning_rates) -> tuple[list, list]:
    seeds = [int(s) for s in seeds]
    if not seeds or min(seeds) < 0:
        raise ValueError(f"seeds={seeds}: give at least one non-negative integer seed")
    if learning_rates is None:
        return seeds, [None] * len(seeds)
    lrs = [float(x) for x in learning_rates]
    if not lrs or min(lrs) <= 0:
        raise ValueError(f"learning_rates={lrs}: give positive learning rates")
    if len(seeds) == 1:
        seeds = seeds * len(lrs)
    elif len(lrs) == 1:
        lrs = lrs * len(seeds)
    if len(seeds) != len(lrs):
        raise ValueError(f"{len(seeds)} seeds and {len(lrs)} learning rates: give as many of "
                         "each, or one of either (it is broadcast)")
    return seeds, lrs


def init_sweep(config: ml_collections.ConfigDict, model_cfg: GPTConfig, seeds: Sequence[int],
               learning_rates: Optional[Sequence[float]] = None):
    """(stacked TrainState, stacked train rngs, train step, optimizer) for N models.

    Each model's keys are the trainer's: key(seed) split into (init, train, sample).

    Args:
      config: a train.py experiment config (missing fields take gptjax.defaults' values).
      model_cfg: the architecture.
      seeds: per model.
      learning_rates: per model peak learning rates (None: the config's optimizer as is).
    """
    config = defaults.complete(config, defaults.base_config())
    if config.train.layer_stats_every:
        raise ValueError(f"train.layer_stats_every={config.train.layer_stats_every}: a sweep's "
                         "step returns no per-layer statistics; give 0 (train.py logs them), or "
                         "capture activations with gptjax.nn.inspect under jax.vmap")
    total = config.train.steps
    if learning_rates is None:
        optimizer, schedule = make_optimizer(config.optim, total)
    else:
        optimizer, schedule = sweep_optimizer(config.optim, total)
    keys = jnp.stack([jax.random.split(jax.random.key(s), 3) for s in seeds])

    def init_one(init_rng, lr):
        params = nn.meta.unbox(init_boxed(model_cfg, init_rng))
        opt_state = (optimizer.init(params) if learning_rates is None
                     else init_opt_state(optimizer, params, lr))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state)

    lrs = jnp.asarray(learning_rates if learning_rates is not None else [0.0] * len(seeds),
                      jnp.float32)
    state = jax.jit(jax.vmap(init_one))(keys[:, 0], lrs)
    step_fn = make_train_step(model_cfg, optimizer, schedule,
                              accum_steps=config.train.accum_steps,
                              nonfinite=config.train.nonfinite)
    return state, keys[:, 1], step_fn, optimizer


def evaluate_sweep(model_cfg: GPTConfig, params, tokens: np.ndarray, seq_len: int,
                   batch_size: int) -> np.ndarray:
    """[N] mean loss of every model over a split's non-overlapping windows (the trainer's
    whole-split evaluation, vmapped over the models' parameters)."""
    step = jax.jit(jax.vmap(make_eval_step(model_cfg), in_axes=(0, None)))
    tot = wsum = 0.0
    for b in eval_batches(tokens, seq_len, batch_size):
        s, w = step(params, b)
        tot, wsum = tot + np.asarray(s, np.float64), wsum + np.asarray(w, np.float64)
    return tot / np.maximum(wsum, 1.0)


def train_sweep(config: ml_collections.ConfigDict, train_tokens: np.ndarray,
                val_tokens: Optional[np.ndarray] = None, *, seeds: Sequence[int] = (0,),
                learning_rates: Optional[Sequence[float]] = None, vocab_size: Optional[int] = None,
                log_every: int = 0, log: Callable[[str], None] = print) -> SweepResult:
    """Train one model per (seed, learning rate) at once, on one device.

    Args:
      config: a train.py experiment config (model, optim, train.steps/batch_size, data.seq_len,
        data.sampling); its seed and learning rate are replaced per model.
      train_tokens, val_tokens: 1-D token arrays (e.g. gptjax.data.load_tokens).
      seeds: per model; a single seed is broadcast over the learning rates.
      learning_rates: per model peak learning rates (None: the config's, exactly as the trainer
        builds its optimizer); a single value is broadcast over the seeds.
      vocab_size: the tokenizer's, when config.model.vocab_size <= 0.
      log_every: print the models' losses every this many steps (0: never).

    Returns:
      A SweepResult.
    """
    config = defaults.complete(config, defaults.base_config())
    seeds, lrs = _check_models(seeds, learning_rates)
    model_cfg = model_config_from(config, vocab_size)
    seq_len = config.data.seq_len or model_cfg.n_ctx
    if seq_len > model_cfg.n_ctx:
        raise ValueError(f"data.seq_len={seq_len} is longer than n_ctx={model_cfg.n_ctx}")
    steps, gbs = int(config.train.steps), int(config.train.batch_size)
    mode = config.data.sampling
    batchers = [LMBatcher(train_tokens, seq_len, gbs, s, mode=mode) for s in seeds]
    state, rngs, step_fn, _ = init_sweep(config, model_cfg, seeds,
                                         None if learning_rates is None else lrs)
    step = make_sweep_step(step_fn)
    losses = []
    t0 = time.time()
    for i in range(steps):
        per_model = [b.batch(i) for b in batchers]
        batch = {k: np.stack([pm[k] for pm in per_model]) for k in per_model[0]}
        state, metrics = step(state, batch, rngs)
        losses.append(metrics["loss"])  # fetched after the loop, so dispatch runs ahead
        if log_every and (i + 1) % log_every == 0:
            log(f"step {i + 1}: loss " + " ".join(f"{x:.4f}" for x in np.asarray(losses[-1])))
    losses = np.stack([np.asarray(x) for x in losses], axis=1) if losses else \
        np.zeros((len(seeds), 0))
    wall = time.time() - t0
    val = None
    if val_tokens is not None:
        val = evaluate_sweep(model_cfg, state.params, val_tokens, seq_len,
                             int(config.train.eval_batch_size))
    return SweepResult(seeds, [lr if lr is not None else float(config.optim.learning_rate)
                               for lr in lrs], losses, val, state, model_cfg, wall)


# ================================================================================ LoRA adapters
def make_adapter_sweep_step(step_fn: Callable) -> Callable:
    """jit(vmap(step_fn, in_axes=(0, None, 0, 0))) for a LoRA step `(state, base, batch, rng)`:
    N adapters' states (model axis 0) over one frozen base; the states are donated, the base
    is not."""
    return jax.jit(jax.vmap(step_fn, in_axes=(0, None, 0, 0)), donate_argnums=0)


def init_adapter_states(run, lora_cfg, optimizer, seeds: Sequence[int],
                        learning_rates: Optional[Sequence[float]]):
    """(stacked TrainState of the trainable leaves, stacked train rngs) of N LoRA models.

    Model i's keys are those `finetune` splits from key(seed): its head, adapters (the head's
    key folded with 1) and dropout keys are the ones a run with --config.seed=seeds[i] uses.
    """
    def init_one(seed_key, lr):
        _, _, k_head, k_train = jax.random.split(seed_key, 4)
        head = heads.init_head(k_head, run.head_cfg, run.model_cfg.n_embd)
        params = ft_lora.init_trainable(run.model_cfg, lora_cfg, head,
                                        jax.random.fold_in(k_head, 1))
        opt_state = (optimizer.init(params) if learning_rates is None
                     else init_opt_state(optimizer, params, lr))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=opt_state), k_train

    keys = jnp.stack([jax.random.key(s) for s in seeds])
    lrs = jnp.asarray(learning_rates if learning_rates is not None else [0.0] * len(seeds),
                      jnp.float32)
    return jax.jit(jax.vmap(init_one))(keys, lrs)


def finetune_lora_sweep(config: ml_collections.ConfigDict, workdir: str, *,
                        seeds: Sequence[int] = (0,),
                        learning_rates: Optional[Sequence[float]] = None) -> SweepResult:
    """N LoRA finetuning runs (GPT-1's task heads) at once over one shared frozen decoder.

    Args:
      config: a finetuning config with lora.rank > 0 (gptjax.defaults.finetune_config); the
        frozen base (pretrained decoder and the task-token rows) is drawn with its seed.
      workdir: a new directory for the run files `finetune` writes first (tokenizer, configs).
      seeds: per model: the head's and adapters' init, the batch order, the dropout keys.
      learning_rates: per model peak learning rates (None: the config's).

    Returns:
      A SweepResult: losses [N, steps], the final state (model axis first), and `dev`, each
      model's dev metrics. Model i is the LoRA run `finetune` makes with --config.seed=seeds[i]
      given the same base and training examples (those of config.seed) and
      train.length_bucket = the task's max_len (every sweep batch is padded to max_len):
      tests/test_sweep.py.
    """
    config = defaults.complete(config, defaults.finetune_config(config.task.name))
    lora_cfg = ft_lora.lora_config(config.lora)
    if lora_cfg is None:
        raise ValueError("lora.rank=0: finetune_lora_sweep trains adapters; give lora.rank >= 1")
    seeds, lrs = _check_models(seeds, learning_rates)
    run, params = ft_loop.prepare(config, workdir)
    tc = config.train
    total = int(tc.epochs) * -(-len(run.train) // int(tc.batch_size))
    total = min(total, int(tc.max_steps)) if tc.max_steps > 0 else total
    oc = ft_loop.schedule_optim_config(config, total)
    optimizer, schedule = (make_optimizer(oc, total) if learning_rates is None
                           else sweep_optimizer(oc, total))
    state, rngs = init_adapter_states(run, lora_cfg, optimizer, seeds,
                                      None if learning_rates is None else lrs)
    step = make_adapter_sweep_step(ft_loop.make_train_step(
        run.model_cfg, run.head_cfg, optimizer, schedule, frozen=True))
    base, losses, t0 = params["decoder"], [], time.time()
    for epoch in range(int(tc.epochs)):
        streams = [ft_batches.epoch_batches(run.train, tc.batch_size, s, epoch, run.max_len,
                                            run.max_len) for s in seeds]
        for per_model in zip(*streams):
            if len(losses) >= total:
                break
            batch = {k: np.stack([pm[k] for pm in per_model]) for k in per_model[0]}
            state, metrics = step(state, base, batch, rngs)
            losses.append(metrics["loss"])
    losses = np.stack([np.asarray(x) for x in losses], axis=1)
    dev = []
    for i in range(len(seeds)):
        p = jax.tree.map(lambda x, i=i: x[i], state.params)
        dev.append({f"{s}_{k}": v for s, enc in run.dev.items() for k, v in ft_loop.split_metrics(
            run.spec, enc, ft_loop.predict(run.model_cfg, run.head_cfg, dict(p, decoder=base),
                                           enc, tc.eval_batch_size, run.max_len,
                                           run.max_len)[1]).items()})
    return SweepResult(seeds, [lr if lr is not None else float(config.optim.learning_rate)
                               for lr in lrs], losses, None, state, run.model_cfg,
                       time.time() - t0, dev)


# ================================================================================ power law
def fit_power_law(n: Sequence[float], loss: Sequence[float]) -> dict:
    """Least-squares fit of Kaplan et al.'s L(N) = (N_c / N)^alpha in log space.

    log L = alpha log N_c - alpha log N is a line in log N; its slope is -alpha.

    Returns:
      {'alpha', 'n_c', 'r2'} (r2 of the log-log fit).
    """
    x, y = np.log(np.asarray(n, np.float64)), np.log(np.asarray(loss, np.float64))
    if len(x) < 2:
        raise ValueError(f"{len(x)} points: a power-law fit needs at least 2")
    slope, intercept = np.polyfit(x, y, 1)
    alpha = -slope
    pred = intercept + slope * x
    ss_res, ss_tot = float(np.sum((y - pred) ** 2)), float(np.sum((y - y.mean()) ** 2))
    return {"alpha": float(alpha), "n_c": float(np.exp(intercept / alpha)) if alpha else
            float("inf"), "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0}
