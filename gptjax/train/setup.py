"""The sharded setup of one training run: its mesh, shardings and jitted steps.

The parameters' logical axes (from the model's boxed init) and the config's rules give every
parameter and optimizer-state leaf a NamedSharding; the train step is jitted with the state
donated and sharded that way, and batches are laid out over the data-parallel axes.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gptjax import sharding as shd
from gptjax.config import GPTConfig
from gptjax.nn.model import init_boxed
from gptjax.runs.checkpoint import abstract_with_shardings
from gptjax.train.experiment import mesh_shape
from gptjax.train import spikes
from gptjax.train.optim import make_optimizer
from gptjax.train.step import TrainState, make_eval_step, make_train_step


class Setup:
    """The mesh, the shardings and the jitted functions of one run."""

    def __init__(self, config: ml_collections.ConfigDict, model_cfg: GPTConfig, total_steps: int,
                 devices=None):
        """Builds the mesh of `config.mesh` on `devices` (default: all) and everything on it.

        Args:
          config: the experiment config, complete (its mesh, optim and train fields).
          model_cfg: the architecture.
          total_steps: the run's steps (the learning-rate schedule's length).
          devices: the devices of the mesh.
        """
        self.config, self.model_cfg = config, model_cfg
        self.mesh = shd.make_mesh(mesh_shape(config), dcn_shape=config.mesh.dcn.to_dict(),
                                  devices=devices)
        self.rules = shd.rules_from_config(config.mesh.rules)
        self.optimizer, self.schedule = make_optimizer(config.optim, total_steps)
        self.accum_steps = config.train.accum_steps  # (train.elastic: set_accum_steps)
        self._shard_state()
        # train.spike_guard: the train step's trailing float32 limit (gptjax.train.spikes).
        self.guard_args = (self.repl,) if spikes.enabled(config.train) else ()
        # train.layer_stats_every > 0: the step with per-layer statistics, run at those steps
        # (gptjax.train.layer_stats); None otherwise (and for LoRA, which has none).
        self.stats_step = None
        self._build_steps()

    def _build_steps(self) -> None:
        """The jitted train and eval steps on the mesh."""
        self.train_step = self._jit_train_step(layer_stats=False)
        if self.config.train.layer_stats_every > 0:
            self.stats_step = self._jit_train_step(layer_stats=True)
        self.eval_step = jax.jit(self._with_rules(make_eval_step(self.model_cfg)),
                                 in_shardings=(self.state_shardings.params, self.batch_sharding),
                                 out_shardings=(self.repl, self.repl))

    def _jit_train_step(self, layer_stats: bool):
        """The jitted train step, with or without per-layer statistics (each its own program)."""
        repl = self.repl
        step_fn = make_train_step(self.model_cfg, self.optimizer, self.schedule,
                                  accum_steps=self.accum_steps,
                                  nonfinite=self.config.train.nonfinite,
                                  spike_guard=bool(self.guard_args), layer_stats=layer_stats)
        return with_default_limit(jax.jit(
            self._with_rules(step_fn),
            in_shardings=(self.state_shardings, self.batch_sharding, repl) + self.guard_args,
            out_shardings=(self.state_shardings, repl), donate_argnames=("state",)), self)

    def set_accum_steps(self, accum_steps: int) -> None:
        """Rebuilds the train step with `accum_steps` microbatches per update (train.elastic on
        another device count); the state's shardings do not depend on it."""
        if accum_steps != self.accum_steps:
            self.accum_steps = accum_steps
            self._build_steps()

    def _init_fn(self, rng: jax.Array) -> TrainState:
        params = nn.meta.unbox(init_boxed(self.model_cfg, rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.optimizer.init(params))

    def _shard_state(self) -> None:
        """The logical specs, the abstract state and the sharding of every state leaf."""
        # Traced under the mesh: the attention kernel is chosen by the platform of its devices
        # (a TPU topology compiled from a CPU host picks and checks splash, not the CPU path).
        with self.mesh:
            boxed = jax.eval_shape(lambda: init_boxed(self.model_cfg, jax.random.key(0)))
            self.abstract_state = jax.eval_shape(self._init_fn, jax.random.key(0))
        self.logical_specs = self._trained_logical_specs(nn.get_partition_spec(boxed))
        shd.check_rules_cover(self.logical_specs, self.rules)
        param_sh = shd.logical_to_shardings(self.logical_specs, self.mesh, self.rules)
        shd.check_divisible(self.abstract_state.params, param_sh)
        self.repl = shd.replicated(self.mesh)
        opt_sh = optax.tree_utils.tree_map_params(
            self.optimizer, lambda _, s: s, self.abstract_state.opt_state, param_sh,
            transform_non_params=lambda _: self.repl,
            is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
        self.state_shardings = TrainState(step=self.repl, params=param_sh, opt_state=opt_sh)
        self.batch_sharding = shd.batch_sharding(self.mesh, self.rules)
        # One jitted init per Setup: every init_state call (each seed of a sweep) reuses it.
        self._init_jit = jax.jit(self._with_rules(self._init_fn),
                                 out_shardings=self.state_shardings)

    def _trained_logical_specs(self, model_specs):
        """The logical axes of the trained parameters (`state.params`): the model's."""
        return model_specs

    def _with_rules(self, fn):
        """Trace `fn` with the logical axis rules active, so activation constraints apply."""
        @functools.wraps(fn)
        def wrapped(*args):
            with nn.logical_axis_rules(self.rules):
                return fn(*args)
        return wrapped

    def init_state(self, rng: jax.Array) -> TrainState:
        """Initialise straight into the sharded layout (no full copy on one device)."""
        with self.mesh:
            return self._init_jit(rng)

    def state_from_params(self, params) -> TrainState:
        """A step-0 state of given (pretrained) parameters, sharded, with a new optimizer state."""
        def make(p):
            return TrainState(step=jnp.zeros((), jnp.int32), params=p,
                              opt_state=self.optimizer.init(p))
        with self.mesh:
            params = jax.device_put(params, self.state_shardings.params)
            return jax.jit(self._with_rules(make), out_shardings=self.state_shardings,
                           donate_argnums=(0,))(params)

    def abstract_sharded_state(self):
        """The state's ShapeDtypeStructs with their target shardings (to restore into)."""
        return abstract_with_shardings(self.abstract_state, self.state_shardings)

    def put_batch(self, local_batch: dict) -> dict:
        """Host-local numpy rows -> one global array sharded over the batch axis."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items()}


class _DefaultLimit:
    """A jitted guarded train step that may be called (or lowered) without its trailing spike
    limit: +inf then, nothing is skipped (what code written for the unguarded step gets)."""

    def __init__(self, fn, n_args: int, sharding):
        self.fn, self.n_args, self.sharding = fn, n_args, sharding

    def __call__(self, *args):
        if len(args) == self.n_args:
            args += (np.float32(np.inf),)
        return self.fn(*args)

    def lower(self, *args):
        if len(args) == self.n_args:
            args += (jax.ShapeDtypeStruct((), jnp.float32, sharding=self.sharding),)
        return self.fn.lower(*args)


def with_default_limit(jitted, setup: Setup, n_args: int = 3):
    """`jitted` as is without the spike guard; with it, a `_DefaultLimit` over its `n_args`
    arguments before the limit."""
    return _DefaultLimit(jitted, n_args, setup.repl) if setup.guard_args else jitted
