"""The sharded setup of a LoRA run (the adapters train, the pretrained base stays as it is), and
the Setup and first state of any train.py run (`make_setup`, `load_base`, `new_state`).

The TrainState's parameters and optimizer state are the adapters only (gptjax.nn.lora), sharded
by `lora_logical_axes` (A keeps its kernel's input axes, B its output axes). The frozen base is
held here, sharded by the model's logical axes and the mesh rules (a weight-only bf16/int8 base,
gptjax.nn.quant, by the axes of the kernel each matrix stands for), and given to the jitted step
as an argument: it is neither donated nor baked into the program as a constant. `train_step`
and `eval_step` are called as a Setup's are (without the base), so the training loop and
evaluation run unchanged; `.lower()` lowers with the base's abstract shapes (dry runs).

Weight decay (optim.weight_decay) applies to A and B, as to every matrix (PEFT's adapters under
transformers' Trainer are decayed the same way): it pulls the update A B towards zero, i.e. the
model towards the pretrained one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import PartitionSpec as P

from gptjax import sharding as shd
from gptjax.config import GPTConfig
from gptjax.nn.lora import LoraConfig, init_lora, lora_logical_axes, merge
from gptjax.nn.model import abstract_params
from gptjax.nn.quant import WeightOnly, quantize_params
from gptjax.runs.checkpoint import Checkpointer, abstract_with_shardings
from gptjax.train.setup import Setup, with_default_limit
from gptjax.train.start import announce, load_init, lora_meta, lora_settings
from gptjax.train.step import TrainState, make_eval_step, make_lora_train_step


def _weight_only_spec(w: WeightOnly, kernel_spec: P, lead: int) -> WeightOnly:
    """The logical axes of a WeightOnly [lead..., O, I] of a kernel with `kernel_spec`: each
    flattened group takes its major dim's axis (a split of the major dim is a contiguous block of
    the flattened one)."""
    axes = tuple(kernel_spec) + (None,) * 8
    n_in = len(w.in_shape)
    out_major, in_major = axes[lead + n_in], axes[lead]
    return w.replace(values=P(*axes[:lead], out_major, in_major),
                     scale=None if w.scale is None else P(*axes[:lead], out_major))


def base_logical_specs(model_cfg: GPTConfig, model_specs: Any, abstract_base: Any) -> Any:
    """Logical axes of the base as stored: the model's, or those of its WeightOnly matrices."""
    lead = 1 if model_cfg.scan_layers else 0

    def walk(q: dict, logical: dict) -> dict:
        out = {}
        for k, v in q.items():
            if k == "kernel_q":
                out[k] = _weight_only_spec(v, logical["kernel"], lead)
            elif k == "embedding_q":  # quantized as embedding.T: a kernel [C, V]
                out[k] = _weight_only_spec(v, P(*reversed(tuple(logical["embedding"]))), 0)
            elif k == "lm_head_q":
                out[k] = _weight_only_spec(v, logical["lm_head"], 0)
            elif isinstance(v, dict):
                out[k] = walk(v, logical[k])
            else:
                out[k] = logical[k]
        return out

    return walk(dict(abstract_base), dict(model_specs))


class _WithBase:
    """A jitted step that takes the frozen base as argument `index`, called without it."""

    def __init__(self, fn: Callable, setup: "LoraSetup", index: int):
        self.fn, self.setup, self.index = fn, setup, index

    def _args(self, args: tuple, base: Any) -> tuple:
        return args[:self.index] + (base,) + args[self.index:]

    def __call__(self, *args):
        if self.setup.base is None:
            raise RuntimeError("LoraSetup.set_base(params) must come before its steps run")
        return self.fn(*self._args(args, self.setup.base))

    def lower(self, *args):
        """Lowered with the base's abstract shapes and shardings (nothing allocated)."""
        return self.fn.lower(*self._args(args, self.setup.abstract_sharded_base()))


class LoraSetup(Setup):
    """A Setup whose state is LoRA adapters over a frozen base held beside it (`set_base`)."""

    def __init__(self, config: ml_collections.ConfigDict, model_cfg: GPTConfig, total_steps: int,
                 lora_cfg: LoraConfig, devices=None):
        """As Setup; `lora_cfg` says which adapters train, `config.lora.base_weights` in which
        format the base is held ('fp32', 'bf16', 'int8')."""
        self.lora_cfg = lora_cfg
        self.base_weights = config.lora.base_weights
        self.base = None
        super().__init__(config, model_cfg, total_steps, devices)

    def _init_fn(self, rng: jax.Array) -> TrainState:
        adapters = init_lora(self.model_cfg, self.lora_cfg, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=adapters,
                          opt_state=self.optimizer.init(adapters))

    def _quantize(self, params: Any) -> Any:
        if self.base_weights == "fp32":
            return params
        return quantize_params(self.model_cfg, params, self.base_weights)

    def _trained_logical_specs(self, model_specs):
        shd.check_rules_cover(model_specs, self.rules)
        self.abstract_base = jax.eval_shape(self._quantize, abstract_params(self.model_cfg))
        base_specs = base_logical_specs(self.model_cfg, model_specs, self.abstract_base)
        self.base_shardings = shd.logical_to_shardings(base_specs, self.mesh, self.rules)
        shd.check_divisible(self.abstract_base, self.base_shardings)
        return lora_logical_axes(self.model_cfg, self.lora_cfg)

    def _build_steps(self) -> None:
        config, repl, sh = self.config, self.repl, self.state_shardings
        step_fn = make_lora_train_step(self.model_cfg, self.optimizer, self.schedule,
                                       lora_dropout=self.lora_cfg.dropout,
                                       accum_steps=self.accum_steps,
                                       nonfinite=config.train.nonfinite,
                                       spike_guard=bool(self.guard_args))
        train = jax.jit(self._with_rules(step_fn),
                        in_shardings=(sh, self.base_shardings, self.batch_sharding, repl)
                        + self.guard_args,
                        out_shardings=(sh, repl), donate_argnames=("state",))
        evaluate = jax.jit(self._with_rules(make_eval_step(self.model_cfg, lora=True)),
                           in_shardings=(self.base_shardings, sh.params, self.batch_sharding),
                           out_shardings=(repl, repl))
        self.train_step = _WithBase(with_default_limit(train, self, 4), self, 1)
        self.eval_step = _WithBase(evaluate, self, 0)

    def set_base(self, params: Any) -> None:
        """Holds the frozen base: fp32 `params` (single-device or host arrays, the model's
        layout) placed as `base_shardings` says, quantized first for a bf16/int8 base."""
        with self.mesh:
            if self.base_weights == "fp32":
                self.base = jax.device_put(params, self.base_shardings)
            else:
                self.base = jax.jit(self._quantize, out_shardings=self.base_shardings)(params)

    def abstract_sharded_base(self) -> Any:
        """The base's ShapeDtypeStructs with their shardings."""
        return abstract_with_shardings(self.abstract_base, self.base_shardings)

    def merged(self, adapters: Any) -> Any:
        """The base with `adapters` merged: plain fp32 parameters (sampling after training)."""
        return merge(self.model_cfg, self.base, adapters)


def make_setup(config: ml_collections.ConfigDict, model_cfg: GPTConfig, total_steps: int,
               devices=None) -> Setup:
    """The run's Setup: a LoraSetup when `config.lora.rank` > 0."""
    lora_cfg = lora_settings(config)
    if lora_cfg is None:
        return Setup(config, model_cfg, total_steps, devices=devices)
    return LoraSetup(config, model_cfg, total_steps, lora_cfg, devices=devices)


def load_base(config: ml_collections.ConfigDict, setup: Setup, ckpt: Checkpointer) -> dict:
    """A LoRA run's frozen base, loaded into `setup` (at every start, resumed or not); returns
    what its checkpoints record: {'lora': settings, 'base': where it came from}; {} otherwise.

    A resumed run over a gptjax run (init.kind 'workdir', init.step <= 0: the latest) reads the
    base step its own checkpoint recorded, not that run's latest: the base run may have saved
    again since."""
    if not isinstance(setup, LoraSetup):
        return {}
    step = None
    latest = ckpt.latest_step()
    if latest is not None and config.init.kind == "workdir" and config.init.step <= 0:
        step = (ckpt.restore_meta(latest).get("base") or {}).get("step")
    params, source = load_init(config, setup.model_cfg, step)
    setup.set_base(params)
    announce(config, source)
    return {"lora": lora_meta(config), "base": source}


def new_state(config: ml_collections.ConfigDict, setup: Setup, rng: jax.Array) -> TrainState:
    """The state of a run's first step: new adapters (LoRA), the pretrained weights of init.kind
    'hf'/'workdir' with a new optimizer state, or a random init ('scratch')."""
    if isinstance(setup, LoraSetup) or config.init.kind == "scratch":
        return setup.init_state(rng)
    params, source = load_init(config, setup.model_cfg)
    announce(config, source)
    return setup.state_from_params(params)
