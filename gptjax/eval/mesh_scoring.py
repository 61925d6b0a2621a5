"""Scoring on a device mesh, in one process or in several: what `GPTJaxLM(mesh=...)` runs.

    scorer = MeshScorer(config, params, "fsdp=4,tensor=2")
    nll, count, greedy = scorer(tokens_BxT, targets_BxT, weights_BxT)   # numpy in, numpy out

The parameters are laid out by the rules training uses (gptjax.sharding's logical-axis rules
over the model's logical axes, as gptjax.train.setup does): FSDP splits every weight along its
`embed` axis, tensor parallelism splits the heads, the MLP and the vocabulary. A batch's rows go
over the data-parallel axes (`data` x `fsdp`), so its size must be a multiple of
`data_parallel` (callers pad with zero-weight rows and drop them). The scores are the same
numbers as `gptjax.eval.scoring.score_targets` on one device, to float32 rounding.

Several processes (jax.distributed started, e.g. by eval.py's --coordinator_address flags): each
process builds the scorer from the same parameters and passes the same whole batch, in the same
order; each keeps only the pieces of its own devices, and every process gets the whole result
back (the outputs are replicated).
"""

from __future__ import annotations

import contextlib
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np

from gptjax import sharding as shd
from gptjax.config import GPTConfig
from gptjax.eval.scoring import token_scores
from gptjax.nn.model import logical_axes


def on_host(really: bool = True):
    """A context in which new arrays go to this process's first CPU device: a model to be
    sharded is loaded there whole, so that it need not fit one accelerator. The default device
    where JAX has no CPU backend (JAX_PLATFORMS=cuda), or with `really` False."""
    try:
        cpu = jax.local_devices(backend="cpu")[0] if really else None
    except RuntimeError:
        cpu = None
    return jax.default_device(cpu) if cpu is not None else contextlib.nullcontext()


def global_array(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A jax.Array laid out by `sharding` from a value that every process holds whole (each
    process places the pieces of its own devices)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


class MeshScorer:
    """`score_targets` with the parameters sharded over a mesh and the batch over its
    data-parallel axes.

    Args:
      config: the decoder's architecture.
      params: its parameters, whole on every process (host or single-device arrays).
      mesh: the mesh's axis sizes, as gptjax.sharding.parse_mesh reads them
        ('fsdp=4,tensor=2', or a dict).
      rules: logical-axis rules (default: gptjax.sharding.DEFAULT_RULES, training's).
      devices: the devices of the mesh (default: all, of every process).

    Raises:
      ShardingError: a mesh that does not match the device count, or a parameter dimension that
        its mesh axes do not divide (one line, as training's).
    """

    def __init__(self, config: GPTConfig, params: Any, mesh: Union[str, Mapping[str, int]],
                 rules: Optional[Sequence] = None, devices: Optional[Sequence] = None):
        self.config = config
        self.mesh = shd.make_mesh(shd.parse_mesh(mesh), devices=devices)
        self.rules = shd.rules_from_config(rules)
        with self.mesh:  # (the attention kernel is chosen by the mesh's platform, as training)
            specs = logical_axes(config)
        shd.check_rules_cover(specs, self.rules)
        param_sh = shd.logical_to_shardings(specs, self.mesh, self.rules)
        shd.check_divisible(params, param_sh)
        self.params = jax.tree.map(global_array, params, param_sh)
        self.batch_sharding = shd.batch_sharding(self.mesh, self.rules)
        self.data_parallel = shd.shard_count(self.batch_sharding, 1)
        rules_ = self.rules

        def score(p, tokens_BxT, targets_BxT, weights_BxT):
            with nn.logical_axis_rules(rules_):  # (the model's activation constraints)
                return token_scores(config, p, tokens_BxT, targets_BxT, weights_BxT)

        self._score = jax.jit(score, in_shardings=(param_sh,) + (self.batch_sharding,) * 3,
                              out_shardings=shd.replicated(self.mesh))

    def summary(self) -> str:
        """One line: the mesh, its devices and processes, and the parameters one device holds."""
        leaves = jax.tree.leaves(self.params)
        total = sum(x.size for x in leaves)
        local = sum(x.addressable_shards[0].data.size for x in leaves)
        shape = " x ".join(f"{a} {n}" for a, n in self.mesh.shape.items())
        return (f"mesh {shape}: {self.mesh.devices.size} devices, {jax.process_count()} "
                f"process(es); {local:,} of {total:,} parameters per device "
                f"({local / total:.1%})")

    def __call__(self, tokens_BxT, targets_BxT, weights_BxT) -> tuple:
        """(sum of weighted NLL, sum of weights, all weighted targets greedy) per row, as numpy
        arrays on every process; every process passes the same whole batch.

        Raises:
          ValueError: a batch whose size is not a multiple of `data_parallel`.
        """
        rows = np.shape(tokens_BxT)[0]
        if rows % self.data_parallel:
            raise ValueError(f"a batch of {rows} rows on a mesh of data-parallel size "
                             f"{self.data_parallel}: pad it to a multiple")
        with self.mesh:
            args = [global_array(a, self.batch_sharding)
                    for a in (tokens_BxT, targets_BxT, weights_BxT)]
            out = self._score(self.params, *args)
        return tuple(np.asarray(o) for o in out)
