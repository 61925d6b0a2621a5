"""NVIDIA GPUs this host does not have, for XLA's GPU compiler (`--dry_run --topology h100`).

The CUDA plugin (`pip install -e ".[gpu-aot]"`: jax[cuda12], its nvidia wheels with cuDNN and
ptxas) compiles for a GPU described by a GpuTargetConfig text proto, no GPU or driver needed:
`jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=..., topology=
"1x1x8")` gives a node of 8 such devices. The descriptions are the data files in
gptjax/train/gpu_specs/ (each citing its source); the installed cuDNN's version is added at load
time, as a real GPU would report it (XLA compiles cuDNN kernels without a GPU from cuDNN 9.8 on).

Names: `h100` one GPU, `h100:8` one node of 8, `h100:2x8` two nodes of 8 (one mesh of 16).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.metadata
import importlib.util
import os
import re

GPU_INSTALL_HINT = ('compiling for a GPU topology needs the CUDA plugin, which is not installed: '
                    'pip install -e ".[gpu-aot]"')
_SPECS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_specs")
# JAX's GPU client preallocates this fraction of the device's memory for its allocator
# (XLA_PYTHON_CLIENT_MEM_FRACTION; https://docs.jax.dev/en/latest/gpu_memory_allocation.html).
DEFAULT_MEM_FRACTION = 0.75


@dataclasses.dataclass(frozen=True)
class GPU:
    """One GPU model: its spec file and the datasheet's dense bf16 tensor-core peak."""
    spec: str             # file in gpu_specs/
    peak_bf16: float      # FLOP/s, dense (the datasheets' headline figures are with sparsity)
    source: str           # where peak_bf16 comes from


GPUS = {
    "h100": GPU("h100.txtpb", 989.4e12, "NVIDIA H100 datasheet, SXM5: BF16 tensor core "
                "1,979 TFLOPS with sparsity, 989.4 dense"),
    "h200": GPU("h200.txtpb", 989.4e12, "NVIDIA H200 datasheet, SXM: BF16 tensor core 1,979 "
                "TFLOPS with sparsity, 989.4 dense"),
    "a100-40gb": GPU("a100-40gb.txtpb", 312e12, "NVIDIA A100 datasheet: BF16 tensor core 312 "
                     "TFLOPS (624 with sparsity)"),
    "a100-80gb": GPU("a100-80gb.txtpb", 312e12, "NVIDIA A100 datasheet: BF16 tensor core 312 "
                     "TFLOPS (624 with sparsity)"),
    "l4": GPU("l4.txtpb", 121e12, "NVIDIA L4 datasheet: BF16 tensor core 242 TFLOPS with "
              "sparsity, 121 dense"),
    "rtx4090": GPU("rtx4090.txtpb", 165.2e12, "NVIDIA Ada Lovelace whitepaper, appendix A: "
                   "RTX 4090 peak BF16 tensor TFLOPS with FP32 accumulate 165.2 (330.4 sparse)"),
}
_TPU_NAME = re.compile(r"v\d", re.IGNORECASE)


def gpu_name(topology: str) -> str | None:
    """The GPU model of a topology name ('h100:2x8' -> 'h100'), or None for a TPU slice's name.

    Raises:
      ValueError: a name that is neither a known GPU nor a TPU slice (one line, the known ones).
    """
    name = topology.partition(":")[0].lower()
    if name in GPUS:
        return name
    if _TPU_NAME.match(name):
        return None
    raise ValueError(f"--topology {topology!r}: known GPUs are {', '.join(GPUS)} (':8' for a node "
                     "of 8, ':2x8' for two nodes); TPU slices are named like v5e:2x2, v5p:4x4x8")


def gpu_layout(topology: str) -> tuple:
    """(nodes, GPUs per node) of a GPU name: 'h100' (1, 1), 'h100:8' (1, 8), 'h100:2x8' (2, 8)."""
    dims = topology.partition(":")[2]
    m = re.fullmatch(r"(?:(\d+)x)?(\d+)", dims) if dims else None
    if dims and (m is None or int(m.group(2)) < 1 or (m.group(1) and int(m.group(1)) < 1)):
        raise ValueError(f"--topology {topology!r}: a GPU count is GPUS (one node, e.g. h100:8) or "
                         "NODESxGPUS (e.g. h100:2x8)")
    return (int(m.group(1) or 1), int(m.group(2))) if m else (1, 1)


def cuda_plugin_available() -> bool:
    """Whether jax's CUDA plugin is importable (the `gpu-aot` extra is installed)."""
    return (importlib.util.find_spec("jax_cuda12_plugin") is not None
            and importlib.util.find_spec("jax_plugins") is not None)


def cudnn_version() -> tuple:
    """(major, minor, patch) of the installed cuDNN wheel (nvidia-cudnn-cu12), or (9, 8, 0)."""
    try:
        parts = importlib.metadata.version("nvidia-cudnn-cu12").split(".")
        return tuple(int(p) for p in parts[:3])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return (9, 8, 0)


def target_config(name: str) -> str:
    """The GpuTargetConfig text proto of GPU `name`, with the installed cuDNN's version."""
    with open(os.path.join(_SPECS, GPUS[name].spec)) as fh:
        text = fh.read()
    major, minor, patch = cudnn_version()
    return text + f"dnn_version_info {{ major: {major} minor: {minor} patch: {patch} }}\n"


def device_memory(name: str) -> int:
    """Bytes of memory of one GPU `name` (its spec's device_memory_size)."""
    m = re.search(r"device_memory_size:\s*(\d+)", target_config(name))
    return int(m.group(1))


def allocator_fraction() -> float:
    """The fraction of a GPU's memory JAX's allocator gets (1.0 without preallocation)."""
    if (os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "").lower() in ("false", "0")
            or os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR") == "platform"):
        return 1.0
    return float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_MEM_FRACTION))


def gpu_devices(topology: str) -> list:
    """The devices of GPU topology `topology` ('h100', 'h100:8', 'h100:2x8'); no GPU needed."""
    name = gpu_name(topology)
    nodes, per_node = gpu_layout(topology)
    if not cuda_plugin_available():
        raise RuntimeError(GPU_INSTALL_HINT)
    if not glob.glob("/dev/nvidiactl"):
        # No driver here: the plugin's start-up check (cuInit) would fail; skip it.
        os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    from jax.experimental import topologies  # heavy: loads the CUDA plugin, only for --topology
    desc = topologies.get_topology_desc(platform="cuda", target_config=target_config(name),
                                        topology=f"{nodes}x1x{per_node}")
    return list(desc.devices)
