"""Per-layer statistics in training (train.layer_stats_every, gptjax.train.layer_stats): the
step's norms against jax.grad taken outside it, the off program unchanged, a run's log and plot."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_corpus, tiny_run_config
from gptjax.config import ConfigError, GPTConfig
from gptjax.defaults import base_config, complete, model_config
from gptjax.nn.losses import lm_loss
from gptjax.nn.model import GPT, Block, init_params
from gptjax.nn.param_layout import unstack_layers
from gptjax.train import topology as topo
from gptjax.train.experiment import check_train_config, model_config_from
from gptjax.train.layer_stats import STATS
from gptjax.train.loop import train_and_evaluate
from gptjax.train.optim import make_optimizer
from gptjax.train.setup import Setup
from gptjax.train.step import TrainState, make_train_step

V, T = 64, 16


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


def _per_layer_norms(cfg: GPTConfig, tree) -> np.ndarray:
    """Each layer's L2 norm in float64, from the per-layer layout (`h_{i}`)."""
    if cfg.scan_layers:
        tree = unstack_layers(cfg, tree)
    return np.array([math.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                                   for x in jax.tree.leaves(tree[f"h_{i}"])))
                     for i in range(cfg.n_layer)])


def _block_rms(cfg: GPTConfig, params, inputs) -> np.ndarray:
    """Each block's output RMS from flax's own capture of the blocks' outputs (no sow), on the
    per-layer model."""
    looped = cfg.with_execution(scan_layers=False, remat="none")
    if cfg.scan_layers:
        params = unstack_layers(cfg, params)

    @jax.jit
    def block_outputs(params):
        _, inter = GPT(looped).apply({"params": params}, inputs, mutable=["intermediates"],
                                     capture_intermediates=lambda m, _: isinstance(m, Block))
        return [inter["intermediates"][f"h_{i}"]["__call__"][0][0] for i in range(cfg.n_layer)]
    outs = block_outputs(params)
    return np.array([math.sqrt(np.mean(np.asarray(x, np.float64) ** 2)) for x in outs])


# A GPT-3-like period of two blocks (dense, local) makes layer i period i // 2's block i % 2 when
# scanned: the stacked leading axis is split into layers, not summed.
CASES = {
    "looped": dict(scan_layers=False, n_layer=2, accum=1, remat="none"),
    "scanned_accum_remat": dict(scan_layers=True, n_layer=4, accum=2, remat="full"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_stats_equal_norms_of_jax_grad_outside_and_the_step_is_unchanged(case):
    c = CASES[case]
    cfg = GPTConfig(vocab_size=V, n_ctx=T, n_layer=c["n_layer"], n_head=2, n_embd=32,
                    embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0,
                    attention_pattern=("dense", "local"), local_window=4,
                    scan_layers=c["scan_layers"], remat=c["remat"])
    tx, sched = make_optimizer(base_config().optim, 1000)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    tokens = np.random.default_rng(1).integers(0, V, (4, T + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    rng = jax.random.key(2)
    off = jax.jit(make_train_step(cfg, tx, sched, accum_steps=c["accum"]))
    on = jax.jit(make_train_step(cfg, tx, sched, accum_steps=c["accum"], layer_stats=True))
    # One plain step first: the learning rate is > 0 and Adam's moments are not zero. Nothing is
    # donated: both steps below start from `state`.
    state, _ = off(TrainState(jnp.zeros((), jnp.int32), params, tx.init(params)), batch, rng)
    s_on, m_on = on(state, batch, rng)
    s_off, m_off = off(state, batch, rng)
    # The statistics change nothing the step computes: state, loss and metrics to the last bit.
    assert _same(s_on, s_off)
    assert set(m_on) == set(m_off) | {"layers"}
    assert _same({k: m_on[k] for k in m_off}, m_off)
    layers = jax.device_get(m_on["layers"])
    assert set(layers) == set(STATS)
    assert all(v.shape == (cfg.n_layer,) and v.dtype == np.float32 for v in layers.values())

    # Outside the step (jitted on their own, for speed): jax.grad of the whole batch's loss (the
    # microbatches' mean), the optimizer's update of those gradients, the blocks' outputs
    # captured by flax.
    def loss_fn(p):
        return lm_loss(GPT(cfg).apply({"params": p}, batch["inputs"]), batch["targets"])
    grads = jax.jit(jax.grad(loss_fn))(state.params)
    updates, _ = jax.jit(tx.update)(grads, state.opt_state, state.params)
    g_ref = _per_layer_norms(cfg, grads)
    np.testing.assert_allclose(layers["grad_norm"], g_ref, rtol=1e-6, atol=0)
    p_ref = _per_layer_norms(cfg, state.params)
    np.testing.assert_allclose(layers["param_norm"], p_ref, rtol=1e-6, atol=0)
    u_ref = _per_layer_norms(cfg, updates)
    np.testing.assert_allclose(layers["update_norm"], u_ref, rtol=1e-5, atol=0)
    np.testing.assert_allclose(layers["update_ratio"], u_ref / p_ref, rtol=1e-5, atol=0)
    np.testing.assert_allclose(layers["act_rms"], _block_rms(cfg, state.params,
                                                             batch["inputs"]), rtol=1e-5, atol=0)
    # The layers are part of the whole: their norms add up to less than the global one.
    assert math.sqrt(np.sum(g_ref ** 2)) < float(m_on["grad_norm"])
    assert len(set(layers["grad_norm"].tolist())) == cfg.n_layer  # no layer read twice


def test_act_rms_with_completion_weights_does_not_depend_on_accumulation():
    """Prompt/completion weights scale each microbatch's loss and gradients by its share of the
    completion tokens; the blocks' output RMS is a plain mean over the batch however they fall."""
    cfg = GPTConfig(vocab_size=V, n_ctx=T, n_layer=2, n_head=2, n_embd=32, embd_pdrop=0.0,
                    attn_pdrop=0.0, resid_pdrop=0.0)
    tx, sched = make_optimizer(base_config().optim, 1000)
    params = jax.jit(lambda k: init_params(cfg, k))(jax.random.key(0))
    tokens = np.random.default_rng(3).integers(0, V, (4, T + 1)).astype(np.int32)
    weights = np.zeros((4, T), np.float32)
    weights[0, 4:] = 1.0  # all completion tokens in the first microbatch of two
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}
    state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
    got = {accum: jax.device_get(jax.jit(make_train_step(
        cfg, tx, sched, accum_steps=accum, layer_stats=True))(state, batch, jax.random.key(1))[1])
        for accum in (1, 2)}
    np.testing.assert_allclose(got[2]["loss"], got[1]["loss"], rtol=1e-6)
    np.testing.assert_allclose(got[2]["layers"]["act_rms"], got[1]["layers"]["act_rms"],
                               rtol=1e-6)
    np.testing.assert_allclose(got[1]["layers"]["act_rms"],
                               _block_rms(cfg, params, batch["inputs"]), rtol=1e-5)


def _setup(every: int) -> Setup:
    c = base_config()
    c.model = model_config("tiny", vocab_size=V, n_layer=2, n_head=2, n_embd=32, n_ctx=T,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    c.train.batch_size = 4
    c.train.layer_stats_every = every
    c = complete(c, base_config())
    return Setup(c, model_config_from(c), 1000)


def test_off_the_train_step_program_is_unchanged():
    """Statistics off, the lowered train step is the one a run with them runs at other steps
    (checked by hand against main before the statistics existed too: the same text); the
    statistics step is another program."""
    def hlo(setup, step):
        with setup.mesh:
            return step.lower(*topo._abstract_args(setup, 4, T)).as_text()
    off, on = _setup(0), _setup(4)
    assert off.stats_step is None and on.stats_step is not None
    plain = hlo(off, off.train_step)
    assert hlo(on, on.train_step) == plain
    assert hlo(on, on.stats_step) != plain


def test_a_run_logs_per_layer_stats_every_n_steps_and_plots_them(tmp_path):
    corpus = tiny_corpus(tmp_path)
    config = tiny_run_config(corpus, tmp_path, {
        "model.n_layer": 2, "train.steps": 8, "train.layer_stats_every": 4,
        "train.save_every": 8, "optim.decay_steps": 8})
    wd = tmp_path / "run"
    train_and_evaluate(config, str(wd), progress=False)
    recs = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    stats = [r for r in recs if any(k.startswith("layers/") for k in r)]
    assert [r["step"] for r in stats] == [4, 8]
    names = {f"layers/{i}/{n}" for i in range(2) for n in STATS}
    for r in stats:
        assert set(r) == names | {"step"}
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in names)
        for i in range(2):
            assert r[f"layers/{i}/update_ratio"] == pytest.approx(
                r[f"layers/{i}/update_norm"] / r[f"layers/{i}/param_norm"], rel=1e-6)
    assert len([r for r in recs if "loss" in r]) == 8  # every step's train line, as without
    assert (wd / "layers.png").stat().st_size > 10_000
    events = list((wd / "tensorboard").glob("events.out.tfevents.*"))
    if events:  # tensorboardX is optional; where it is installed, the tags are there
        assert b"layers/1/act_rms" in events[0].read_bytes()


@pytest.mark.parametrize("changes, fragment", [
    ({"train.layer_stats_every": -1}, "train.layer_stats_every=-1"),
    ({"train.layer_stats_every": 4, "lora.rank": 8}, "allowed with LoRA: 0"),
])
def test_bad_config_is_one_line(changes, fragment):
    c = complete(base_config(), base_config())
    for key, value in changes.items():
        section, name = key.split(".")
        c[section][name] = value
    with pytest.raises(ConfigError, match=fragment) as e:
        check_train_config(c)
    assert "\n" not in str(e.value)
