"""Fused kernels under shard_map: the mesh and platform come from the trace's context.

The 8-device checks run in a subprocess (tests/multidevice_kernels.py) because the fake device
count must be set before jax is imported.
"""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from conftest import REPO
from gptjax import sharding as shd
from gptjax.nn import attention as A
from gptjax.nn.kernels import context_mesh, mesh_platform


def test_no_mesh_means_default_backend_and_direct_call():
    assert context_mesh() is None
    assert mesh_platform() == jax.default_backend()


def test_mesh_platform_reads_the_context_mesh():
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh):
        assert context_mesh() is not None
        assert mesh_platform() == jax.devices()[0].platform
    with mesh:
        assert context_mesh() is mesh


def test_pallas_on_a_one_device_mesh_equals_xla():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 32, 2, 8)) for i in range(3))
    mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    ref = A.attention(q, k, v, None, None, window=8, impl="xla")
    with mesh:
        out = jax.jit(lambda q, k, v: A.attention(q, k, v, None, None, window=8,
                                                  impl="pallas"))(q, k, v)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)


def test_pallas_under_shard_map_on_eight_devices():
    """data, fsdp, tensor and data2 x fsdp2 x tensor2 meshes; dense and banded; outputs + grads."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(REPO / "tests" / "multidevice_kernels.py")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-2000:])
    assert r.returncode == 0, r.stdout[-3000:]
    assert " passed" in r.stdout and "skipped" not in r.stdout and "failed" not in r.stdout


def test_auto_follows_an_abstract_tpu_mesh_not_the_host():
    from jax._src.mesh import AbstractDevice  # no public constructor in jax 0.10
    tpu = AbstractDevice(device_kind="TPU v5 lite", num_cores=None, platform="tpu")
    mesh = jax.sharding.AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"), abstract_device=tpu)
    q = jnp.zeros((2, 8, 2, 4))
    with jax.sharding.use_abstract_mesh(mesh):
        assert mesh_platform() == "tpu"
        assert A._choose_auto(q, None, False) == ("splash", None)


def _tpu_topology_devices():
    try:
        from jax.experimental import topologies
        return topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    except Exception as e:  # libtpu missing (or unusable) on this host
        pytest.skip(f"libtpu is not installed ({type(e).__name__}); pip install -e '.[tpu]'")


@pytest.mark.parametrize("shape", [(1, 2, 2), (4, 1, 1)], ids=["fsdp2xtensor2", "data4"])
def test_auto_compiles_splash_under_shard_map_for_v5e(shape):
    """Ahead-of-time for a v5e:2x2 slice from this host: auto picks splash and Mosaic compiles
    it inside shard_map, forward and backward, dense and banded."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    mesh = Mesh(np.asarray(_tpu_topology_devices()).reshape(shape), shd.MESH_AXES)
    x = jax.ShapeDtypeStruct((8, 256, 4, 64), jnp.bfloat16,
                             sharding=NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
    for window in (None, 128):
        def loss(q, k, v):
            with nn.logical_axis_rules(shd.DEFAULT_RULES):
                o = A.attention(q, k, v, None, None, window=window, impl="auto")
            return jnp.sum(o.astype(jnp.float32))
        # conftest asks for 'highest' fp32 matmuls; Mosaic rejects that on bf16 dots ("Bad lhs
        # type"), so compile under TPU's default precision, as a user's run would.
        with mesh, jax.default_matmul_precision("default"):
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
        assert "tpu_custom_call" in compiled.as_text()
