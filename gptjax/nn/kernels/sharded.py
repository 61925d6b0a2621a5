"""Fused attention kernels inside `jax.shard_map`, with the mesh and platform of the step's context.

JAX cannot partition a Mosaic (splash) or Triton (Pallas) kernel, so a kernel called directly
inside a mesh-sharded step fails to compile ("Mosaic kernels cannot be automatically
partitioned"). `shard_kernel` runs it per shard instead: the batch axis over the mesh axes the
logical rule for 'batch' names (data, fsdp by default), heads over those of 'heads' (tensor);
the same rules that constrain the activations in gptjax.nn.model, so the kernel's in_specs match
the activations' shardings and no resharding is inserted. Attention is independent per batch row
and per head, so each shard computes exactly its piece. A dimension that its mesh axes do not
divide stays whole (replicated) rather than failing.

The mesh comes from the trace's context: `jax.set_mesh(mesh)` (an AbstractMesh, which names its
platform) or the older `with mesh:`. `mesh_platform` reads the platform of that mesh's devices,
so a step compiled ahead of time for a TPU topology from a CPU host dispatches to splash.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from jax._src import mesh as _mesh_lib  # the `with mesh:` context has no public getter
from jax.sharding import PartitionSpec as P

from gptjax.sharding import DEFAULT_RULES

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def context_mesh() -> Optional[Any]:
    """The mesh the current trace runs under (jax.set_mesh or `with mesh:`), or None."""
    abstract = jax.sharding.get_abstract_mesh()
    if not abstract.empty:
        return abstract
    physical = _mesh_lib.thread_resources.env.physical_mesh
    return None if physical.empty else physical


def mesh_platform(mesh: Optional[Any] = None) -> str:
    """tpu, gpu or cpu: the platform of the context mesh's devices, else the default backend."""
    mesh = context_mesh() if mesh is None else mesh
    platform = None
    if mesh is not None:
        if isinstance(mesh, jax.sharding.AbstractMesh):
            platform = getattr(mesh.abstract_device, "platform", None)
        else:
            platform = mesh.devices.flat[0].platform
    platform = platform or jax.default_backend()
    return "gpu" if platform in _GPU_PLATFORMS else platform


def _mesh_axes(logical: str, rules, mesh, size: int):
    """The mesh axes `logical` maps to under `rules`, or None if they do not divide `size`."""
    axes = nn.logical_to_mesh_axes((logical,), rules)[0]
    if axes is None:
        return None
    axes = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,))
                 if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes if len(axes) > 1 else axes[0]


def shard_kernel(kernel: Callable, q_BxTxHxD: jax.Array, k_BxSxHxD: jax.Array,
                 v_BxSxHxD: jax.Array, q_pos_BxT: Optional[jax.Array] = None,
                 k_pos_BxS: Optional[jax.Array] = None,
                 segment_ids_BxT: Optional[jax.Array] = None) -> jax.Array:
    """kernel(q, k, v, q_pos, k_pos[, seg]) -> [B, T, H, D], inside shard_map under a mesh.

    Without a mesh (or on a one-device mesh) the kernel is called directly.

    Args:
      kernel: the attention kernel on one shard; positions are None when the caller passed None.
      q_BxTxHxD, k_BxSxHxD, v_BxSxHxD: queries, keys, values.
      q_pos_BxT, k_pos_BxS: positions or None (both None: 0..T-1).
      segment_ids_BxT: document ids, passed to the kernel as a sixth argument (sharded over
        the batch like positions); None: the kernel gets five.

    Returns:
      [B, T, H, D] attention output, sharded like q.
    """
    if segment_ids_BxT is not None:
        return _shard_segmented(kernel, q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, k_pos_BxS,
                                segment_ids_BxT)
    mesh = context_mesh()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return kernel(q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, k_pos_BxS)
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    B, _, H, _ = q_BxTxHxD.shape
    batch = _mesh_axes("batch", rules, mesh, B)
    heads = _mesh_axes("heads", rules, mesh, H)
    qkv = P(batch, None, heads, None)
    pos = P(batch, None)
    if q_pos_BxT is None:
        def body(q, k, v):
            return kernel(q, k, v, None, None)
        args, specs = (q_BxTxHxD, k_BxSxHxD, v_BxSxHxD), (qkv, qkv, qkv)
    else:
        body = kernel
        args = (q_BxTxHxD, k_BxSxHxD, v_BxSxHxD, q_pos_BxT, k_pos_BxS)
        specs = (qkv, qkv, qkv, pos, pos)
    # check_vma=False: pallas_call has no varying-manual-axes rule; the body is per shard anyway.
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qkv,
                         check_vma=False)(*args)


def _shard_segmented(kernel, q, k, v, q_pos, k_pos, seg):
    """`shard_kernel` with segment ids: the batch rows' ids travel with their rows."""
    mesh = context_mesh()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return kernel(q, k, v, q_pos, k_pos, seg)
    rules = nn.get_logical_axis_rules() or DEFAULT_RULES
    batch = _mesh_axes("batch", rules, mesh, q.shape[0])
    heads = _mesh_axes("heads", rules, mesh, q.shape[2])
    qkv, pos = P(batch, None, heads, None), P(batch, None)
    if q_pos is None:
        def body(q, k, v, s):
            return kernel(q, k, v, None, None, s)
        args, specs = (q, k, v, seg), (qkv, qkv, qkv, pos)
    else:
        body, args, specs = kernel, (q, k, v, q_pos, k_pos, seg), (qkv, qkv, qkv, pos, pos, pos)
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qkv,
                         check_vma=False)(*args)
