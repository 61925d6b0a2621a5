"""Compile a finetuning step without data or weights: `finetune.py --dry_run [--topology NAME]`.

The decoder's architecture is read from where the run would load it (a transformers directory's
config.json, a train.py work directory's model_config.json, or the config's own model for
'scratch'), GPT-1's three task tokens are added, and the real step (decoder + task head,
L2 + lambda * L1) is compiled for the longest batch the task can make: `train.batch_size`
examples of K sequences of `max_len` tokens. Finetuning is data parallel: the batch is split
over every device and the parameters and optimizer state are replicated on each, as one GPU
(or each chip of a small slice) holds them. With `lora.rank > 0` the step is the LoRA one
(gptjax.finetune.lora): the state is the adapters, task-token deltas and head with their Adam
moments, beside the frozen decoder at `lora.base_weights` (fp32, bf16 or int8); run the dry run
with and without it to compare. With `topology` the devices are a TPU slice's (libtpu, no TPU)
or deviceless NVIDIA GPUs' (the CUDA plugin, no GPU) and the report ends with
gptjax.train.topology's `fits:` line.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax import defaults
from gptjax.checks import check_choice
from gptjax.config import GPTConfig, parse_execution
from gptjax.data.tasks import get_task
from gptjax.data.tokenizers import KINDS as TOKENIZER_KINDS, build_tokenizer
from gptjax.finetune import heads
from gptjax.finetune import lora as ft_lora
from gptjax.finetune.decoder import INIT_KINDS
from gptjax.finetune.loop import head_config_for, make_train_step, schedule_optim_config
from gptjax.nn.convert import config_from_hf
from gptjax.nn.model import init_params
from gptjax.train.experiment import model_config_from
from gptjax.train.optim import make_optimizer
from gptjax.train.step import TrainState
from gptjax.train.gpus import GPU_INSTALL_HINT, cuda_plugin_available, gpu_name
from gptjax.train.topology import (
    INSTALL_HINT,
    compile_lowered,
    compiled_report,
    describe_target,
    libtpu_available,
    target_devices,
)


def decoder_config(config: ml_collections.ConfigDict) -> GPTConfig:
    """The decoder's architecture as the run would load it, reading no weights.

    Args:
      config: a complete finetuning config (`init`, `model`, `tokenizer`).

    Returns:
      The GPTConfig before the task tokens are added.
    """
    init = config.init
    check_choice("init.kind", init.kind, INIT_KINDS)
    if init.kind == "scratch":
        return model_config_from(config, None if config.model.vocab_size > 0
                                 else _scratch_vocab(config.tokenizer))
    name = {"hf": "config.json", "workdir": "model_config.json"}[init.kind]
    path = os.path.join(init.path, name)
    if not init.path or not os.path.isfile(path):
        raise ValueError(f"init.kind={init.kind!r} needs --config.init.path with a {name} "
                         f"(got {init.path!r})")
    with open(path) as fh:
        d = json.load(fh)
    base = config_from_hf(d) if init.kind == "hf" else GPTConfig.from_dict(d)
    return base.with_execution(**parse_execution(init.execution))


def _scratch_vocab(tc: ml_collections.ConfigDict) -> int:
    """A scratch tokenizer's size: built from files (GPT-2 BPE), or the size it is trained to."""
    if TOKENIZER_KINDS[tc.kind].builds_from is None:
        return build_tokenizer(tc.kind, path=tc.path).vocab_size
    if tc.kind == "sentencepiece":
        return int(tc.vocab_size)
    raise ValueError(f"tokenizer.kind={tc.kind!r} is built from the task's texts; give "
                     "--config.model.vocab_size for a dry run")


def _sequences_per_example(task_type: str, num_choices: int, max_len: int) -> int:
    """K: how many sequences GPT-1's input transformation makes of one example."""
    special = heads.SpecialTokens(0, 1, 2)
    return len(heads.transform(task_type, special, max_len, [3], [3], [[3]] * num_choices))


def _abstract_batch(batch: int, k: int, t: int, regression: bool, sharding) -> dict:
    def leaf(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    return {"tokens": leaf((batch, k, t), np.int32), "lengths": leaf((batch, k), np.int32),
            "labels": leaf((batch,), np.float32 if regression else np.int32),
            "weights": leaf((batch,), np.float32)}


def _abstract_step(config: ml_collections.ConfigDict, model_cfg: GPTConfig,
                   head_cfg: heads.HeadConfig, mesh, repl, rows):
    """(jitted step, its abstract leading arguments, a line naming what trains) for full
    finetuning (the state: parameters + Adam's moments of all of them) or LoRA (the state:
    adapters, task-token deltas and head with their moments; beside it the frozen decoder at
    lora.base_weights, an argument that is not donated)."""
    optimizer, schedule = make_optimizer(schedule_optim_config(config, 1000), 1000)
    lora_cfg = ft_lora.lora_config(config.lora)
    weights = ft_lora.base_weights(config.lora)

    def init_state(rng):
        head = heads.init_head(rng, head_cfg, model_cfg.n_embd)
        if lora_cfg is None:
            params, base = {"decoder": init_params(model_cfg, rng), "head": head}, None
        else:
            params = ft_lora.init_trainable(model_cfg, lora_cfg, head, rng)
            base = ft_lora.frozen_base(model_cfg, init_params(model_cfg, rng), weights)
        state = TrainState(step=np.int32(0), params=params, opt_state=optimizer.init(params))
        return state, base

    with mesh:
        state, base = jax.eval_shape(init_state, jax.random.key(0))
    state, base = jax.tree.map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), (state, base))
    step_fn = make_train_step(model_cfg, head_cfg, optimizer, schedule, lora_cfg is not None)
    if lora_cfg is None:
        step = jax.jit(step_fn, in_shardings=(repl, rows, repl), out_shardings=(repl, repl),
                       donate_argnums=(0,))
        return step, (state,), "full finetuning: every parameter trained (fp32 + Adam)"
    step = jax.jit(step_fn, in_shardings=(repl, repl, rows, repl), out_shardings=(repl, repl),
                   donate_argnums=(0,))
    return step, (state, base), ft_lora.describe(lora_cfg, weights, base, state.params)


def finetune_dry_run(config: ml_collections.ConfigDict, topology: str | None = None,
                     num_slices: int = 1) -> str:
    """The finetuning step compiled for the local devices or a TPU slice, as report lines.

    Args:
      config: a finetuning config (missing fields take gptjax.defaults' values).
      topology: a TPU topology name ('v5e:2x2', ...) or GPUs ('h100', 'h100:8'): compile for
        those devices (needs libtpu or the CUDA plugin; gptjax.train.gpus).
      num_slices: slices of `topology` (the batch is split over all of their chips).

    Returns:
      The report printed by `finetune.py --dry_run`; with `topology` its last line is
      `fits: yes (...)` or `fits: no (...)`.
    """
    config = defaults.complete(config, defaults.finetune_config(config.task.name))
    if topology and gpu_name(topology) and not cuda_plugin_available():
        return GPU_INSTALL_HINT
    if topology and not gpu_name(topology) and not libtpu_available():
        return INSTALL_HINT
    devices = target_devices(topology, num_slices) if topology else jax.devices()
    tc, spec = config.train, get_task(config.task.name)
    if tc.batch_size % len(devices):
        raise ValueError(f"train.batch_size={tc.batch_size} does not split over {len(devices)} "
                         "devices (data parallel); use a multiple of the device count")
    base = decoder_config(config)
    p = config.model_dropout
    if p >= 0:
        base = base.replace(embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)
    model_cfg = base.replace(vocab_size=base.vocab_size + 3)  # GPT-1's task tokens
    head_cfg = head_config_for(config, spec)
    max_len = min(config.task.max_len or model_cfg.n_ctx, model_cfg.n_ctx)
    k = _sequences_per_example(spec.task_type, spec.num_choices, max_len)
    mesh = Mesh(np.asarray(devices), ("data",))
    repl, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    step, args, mode = _abstract_step(config, model_cfg, head_cfg, mesh, repl, rows)
    batch = _abstract_batch(tc.batch_size, k, max_len, head_cfg.regression, rows)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
    n_params = model_cfg.num_params() + head_cfg.n_out * (model_cfg.n_embd + 1)
    lines = [f"finetune {spec.name} ({spec.task_type}): decoder {model_cfg.n_layer} x "
             f"{model_cfg.n_embd}, vocab {base.vocab_size} + 3 task tokens, {n_params:,} "
             f"parameters (decoder + head); batch {tc.batch_size} examples x {k} sequence(s) x "
             f"{max_len} tokens, data parallel over {len(devices)} {devices[0].platform} "
             "device(s), parameters and optimizer state replicated", mode]
    res = compile_lowered(lambda: step.lower(*args, batch, rng), mesh)
    tokens = tc.batch_size * k * max_len
    flops = model_cfg.flops_per_token(max_len) * tokens
    if topology:
        target = describe_target(topology, num_slices, devices)
        return "\n".join(lines + compiled_report(res, mesh, target, tokens, flops))
    if "error" in res:
        raise ValueError(f"the finetuning step does not compile: {res['error']}")
    ma = res["compiled"].memory_analysis()
    lines.append(f"compiled in {res['seconds']:.1f} s; XLA memory per device: arguments "
                 f"{ma.argument_size_in_bytes / 2 ** 20:.1f} MiB, temporaries "
                 f"{ma.temp_size_in_bytes / 2 ** 20:.1f} MiB; {flops:.3e} FLOPs per step")
    return "\n".join(lines)
