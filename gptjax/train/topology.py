"""Compile the train step for a TPU slice or GPUs this host does not have (`--dry_run --topology`).

libtpu (`pip install -e ".[tpu]"`) describes any TPU slice by name (`v5e:2x2`, `v5p:4x4x8`, ...)
without the hardware: `jax.experimental.topologies.get_topology_desc` gives its devices, a Mesh
over them takes the config's mesh fields, and `jit(...).lower(abstract args).compile()` runs the
real TPU compiler. XLA's memory analysis is then per chip, and a step that does not fit fails
with XLA's own RESOURCE_EXHAUSTED message. Works with JAX_PLATFORMS=cpu (the host stays on CPU).
GPU names (`h100`, `h100:8`, `h100:2x8`, gptjax.train.gpus) compile with XLA's GPU compiler for
deviceless NVIDIA GPUs; XLA does not refuse a GPU program for its size, so the `fits:` line
compares its memory analysis with what JAX's allocator gets of the GPU's memory.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import math
import os
import time
from typing import Any, Callable

import jax
import numpy as np

from gptjax.data.documents import batch_keys
from gptjax.train import gpus
from gptjax.train.metrics import datasheet_peak
from gptjax.train.setup import Setup

INSTALL_HINT = ('compiling for a TPU topology needs libtpu, which is not installed: '
                'pip install -e ".[tpu]"')

GIB = 1024 ** 3
# HBM per chip from Google Cloud's TPU datasheets, by the topology name's generation.
HBM_PER_CHIP = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5litepod": 16 * GIB, "v5p": 95 * GIB,
                "v6e": 32 * GIB}
MFU_TARGETS = (0.4, 0.6)


def libtpu_available() -> bool:
    """Whether libtpu is importable (the `tpu` extra is installed)."""
    return importlib.util.find_spec("libtpu") is not None


def topology_devices(name: str, num_slices: int = 1) -> list:
    """The devices of `num_slices` TPU slices of topology `name` (e.g. 'v5e:2x2'); no TPU needed."""
    if not libtpu_available():
        raise RuntimeError(INSTALL_HINT)
    if not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/*"):
        # No TPU chip on this host, so none to guard: another process's deviceless compile (a
        # test, a second dry run) holds libtpu's lockfile, which would refuse this one.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # heavy: loads libtpu, only for --topology
    kwargs = {"num_slices": num_slices} if num_slices > 1 else {}
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **kwargs).devices)


def chip_hbm(name: str, n_devices: int, num_slices: int = 1) -> int | None:
    """HBM bytes per device of topology `name` (a chip's HBM over its devices, e.g. v4 megacore)."""
    gen, _, dims = name.partition(":")
    hbm = HBM_PER_CHIP.get(gen.lower())
    if hbm is None or not dims:
        return hbm
    chips = math.prod(int(d) for d in dims.lower().split("x")) * num_slices
    return hbm * chips // n_devices if n_devices >= chips else hbm


@dataclasses.dataclass
class Target:
    """What a step is compiled for: devices, memory per device, bf16 peak, and how to name them."""
    label: str
    devices: list
    memory: int | None           # bytes one device holds for the step (None: unknown)
    peak: float | None           # dense bf16 FLOP/s per device
    unit: str = "chip"           # 'chip' (TPU) or 'device' (GPU), in the report's lines
    notes: tuple = ()            # lines about the memory budget


def target_devices(topology: str, num_slices: int = 1) -> list:
    """The devices of a TPU slice name ('v5e:2x2', x num_slices) or a GPU name ('h100:8')."""
    if gpus.gpu_name(topology):
        if num_slices != 1:
            raise ValueError(f"--num_slices {num_slices} is for TPU slices; name GPU nodes in "
                             "the topology (h100:2x8 is two nodes of 8)")
        return gpus.gpu_devices(topology)
    return topology_devices(topology, num_slices)


def describe_target(topology: str, num_slices: int, devices: list) -> Target:
    """The Target of `devices` (from `target_devices(topology, num_slices)`)."""
    name = gpus.gpu_name(topology)
    if name is None:
        return Target(f"{topology} x {num_slices} slice(s)", devices,
                      chip_hbm(topology, len(devices), num_slices), None)
    total, frac = gpus.device_memory(name), gpus.allocator_fraction()
    nodes, per_node = gpus.gpu_layout(topology)
    note = (f"device memory {_gib(total)} per GPU; JAX's allocator gets {frac:.0%} of it "
            f"(XLA_PYTHON_CLIENT_MEM_FRACTION; .75 by default, with preallocation): "
            f"{_gib(total * frac)}")
    peak = (f"bf16 peak {gpus.GPUS[name].peak_bf16 / 1e12:.1f} TFLOP/s dense "
            f"({gpus.GPUS[name].source})")
    return Target(f"{topology} ({nodes} node(s) x {per_node} GPU(s))", devices,
                  int(total * frac), gpus.GPUS[name].peak_bf16, "device", (note, peak))


def dcn_for_slices(config, num_slices: int) -> None:
    """Put `num_slices` on the config's dcn mesh: its data axis, unless the dcn already says so."""
    dcn = config.mesh.dcn
    n = math.prod(int(v) for v in dcn.values())
    if n == num_slices:
        return
    if n != 1:
        raise ValueError(f"--num_slices {num_slices} but config.mesh.dcn {dcn.to_dict()} spans "
                         f"{n} slices; make them agree")
    dcn.data = num_slices


def _abstract_args(setup: Setup, batch_size: int, seq_len: int) -> tuple:
    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), np.int32, sharding=setup.batch_sharding)
             for k in batch_keys(setup.config.data)}
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=setup.repl)
    return setup.abstract_sharded_state(), batch, rng


def compile_lowered(lower: Callable[[], Any], mesh) -> dict:
    """Compile what `lower()` lowers (traced under `mesh`, so kernels follow its devices).

    Returns {'compiled', 'seconds'} or, when XLA refuses (e.g. out of HBM), {'error', 'seconds'}
    with the first line of XLA's message.
    """
    t = time.perf_counter()
    try:
        with mesh:
            compiled = lower().compile()
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError; the message is the report
        lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        return dict(error=lines[0].strip(), seconds=time.perf_counter() - t)
    return dict(compiled=compiled, seconds=time.perf_counter() - t)


def compile_step(setup: Setup, batch_size: int, seq_len: int) -> dict:
    """Compile `setup`'s train step for its mesh's devices (see `compile_lowered`)."""
    return compile_lowered(
        lambda: setup.train_step.lower(*_abstract_args(setup, batch_size, seq_len)), setup.mesh)


def _xla_flops(compiled) -> float | None:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return None if not ca or "flops" not in ca else float(ca["flops"])


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 1024 ** 2:.2f} MiB"


def topology_report(setup: Setup, topology: str, num_slices: int, batch_size: int,
                    seq_len: int) -> list:
    """Report lines for `setup`'s train step compiled for its mesh (the topology's devices).

    The last line is exactly `fits: yes (X GiB of Y GiB per chip)` (per device for GPUs) or
    `fits: no (...)`.
    """
    tokens = batch_size * seq_len
    target = describe_target(topology, num_slices, list(setup.mesh.devices.flat))
    return compiled_report(compile_step(setup, batch_size, seq_len), setup.mesh, target, tokens,
                           setup.model_cfg.flops_per_token(seq_len) * tokens)


def compiled_report(res: dict, mesh, target: Target, tokens: int, analytic_flops: float) -> list:
    """Report lines for a step compiled by `compile_lowered` on `mesh` (the target's devices).

    Args:
      res: compile_lowered's result.
      mesh: the mesh it was compiled for.
      target: the TPU slice(s) or GPUs (memory per device, peak).
      tokens: tokens per step.
      analytic_flops: the model's FLOPs per step (GPTConfig.flops_per_token x tokens).

    Returns:
      Lines ending with exactly `fits: yes (X GiB of Y GiB per chip)` (`per device` for GPUs)
      or `fits: no (...)`.
    """
    devices = mesh.devices.flatten()
    n, unit, hbm = len(devices), target.unit, target.memory
    lines = [f"compile for {target.label}: {n} {devices[0].device_kind} "
             f"devices, mesh {dict(mesh.shape)}: {res['seconds']:.1f} s", *target.notes]
    if "error" in res:
        return lines + [f"fits: no ({res['error']})"]
    compiled = res["compiled"]
    ma = compiled.memory_analysis()
    args, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    temp, alias = int(ma.temp_size_in_bytes), int(ma.alias_size_in_bytes)
    code = int(getattr(ma, "generated_code_size_in_bytes", 0))
    used = args + out - alias + temp + code
    lines.append(f"XLA memory per {unit}: arguments (params + optimizer state + batch) "
                 f"{_gib(args)}, outputs {_gib(out)} (aliased {_gib(alias)}), temporaries "
                 f"{_gib(temp)}, code {_gib(code)}; total {_gib(used)} of "
                 f"{_gib(hbm) if hbm else 'unknown'} {'HBM' if unit == 'chip' else 'usable'}")
    xla = _xla_flops(compiled)
    xla_text = ("not reported by this compiler" if xla is None else
                f"{xla * n:.3e} ({xla:.3e} per {unit}; it under-counts scanned layers and "
                "includes remat recompute)")
    lines.append(f"FLOPs per step: analytic {analytic_flops:.3e} (flops_per_token x {tokens:,} "
                 f"tokens); XLA cost analysis {xla_text}")
    peak = target.peak or datasheet_peak(devices[0])
    if peak:
        for m in MFU_TARGETS:
            step = analytic_flops / (n * peak * m)
            lines.append(f"at {m:.0%} MFU ({peak / 1e12:.0f} TFLOP/s bf16 per {unit}): "
                         f"{step * 1e3:.3g} ms/step, {tokens / step * 86400:,.3e} tokens/day")
    if hbm is not None and used > hbm:
        return lines + [f"fits: no ({_gib(used)} needed, {_gib(hbm)} per {unit})"]
    return lines + [f"fits: yes ({used / GIB:.2f} GiB of "
                    f"{(hbm / GIB if hbm else float('nan')):.2f} GiB per {unit})"]
