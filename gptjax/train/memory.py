"""Memory plans: per-device bytes of parameters, optimizer state, gradients and activations,
computed without allocating anything, and the sharding of every parameter (`train.py --dry_run`).

Activation estimates follow Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
Transformer Models", eq. 2), which counts the bytes one transformer layer keeps for the backward
pass with 16-bit activations: s*b*h*(34 + 5*a*s/h) without tensor parallelism and
s*b*h*(10 + 24/t + 5*a*s/(h*t)) with t-way tensor parallelism (the 10 are LayerNorm inputs,
dropout masks and the residual, which stay replicated). We scale by the compute dtype's size / 2.
Under remat='full' a layer keeps only its input (2*s*b*h bytes at 16 bits) plus one layer's
activations live during recomputation; under remat='dots' it keeps the outputs of the
non-batched matmuls (q/k/v, attention projection, both MLP matmuls: (3+1+4)/t + 1 + 1 widths).
The output layer adds the fp32 logits and their gradient, 2 x 4 bytes x s*b*V/t.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import jax
import ml_collections
import numpy as np

from gptjax import defaults
from gptjax import sharding as shd
from gptjax.data.documents import batch_keys
from gptjax.nn.lora import num_lora_params
from gptjax.train.experiment import (
    build_source,
    check_train_config,
    model_config_from,
    run_tokenizer,
)
from gptjax.train.lora_setup import LoraSetup, make_setup
from gptjax.train.setup import Setup
from gptjax.train.start import init_architecture
from gptjax.train.topology import (
    INSTALL_HINT,
    dcn_for_slices,
    libtpu_available,
    target_devices,
    topology_report,
)
from gptjax.train.gpus import GPU_INSTALL_HINT, cuda_plugin_available, gpu_name


def _nbytes_per_device(shapes: Any, shardings: Any) -> int:
    total = 0
    flat_sh = jax.tree_util.tree_leaves(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    for shp, sh in zip(jax.tree_util.tree_leaves(shapes), flat_sh):
        n = math.prod(shp.shape) * np.dtype(shp.dtype).itemsize
        total += n // shd.shard_count(sh, len(shp.shape))
    return total


def activation_bytes(model_cfg, micro_batch_per_device: int, seq_len: int, tensor: int) -> int:
    """Per-device bytes of activations kept for the backward pass (see the module docstring)."""
    s, b, h, a, t = seq_len, micro_batch_per_device, model_cfg.n_embd, model_cfg.n_head, tensor
    scale = np.dtype(model_cfg.dtype).itemsize / 2
    full_layer = s * b * h * (10 + 24 / t + 5 * a * s / (h * t)) * scale
    if model_cfg.remat == "none":
        layers = model_cfg.n_layer * full_layer
    elif model_cfg.remat == "full":
        layers = model_cfg.n_layer * 2 * s * b * h * scale + full_layer
    else:  # dots
        layers = model_cfg.n_layer * s * b * h * (8 / t + 2) * 2 * scale + full_layer
    logits = 2 * 4 * s * b * model_cfg.vocab_size / t
    return int(layers + logits)


def memory_plan(setup, batch_size: int, seq_len: int, accum_steps: int = 1) -> dict:
    """Per-device bytes of a train step on `setup`'s mesh; nothing is allocated.

    Of a LoRA setup (gptjax.train.lora_setup): `params` is the frozen base as it is held
    (`base`: fp32, bf16 or int8 with its scales) plus the adapters (`adapters`); the optimizer
    state and the gradients are the adapters' only.
    """
    st, sh = setup.abstract_state, setup.state_shardings
    mesh = setup.mesh
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = max(1, batch_size // (dp * accum_steps))
    trained = _nbytes_per_device(st.params, sh.params)
    base = (_nbytes_per_device(setup.abstract_base, setup.base_shardings)
            if isinstance(setup, LoraSetup) else 0)
    opt = _nbytes_per_device(st.opt_state, sh.opt_state)
    grads = trained  # one gradient per trained parameter, same layout (fp32 under accum>1)
    acts = activation_bytes(setup.model_cfg, micro, seq_len, mesh.shape["tensor"])
    params = base + trained
    return dict(params=params, base=base, adapters=trained if base else 0, optimizer_state=opt,
                gradients=grads, activations=acts, total=params + opt + grads + acts,
                micro_batch_per_device=micro, devices=mesh.size)


def compiled_memory(setup, batch_size: int, seq_len: int) -> dict | None:
    """XLA's own per-device memory analysis of the compiled train step (compiles, no allocation).

    Returns None when the backend does not report it.
    """
    abstract_state = setup.abstract_sharded_state()
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), np.int32, sharding=setup.batch_sharding)
             for k in batch_keys(setup.config.data)}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=setup.repl)
    with setup.mesh:
        compiled = setup.train_step.lower(abstract_state, batch, rng).compile()
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    return dict(arguments=int(ma.argument_size_in_bytes), outputs=int(ma.output_size_in_bytes),
                temporaries=int(ma.temp_size_in_bytes), aliased=int(ma.alias_size_in_bytes))


def sharding_table(setup) -> list:
    """(parameter path, shape, logical axes, mesh spec, bytes per device) for every parameter."""
    rows = []
    specs = jax.tree_util.tree_leaves(setup.logical_specs,
                                      is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat = jax.tree_util.tree_leaves_with_path(setup.abstract_state.params)
    shs = jax.tree_util.tree_leaves(setup.state_shardings.params,
                                    is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
    for (path, shp), logical, sh in zip(flat, specs, shs):
        n = math.prod(shp.shape) * np.dtype(shp.dtype).itemsize
        rows.append((jax.tree_util.keystr(path), tuple(shp.shape), tuple(logical),
                     tuple(sh.spec), n // shd.shard_count(sh, len(shp.shape))))
    return rows


def plan_lines(setup, config: ml_collections.ConfigDict, seq_len: int, what: str = "") -> list:
    """The memory plan of `setup`'s train step as report lines (`what` names the plan)."""
    tc, mc = config.train, setup.model_cfg
    plan = memory_plan(setup, tc.batch_size, seq_len, tc.accum_steps)
    lines = [f"{what}memory plan per device (batch {tc.batch_size}, seq {seq_len}, "
             f"micro-batch/device {plan['micro_batch_per_device']}, remat {mc.remat}, "
             f"compute {mc.dtype}, params {mc.param_dtype}):"]
    if isinstance(setup, LoraSetup):
        lc = setup.lora_cfg
        lines[0] = (f"LoRA (rank {lc.rank}, alpha {lc.alpha:g}, targets {', '.join(lc.targets)}; "
                    f"{num_lora_params(setup.abstract_state.params):,} trained parameters) "
                    f"{lines[0][:-2]}, base {setup.base_weights}):")
        lines += [f"  {'params':16s} {format_bytes(plan['params'])} (frozen base "
                  f"{format_bytes(plan['base'])} in {setup.base_weights}, adapters "
                  f"{format_bytes(plan['adapters'])})"]
    else:
        lines += [f"  {'params':16s} {format_bytes(plan['params'])}"]
    for k in ("optimizer_state", "gradients", "activations", "total"):
        lines.append(f"  {k:16s} {format_bytes(plan[k])}")
    return lines


def format_bytes(n: float) -> str:
    """`n` bytes in B, KiB, MiB, GiB or TiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def dry_run(config: ml_collections.ConfigDict, workdir: str, compile_step: bool = True,
            topology: str | None = None, num_slices: int = 1) -> str:
    """The sharding of every parameter and a per-device memory plan, without allocating.

    The vocabulary size comes from the config, or (when it is <= 0) from the run's tokenizer.
    With `compile_step`, the train step is also compiled for the local devices and XLA's own
    memory analysis is reported next to the estimate.

    Args:
      config: a train.py experiment config (missing fields take gptjax.defaults' values).
      workdir: the run directory (where a tokenizer is built, if one is needed).
      compile_step: also compile the train step.
      topology: a TPU topology name ('v5e:2x2', 'v5p:4x4x8', ...) or GPUs ('h100', 'h100:8',
        'h100:2x8'; gptjax.train.gpus): compile the step for those devices instead of the local
        ones (needs libtpu or the CUDA plugin, no TPU or GPU) and end with a `fits:` line.
      num_slices: slices of `topology`, over the config's dcn mesh (its data axis by default).

    Returns:
      The report, as printed by `train.py --dry_run`.
    """
    config = defaults.complete(config, defaults.base_config())
    devices = None
    if topology:
        if gpu_name(topology):  # raises for an unknown name
            if not cuda_plugin_available():
                return GPU_INSTALL_HINT
        elif not libtpu_available():
            return INSTALL_HINT
        else:
            dcn_for_slices(config, num_slices)
        devices = target_devices(topology, num_slices)
    check_train_config(config, None if devices is None else len(devices) // num_slices)
    model_cfg = init_architecture(config)  # a pretrained model's: read from its config file
    if model_cfg is None:
        vocab = None
        if config.model.vocab_size <= 0:
            vocab = run_tokenizer(config, workdir, build_source(config)).vocab_size
        model_cfg = model_config_from(config, vocab)
    seq_len = config.data.seq_len or model_cfg.n_ctx
    setup = make_setup(config, model_cfg, config.train.steps, devices=devices)
    lines = [f"model: {model_cfg.num_params():,} parameters; mesh {dict(setup.mesh.shape)} on "
             f"{setup.mesh.size} {setup.mesh.devices.flat[0].platform} devices; "
             f"rules {setup.rules}", "",
             f"{'parameter':56s} {'shape':22s} {'logical axes':44s} {'mesh':28s} per device"]
    for path, shape, logical, spec, nbytes in sharding_table(setup):
        lines.append(f"{path:56s} {str(shape):22s} {str(logical):44s} {str(spec):28s} "
                     f"{format_bytes(nbytes)}")
    if isinstance(setup, LoraSetup):  # full finetuning of the same model, for comparison
        full = copy.deepcopy(config)
        full.lora.rank, full.lora.base_weights = 0, "fp32"
        lines += [""] + plan_lines(Setup(full, model_cfg, config.train.steps, devices=devices),
                                   full, seq_len, "full finetuning (lora.rank=0), ")
    lines += [""] + plan_lines(setup, config, seq_len)
    if topology:
        lines += [""] + topology_report(setup, topology, num_slices, config.train.batch_size,
                                        seq_len)
    elif compile_step:
        cm = compiled_memory(setup, config.train.batch_size, seq_len)
        if cm is not None:
            lines.append("XLA memory analysis of the compiled step, per device: " + ", ".join(
                f"{k} {format_bytes(v)}" for k, v in cm.items()))
    return "\n".join(lines)
