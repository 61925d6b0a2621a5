"""The Pallas flash kernel under shard_map on 8 fake CPU devices (run by test_sharded_kernels.py).

Needs `XLA_FLAGS=--xla_force_host_platform_device_count=8` set before jax is imported, so
tests/test_sharded_kernels.py runs it in a subprocess; it is not collected on its own.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from gptjax import sharding as shd
from gptjax.nn import attention as A

MESHES = {"data": (8, 1, 1), "fsdp": (1, 8, 1), "tensor": (1, 1, 4), "mixed": (2, 2, 2)}
B, T, H, D = 8, 64, 4, 16


def _qkv():
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v, g = (jax.random.normal(kk, (B, T, H, D), jnp.float32) for kk in ks)
    return q, k, v, g


def _loss_and_grads(impl, window, mesh=None):
    q, k, v, g = _qkv()

    def loss(q, k, v):
        with nn.logical_axis_rules(shd.DEFAULT_RULES):
            q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
            o = A.attention(q, k, v, None, None, window=window, impl=impl)
        return jnp.sum(o * g), o

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    if mesh is None:
        (_, o), grads = fn(q, k, v)
        return o, grads, None
    sh = NamedSharding(mesh, P(("data", "fsdp"), None, "tensor", None))
    q, k, v = (jax.device_put(x, sh) for x in (q, k, v))
    with mesh:
        hlo = fn.lower(q, k, v).as_text()
        (_, o), grads = fn(q, k, v)
    return o, grads, hlo


@pytest.fixture(scope="module", params=[None, 16], ids=["dense", "banded"])
def reference(request):
    window = request.param
    o, grads, _ = _loss_and_grads("xla", window)
    return window, o, grads


def test_eight_devices_available():
    assert jax.device_count() == 8, jax.devices()


@pytest.mark.parametrize("name", list(MESHES))
def test_pallas_under_shard_map_equals_xla(reference, name):
    window, o_ref, g_ref = reference
    shape = MESHES[name]
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), devices=devices)
    o, grads, hlo = _loss_and_grads("pallas", window, mesh)
    assert "manual_computation" in hlo or "SPMDFullToShardShape" in hlo  # shard_map is there
    np.testing.assert_allclose(np.asarray(o), np.asarray(o_ref), atol=2e-5, rtol=2e-5)
    for a, b in zip(grads, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5)


def test_pallas_with_ragged_positions_under_shard_map():
    """Left-padded rows (position -1): the positions are sharded with the batch."""
    q, k, v, _ = _qkv()
    pad = np.arange(B) % 4 * 3
    pos = np.arange(T)[None, :] - pad[:, None]
    pos = jnp.asarray(np.where(pos < 0, -1, pos), jnp.int32)
    ref = A.attention(q, k, v, pos, pos, window=16, impl="xla")
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with mesh:
        out = jax.jit(lambda *a: A.attention(*a, window=16, impl="pallas"))(q, k, v, pos, pos)
    valid = np.asarray(pos >= 0)
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(ref)[valid], atol=2e-5,
                               rtol=2e-5)


def test_train_step_with_pallas_on_a_mixed_mesh_equals_xla():
    from gptjax.defaults import base_config, model_config
    from gptjax.train.experiment import model_config_from
    from gptjax.train.setup import Setup

    x = np.random.RandomState(0).randint(0, 256, (8, 33)).astype(np.int32)
    losses = {}
    for impl in ("xla", "pallas"):
        c = base_config()
        c.model = model_config("tiny", vocab_size=256, n_layer=2, n_head=4, n_embd=64, n_ctx=32,
                               attention_impl=impl, attn_pdrop=0.0, embd_pdrop=0.0,
                               resid_pdrop=0.0)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
        c.train.batch_size = 8
        c.optim.warmup_steps = 0
        setup = Setup(c, model_config_from(c), 10)
        with setup.mesh:
            state = setup.init_state(jax.random.key(0))
            out = []
            for _ in range(2):
                batch = setup.put_batch({"inputs": x[:, :-1], "targets": x[:, 1:]})
                state, m = setup.train_step(state, batch, jax.random.key(1))
                out.append(float(m["loss"]))
        losses[impl] = out
    np.testing.assert_allclose(losses["pallas"], losses["xla"], rtol=1e-5)


def test_pallas_with_segment_ids_under_shard_map():
    """Document-masked rows (each row its own boundaries): the ids are sharded with the batch."""
    q, k, v, _ = _qkv()
    cuts = np.arange(B)[:, None] * 5 + 3
    seg = jnp.asarray((np.arange(T)[None, :] >= cuts).astype(np.int32)
                      + (np.arange(T)[None, :] >= cuts + 20))
    ref = A.attention(q, k, v, None, None, window=16, impl="xla", segment_ids_BxT=seg)
    mesh = shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with mesh:
        out = jax.jit(lambda q, k, v, s: A.attention(q, k, v, None, None, window=16,
                                                     impl="pallas", segment_ids_BxT=s))(q, k, v,
                                                                                        seg)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-5, rtol=2e-5)
