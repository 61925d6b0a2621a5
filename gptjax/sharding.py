"""Device meshes and logical-axis rules: how parameters, optimizer state and batches are laid out.

The model names every parameter axis logically (`vocab`, `embed`, `mlp`, `heads`, `head_dim`,
`position`, `layers`) and every activation axis (`batch`, `length`, ...). The experiment config
names the mesh axes and maps logical names to them; this module turns that into `NamedSharding`s
for `jax.jit(in_shardings=..., out_shardings=...)`. The default rules give:

- data parallel over `data` (the batch axis only);
- FSDP / ZeRO-3 over `fsdp`: the batch is split over it too, and every weight is split along
  its `embed` axis, so parameters and optimizer state are divided by the fsdp size;
- Megatron-style tensor parallelism over `tensor`: attention heads and the MLP hidden axis are
  split (column-parallel c_attn/c_fc, row-parallel c_proj), as is the vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("position", None),
    ("layers", None),
)


class ShardingError(ValueError):
    """A mesh or sharding request that cannot be satisfied; the message names the value."""


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict:
    """Fill in a single -1 ("the rest") and check the product equals the device count."""
    shape = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    unknown = [a for a, v in shape.items() if v == -1]
    if len(unknown) > 1:
        raise ShardingError(f"mesh {shape}: at most one axis may be -1")
    for a, v in shape.items():
        if v == 0 or v < -1:
            raise ShardingError(f"mesh axis {a}={v}: sizes are positive integers or -1")
    known = math.prod(v for v in shape.values() if v != -1)
    if unknown:
        if num_devices % known:
            raise ShardingError(f"mesh {shape}: {num_devices} devices are not divisible by "
                                f"{known}, so -1 cannot be filled")
        shape[unknown[0]] = num_devices // known
    total = math.prod(shape.values())
    if total != num_devices:
        raise ShardingError(f"mesh {shape} needs {total} devices but {num_devices} are "
                            "available; make the product of the axis sizes equal the device count")
    return shape


def parse_mesh(value: Union[str, Mapping[str, int]]) -> dict:
    """'fsdp=4,tensor=2' (or a dict) -> {'data': -1, 'fsdp': 4, 'tensor': 2}.

    The axes are train.py's `config.mesh` ones (data, fsdp, tensor); an axis not named is 1,
    except `data`, which takes the rest of the devices (-1) unless another axis already does.

    Raises:
      ShardingError: an unknown axis or a size that is not an integer (one line).
    """
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    else:
        items = [item.partition("=")[::2] for item in str(value).split(",") if item.strip()]
    shape = {}
    for axis, size in items:
        axis = axis.strip()
        if axis not in MESH_AXES:
            raise ShardingError(f"mesh {value!r}: unknown axis {axis!r}; the axes are "
                                f"{', '.join(MESH_AXES)} (e.g. fsdp=4,tensor=2)")
        try:
            shape[axis] = int(size)
        except (TypeError, ValueError):
            raise ShardingError(f"mesh {value!r}: {axis}={size!r} is not an integer size (or -1: "
                                "the rest of the devices)") from None
    if not shape:
        raise ShardingError(f"mesh {value!r}: name at least one axis, e.g. fsdp=4,tensor=2")
    rest = -1 if -1 not in shape.values() else 1
    return {a: shape.get(a, rest if a == "data" else 1) for a in MESH_AXES}


def make_mesh(shape: Mapping[str, int], dcn_shape: Optional[Mapping[str, int]] = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp', 'tensor').

    Args:
      shape: per-slice (ICI) axis sizes; one may be -1.
      dcn_shape: axis sizes across slices/hosts over the data-centre network (multi-slice TPU or
        multi-node GPU); the full mesh axis is ici * dcn. None or all ones: a single slice.
      devices: devices to use (default: all).
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = {a: int((dcn_shape or {}).get(a, 1)) for a in MESH_AXES}
    n_slices = math.prod(dcn.values())
    if len(devices) % n_slices:
        raise ShardingError(f"dcn mesh {dcn}: {len(devices)} devices are not divisible into "
                            f"{n_slices} slices")
    ici = resolve_mesh_shape(shape, len(devices) // n_slices)
    ici_shape = [ici[a] for a in MESH_AXES]
    if n_slices > 1:
        arr = mesh_utils.create_hybrid_device_mesh(ici_shape, [dcn[a] for a in MESH_AXES],
                                                   devices=devices)
    else:
        try:
            arr = mesh_utils.create_device_mesh(ici_shape, devices=devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Topology-unaware fallback (e.g. fake CPU devices): plain row-major order.
            arr = np.asarray(devices).reshape(ici_shape)
    return Mesh(arr, MESH_AXES)


def rules_from_config(rules: Optional[Sequence]) -> tuple:
    """Normalise rules from a config (lists from JSON/ConfigDict) into flax's tuple form."""
    if rules is None:
        return DEFAULT_RULES
    out = []
    for name, axes in rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ShardingError(f"logical rule {name!r} -> {a!r}: mesh axes are {MESH_AXES}")
        out.append((name, axes))
    return tuple(out)


def logical_to_shardings(logical_tree: Any, mesh: Mesh, rules: Sequence) -> Any:
    """PartitionSpecs of logical names -> NamedShardings on `mesh`."""
    return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def check_rules_cover(logical_specs: Any, rules: Sequence) -> None:
    """Every logical axis name used by a parameter must have a rule (None = replicate on purpose).

    Without this, a renamed axis would silently fall back to replication.
    """
    known = {name for name, _ in rules}
    for path, spec in jax.tree_util.tree_leaves_with_path(
            logical_specs, is_leaf=lambda x: isinstance(x, P)):
        for name in spec:
            if name is not None and name not in known:
                raise ShardingError(
                    f"logical axis {name!r} of parameter {jax.tree_util.keystr(path)} has no "
                    f"rule in mesh.rules (rules cover {sorted(known)}); add one, with None to "
                    "replicate it explicitly")


def shard_count(sharding: NamedSharding, ndim: int) -> int:
    """Into how many pieces a NamedSharding cuts an array (1 = replicated)."""
    n = 1
    for axes in tuple(sharding.spec)[:ndim]:
        if axes is None:
            continue
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            n *= sharding.mesh.shape[a]
    return n


def check_divisible(shapes: Any, shardings: Any) -> None:
    """Every sharded dimension must divide evenly by its mesh axes (else a one-line error)."""
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_sh = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
    for (path, shp), sh in zip(flat_shapes, flat_sh):
        mesh = sh.mesh
        for dim, axes in zip(shp.shape, tuple(sh.spec) + (None,) * len(shp.shape)):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            n = math.prod(mesh.shape[a] for a in axes)
            if dim % n:
                name = jax.tree_util.keystr(path)
                raise ShardingError(
                    f"parameter {name} dimension {dim} is not divisible by mesh axes {axes} "
                    f"(size {n}); pad it (e.g. vocab_size to a multiple of 128) or change the "
                    "mesh/rules")


def batch_sharding(mesh: Mesh, rules: Sequence, ndim: int = 2) -> NamedSharding:
    """Sharding of a [B, T, ...] batch: B over the rule for 'batch', the rest replicated."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a whole copy on every device of `mesh`."""
    return NamedSharding(mesh, P())
