"""Sharded training on 8 fake CPU devices equals one device (run by tests/test_sharding.py).

This module needs `XLA_FLAGS=--xla_force_host_platform_device_count=8` set before jax is
imported, so test_sharding.py runs it in a subprocess; it is not collected on its own.
"""

import functools

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gptjax.defaults import base_config, model_config
from gptjax import sharding as shd
from gptjax.runs.checkpoint import Checkpointer
from gptjax.train.experiment import model_config_from
from gptjax.train.setup import Setup

MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


def _config(mesh=(1, 1, 1)) -> ml_collections.ConfigDict:
    c = base_config()
    c.model = model_config("tiny", vocab_size=256, n_layer=2, n_head=4, n_embd=64, n_ctx=32,
                           embd_pdrop=0.1, attn_pdrop=0.1, resid_pdrop=0.1)
    c.optim.warmup_steps = 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.train.batch_size = 8
    return c


@functools.lru_cache(maxsize=None)
def _setup(mesh):
    """The trainer's Setup on `mesh`, built once per mesh for the whole module: the tests that
    step, differentiate, lay out or restore on a mesh share its compiled functions."""
    c = _config(mesh)
    devices = jax.devices()[:1] if mesh == (1, 1, 1) else None
    return Setup(c, model_config_from(c), 10, devices=devices)


def _batch(seed=0):
    x = np.random.RandomState(seed).randint(0, 256, (8, 33)).astype(np.int32)
    return {"inputs": x[:, :-1], "targets": x[:, 1:]}


def _two_steps(setup, state=None):
    with setup.mesh:
        if state is None:
            state = setup.init_state(jax.random.key(0))
        losses = []
        for i in range(2):
            state, m = setup.train_step(state, setup.put_batch(_batch(i)), jax.random.key(1))
            losses.append(float(m["loss"]))
    return state, losses


def test_eight_devices_available():
    assert jax.device_count() == 8, jax.devices()


@pytest.fixture(scope="module")
def reference():
    state, losses = _two_steps(_setup((1, 1, 1)))
    return jax.device_get(state.params), losses


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_steps_equal_one_device(mesh, reference):
    ref_params, ref_losses = reference
    setup = _setup(mesh)
    state, losses = _two_steps(setup)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6)
    got = jax.device_get(state.params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                            jax.tree_util.tree_leaves(ref_params)):
        name = jax.tree_util.keystr(path)
        if name.endswith("['c_attn']['bias']"):
            # The key bias has an analytically zero gradient (softmax is shift-invariant per
            # query), so its float noise differs with the reduction order and Adam, which divides
            # by sqrt(v), turns that noise into steps of up to lr. Queries and values are exact.
            np.testing.assert_allclose(a[[0, 2]], b[[0, 2]], atol=5e-5, err_msg=name)
            assert np.abs(a[1] - b[1]).max() <= 2 * 2 * 1e-3, name
        else:
            # Adam's first steps are nearly sign(g) * lr, so an entry whose gradient is at
            # rounding level may move by up to 2 lr (two steps) with another reduction order:
            # all but 0.1% of the entries within 5% of lr, none beyond 4 lr. The gradients
            # themselves are compared at fp32 tolerance below.
            off = np.abs(a - b) > 5e-5
            assert off.mean() < 1e-3, (name, int(off.sum()), off.size)
            assert np.abs(a - b).max() <= 2 * 2 * 1e-3, name


def _grads(setup):
    from gptjax.nn.losses import lm_loss
    from gptjax.nn.model import GPT

    mc = setup.model_cfg

    def fn(p, b):
        return jax.grad(lambda q: lm_loss(GPT(mc).apply({"params": q}, b["inputs"]),
                                          b["targets"]))(p)

    with setup.mesh:
        state = setup.init_state(jax.random.key(0))
        g = jax.jit(fn, in_shardings=(setup.state_shardings.params, setup.batch_sharding),
                    out_shardings=setup.state_shardings.params)(state.params,
                                                                setup.put_batch(_batch()))
    return jax.device_get(g)


@pytest.fixture(scope="module")
def reference_grads():
    return _grads(_setup((1, 1, 1)))


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_gradients_equal_one_device(mesh, reference_grads):
    ref = reference_grads
    got = _grads(_setup(mesh))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("mesh", MESHES)
def test_every_parameter_is_sharded_as_the_rules_say(mesh):
    setup = _setup(mesh)
    with setup.mesh:
        state = setup.init_state(jax.random.key(0))
    specs = jax.tree_util.tree_leaves(setup.logical_specs, is_leaf=lambda x: isinstance(x, P))
    arrays = jax.tree_util.tree_leaves_with_path(state.params)
    assert len(specs) == len(arrays)
    data, fsdp, tensor = mesh
    for (path, arr), logical in zip(arrays, specs):
        name = jax.tree_util.keystr(path)
        expected = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec(
            *[None if a is None else dict(setup.rules)[a] for a in logical]))
        assert arr.sharding.is_equivalent_to(expected, arr.ndim), name
        # Nothing replicated by accident: a weight with an `embed` axis is split over fsdp, and
        # one with a heads/mlp/vocab axis over tensor.
        n = shd.shard_count(arr.sharding, arr.ndim)
        want = (fsdp if "embed" in logical else 1) * (
            tensor if {"heads", "mlp", "vocab"} & set(logical) else 1)
        assert n == want, (name, n, want)
        local = arr.addressable_shards[0].data.shape
        assert np.prod(local) * n == arr.size, name  # really split, not a full copy per device
    # Adam's moments follow their parameters' layout.
    mu = state.opt_state[1][0].mu
    for a, b in zip(jax.tree_util.tree_leaves(mu), jax.tree_util.tree_leaves(state.params)):
        assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


def test_batch_is_split_over_data_and_fsdp():
    setup = _setup((2, 2, 2))
    b = setup.put_batch(_batch())
    assert b["inputs"].addressable_shards[0].data.shape == (2, 32)


def test_checkpoint_reshards_across_meshes(tmp_path):
    src = _setup((2, 2, 2))
    with src.mesh:
        state = src.init_state(jax.random.key(0))
        state, _ = src.train_step(state, src.put_batch(_batch(0)), jax.random.key(1))
    ck = Checkpointer(str(tmp_path / "ck"), async_save=False)
    ck.save(1, state, {"note": "written on (2,2,2)"})
    ck.wait()
    _, ref = _two_steps(src, state)
    for mesh in [(1, 8, 1), (1, 1, 1), (1, 2, 4)]:
        dst = _setup(mesh)
        with dst.mesh:
            restored, meta = ck.restore(dst.abstract_sharded_state())
        assert meta["note"] == "written on (2,2,2)"
        leaf = jax.tree_util.tree_leaves(restored.params)[0]
        assert leaf.sharding.mesh.shape == dst.mesh.shape
        _, losses = _two_steps(dst, restored)
        np.testing.assert_allclose(losses, ref, rtol=2e-6)
    ck.close()


def test_mesh_errors_are_one_line():
    with pytest.raises(shd.ShardingError, match="needs 16 devices but 8 are available"):
        shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 4})
    c = _config((1, 1, 8))  # 4 heads cannot split 8 ways
    with pytest.raises(shd.ShardingError, match="not divisible by mesh axes"):
        Setup(c, model_config_from(c), 10)
    c = _config((2, 2, 2))
    c.mesh.rules = [["batch", ["data", "fsdp"]], ["embed", "fsdp"]]
    with pytest.raises(shd.ShardingError, match="has no rule"):
        Setup(c, model_config_from(c), 10)


# ================================================================================ LoRA
@functools.lru_cache(maxsize=None)
def _lora_setup(mesh, weights):
    """A LoraSetup (rank 4, the four matrices) over the fp32 init of `_config`'s model, held as
    `weights`, on `mesh`."""
    from gptjax.nn.model import init_params
    from gptjax.train.lora_setup import LoraSetup
    from gptjax.train.start import lora_settings
    c = _config(mesh)
    c.lora.rank, c.lora.targets, c.lora.base_weights = 4, "all", weights
    c.init.kind = "hf"
    mc = model_config_from(c)
    setup = LoraSetup(c, mc, 10, lora_settings(c),
                      devices=jax.devices()[:1] if mesh == (1, 1, 1) else None)
    setup.set_base(init_params(mc, jax.random.key(0)))
    return setup


# One mesh (fsdp x tensor, a bf16 base) covers both axes a base is split over; a second case cost
# ~30 s of CI for no new axis.
@pytest.mark.parametrize("mesh, weights", [((1, 2, 4), "bf16")])
def test_lora_steps_on_a_sharded_base_equal_one_device(mesh, weights):
    ref_setup, setup = _lora_setup((1, 1, 1), weights), _lora_setup(mesh, weights)
    base_before = jax.device_get(setup.base)
    ref_state, ref_losses = _two_steps(ref_setup)
    state, losses = _two_steps(setup)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(jax.device_get(state.params)),
                            jax.tree_util.tree_leaves(jax.device_get(ref_state.params))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The base is sharded (the fsdp/tensor axes of its kernels), not donated, never changed.
    for (path, x0), x1 in zip(jax.tree_util.tree_leaves_with_path(base_before),
                              jax.tree_util.tree_leaves(setup.base)):
        np.testing.assert_array_equal(x0, jax.device_get(x1), err_msg=jax.tree_util.keystr(path))
    fc = setup.base["h_0"]["mlp"]["c_fc"]
    fc = fc["kernel"] if weights == "fp32" else fc["kernel_q"].values  # (bf16: no scale)
    assert shd.shard_count(fc.sharding, fc.ndim) == 8, fc.sharding  # (embed, mlp) over all 8
    # The adapters follow their kernels' axes (A: input, B: output; rank never split).
    ad = state.params["h_0"]["mlp"]["c_fc"]["adapter"]
    want = {(1, 8, 1): (8, 1), (1, 2, 4): (2, 4)}[mesh]
    assert (shd.shard_count(ad.a.sharding, 2), shd.shard_count(ad.b.sharding, 2)) == want


# ================================================================================ capture
def _captures(setup):
    """Activations and logits of gptjax.nn.inspect on `setup`'s mesh (an intervention too)."""
    from gptjax.nn import inspect

    pats = ["wte", "h_*.attn.probs", "h_*.attn.z", "h_*.mlp.act", "*.resid_post"]

    def fn(p, tokens):
        return inspect.forward_with_capture(setup.model_cfg, p, tokens, pats,
                                            {"h_0.attn.z": inspect.ablate_heads(1)})
    with setup.mesh:
        state = setup.init_state(jax.random.key(0))
        tokens = setup.put_batch(_batch())["inputs"]
        return jax.device_get(jax.jit(setup._with_rules(fn), in_shardings=(
            setup.state_shardings.params, setup.batch_sharding))(state.params, tokens))


def test_captures_on_a_mesh_equal_one_device():
    (ref_logits, ref), (logits, got) = _captures(_setup((1, 1, 1))), _captures(_setup((2, 2, 2)))
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6, atol=1e-6)
    assert sorted(got) == sorted(ref)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-6, atol=1e-6, err_msg=name)


# ================================================================================ per-layer stats
def _layer_stats(mesh):
    """The statistics step (train.layer_stats_every) on `mesh`: per-layer statistics, loss."""
    c = _config(mesh)
    c.train.layer_stats_every = 1
    setup = Setup(c, model_config_from(c), 10,
                  devices=jax.devices()[:1] if mesh == (1, 1, 1) else None)
    with setup.mesh:
        state = setup.init_state(jax.random.key(0))
        _, m = setup.stats_step(state, setup.put_batch(_batch()), jax.random.key(1))
    return jax.device_get(m["layers"]), float(m["loss"])


def test_layer_stats_on_a_mesh_equal_one_device():
    (ref, ref_loss), (got, loss) = _layer_stats((1, 1, 1)), _layer_stats((1, 2, 4))
    np.testing.assert_allclose(loss, ref_loss, rtol=2e-6)
    assert sorted(got) == sorted(ref)
    assert all(len(set(v.tolist())) == 2 and (v > 0).all() for v in ref.values())  # 2 layers
    for name in ("param_norm", "grad_norm", "act_rms"):
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-5, err_msg=name)
    # Adam's first update is about sign(g) * lr: an entry whose gradient is at rounding level
    # (the key bias's, analytically zero) may flip with another reduction order (see above).
    for name in ("update_norm", "update_ratio"):
        np.testing.assert_allclose(got[name], ref[name], rtol=2e-2, err_msg=name)
