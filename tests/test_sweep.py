"""gptjax.sweep: N models trained at once with vmap equal each model trained alone."""

import json

import jax
import numpy as np
import pytest

from gptjax.defaults import base_config, model_config
from gptjax import sweep
from gptjax.train.experiment import model_config_from
from gptjax.train.setup import Setup

STEPS = 6


def _config(seed=0, lr=3e-3, dropout=0.1):
    c = base_config()
    c.seed = seed
    c.model = model_config("tiny", vocab_size=40, n_ctx=16, embd_pdrop=dropout,
                           attn_pdrop=dropout, resid_pdrop=dropout)
    c.optim.learning_rate = lr
    c.optim.warmup_steps = 2
    c.optim.min_lr = lr / 10
    c.train.steps = STEPS
    c.train.batch_size = 4
    c.train.eval_batch_size = 4
    return c


def _tokens(n, seed):
    # A learnable stream: a noisy counter modulo the vocabulary.
    rng = np.random.default_rng(seed)
    return ((np.arange(n) + (rng.random(n) < 0.1)) % 40).astype(np.int32)


_SETUPS = {}


def _alone(config, train_tokens):
    """The trainer's own sharded, jitted step and init for one seed: losses per step."""
    from gptjax.data import LMBatcher

    model_cfg = model_config_from(config)
    # The Setup (mesh, optimizer, jitted step) does not depend on the seed: build it once per
    # optimizer, so the test compiles the trainer's step once rather than once per seed.
    key = (config.optim.learning_rate, model_cfg)
    if key not in _SETUPS:
        _SETUPS[key] = Setup(config, model_cfg, config.train.steps)
    setup = _SETUPS[key]
    init_rng, train_rng, _ = jax.random.split(jax.random.key(config.seed), 3)
    state = setup.init_state(init_rng)
    batcher = LMBatcher(train_tokens, model_cfg.n_ctx, config.train.batch_size, config.seed)
    losses = []
    with setup.mesh:
        for step in range(config.train.steps):
            state, m = setup.train_step(state, setup.put_batch(batcher.batch(step)), train_rng)
            losses.append(float(m["loss"]))
    return np.array(losses), state


def test_vmap_over_seeds_equals_each_seed_alone():
    train, val = _tokens(2000, 0), _tokens(400, 1)
    seeds = [0, 5]
    out = sweep.train_sweep(_config(), train, val, seeds=seeds)
    assert out.losses.shape == (2, STEPS) and out.val_loss.shape == (2,)
    for i, s in enumerate(seeds):
        losses, state = _alone(_config(seed=s), train)
        print(f"seed {s}: sweep {out.losses[i]} alone {losses}")
        np.testing.assert_allclose(out.losses[i], losses, rtol=2e-5, atol=2e-6)
        got = jax.tree_util.tree_map(lambda x, i=i: np.asarray(x[i]), out.state.params)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                                jax.tree_util.tree_leaves(state.params)):
            name, b = jax.tree_util.keystr(path), np.asarray(b)
            if name.endswith("['c_attn']['bias']"):
                # The key bias's gradient is analytically zero: its rounding noise, which Adam
                # (noise / eps) turns into steps of up to lr, is all that differs.
                np.testing.assert_allclose(a[[0, 2]], b[[0, 2]], rtol=1e-4, atol=1e-5)
                assert np.abs(a[1] - b[1]).max() <= 2 * STEPS * 3e-3, name
            else:
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    # Different seeds are different models (dropout, init and batches differ).
    assert np.abs(out.losses[0] - out.losses[1]).max() > 1e-3


def test_vmap_over_learning_rates_equals_each_rate_alone():
    train = _tokens(2000, 0)
    lrs = [1e-3, 1e-2]
    out = sweep.train_sweep(_config(dropout=0.0), train, seeds=[3], learning_rates=lrs)
    assert out.seeds == [3, 3] and out.learning_rates == lrs
    # The second model (not the config's rate) against the trainer run with that rate.
    losses, _ = _alone(_config(seed=3, lr=lrs[1], dropout=0.0), train)
    np.testing.assert_allclose(out.losses[1], losses, rtol=2e-5, atol=2e-6)
    assert np.abs(out.losses[0, -1] - out.losses[1, -1]) > 1e-3


def test_sweep_argument_errors():
    with pytest.raises(ValueError, match="seeds"):
        sweep._check_models([], None)
    with pytest.raises(ValueError, match="2 seeds and 3 learning rates"):
        sweep._check_models([0, 1], [1e-3, 2e-3, 3e-3])
    with pytest.raises(ValueError, match="learning_rates"):
        sweep._check_models([0], [-1.0])
    config = _config()
    config.train.layer_stats_every = 5
    with pytest.raises(ValueError, match="train.layer_stats_every=5: a sweep's step returns no "
                                         "per-layer statistics; give 0") as e:
        sweep.init_sweep(config, model_config_from(config), [0, 1])
    assert "\n" not in str(e.value)


def test_power_law_fit_recovers_known_law_and_matches_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    n = np.array([1e4, 3e4, 1e5, 3e5, 1e6])
    alpha, n_c = 0.076, 8.8e13  # Kaplan et al.'s L(N)
    fit = sweep.fit_power_law(n, (n_c / n) ** alpha)
    assert fit["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert fit["n_c"] == pytest.approx(n_c, rel=1e-4) and fit["r2"] == pytest.approx(1.0)
    noisy = (n_c / n) ** alpha * np.exp(np.random.default_rng(0).normal(0, 0.01, len(n)))
    fit = sweep.fit_power_law(n, noisy)
    (a, log_nc), _ = scipy_opt.curve_fit(lambda x, a, c: a * (c - x), np.log(n), np.log(noisy),
                                         p0=(0.1, 30.0))
    assert fit["alpha"] == pytest.approx(a, rel=1e-5)
    assert np.log(fit["n_c"]) == pytest.approx(log_nc, rel=1e-5)


def test_vmap_over_lora_adapters_equals_each_adapter_alone(tmp_path):
    """Three LoRA adapters (seeds and learning rates) over ONE frozen decoder in one vmapped step
    train as each does alone in finetune's own Trainer (same base, examples, keys, batches)."""
    import dataclasses  # local: only the LoRA sweep test rebuilds a run per seed
    from gptjax.finetune import loop as ft
    from gptjax.finetune import lora as ft_lora
    from test_finetune_lora import lora_config  # the tiny scratch SST-2 LoRA run
    from test_finetune import write_tasks

    c = lora_config(write_tasks(tmp_path / "tasks")["sst2"], epochs=1, predict_test=False)
    c.task.train_examples, c.train.log_every = 80, 1   # 5 steps
    seeds, lrs = [0, 1, 2], [1e-2, 1e-2, 3e-2]  # two rates: two compilations of the alone step
    out = sweep.finetune_lora_sweep(c, str(tmp_path / "sweep"), seeds=seeds, learning_rates=lrs)
    assert out.losses.shape == (3, 5) and len(out.dev) == 3
    run, params = ft.prepare(c, str(tmp_path / "base"))
    base = jax.device_get(params["decoder"])
    for i, (s, lr) in enumerate(zip(seeds, lrs)):
        ci = c.copy_and_resolve_references()
        ci.seed, ci.optim.learning_rate = s, lr
        k_head, k_train = jax.random.split(jax.random.key(s), 4)[2:]
        trainable = ft_lora.init_trainable(run.model_cfg, ft_lora.lora_config(c.lora),
                                           ft.heads.init_head(k_head, run.head_cfg, 32),
                                           jax.random.fold_in(k_head, 1))
        wd = tmp_path / f"alone{i}"
        wd.mkdir()
        alone = ft.Trainer(dataclasses.replace(run, config=ci, rng=k_train, workdir=str(wd)),
                           dict(trainable, decoder=params["decoder"]), progress=False)
        alone.fit()
        losses = [r["loss"] for r in map(json.loads, open(wd / "metrics.jsonl")) if "loss" in r]
        print(f"adapter {i}: sweep {out.losses[i]} alone {losses}")
        np.testing.assert_allclose(out.losses[i], losses, rtol=2e-5, atol=2e-6)
        got = jax.tree_util.tree_map(lambda x, i=i: np.asarray(x[i]), out.state.params)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                                jax.tree_util.tree_leaves(alone.state.params)):
            np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5,
                                       err_msg=jax.tree_util.keystr(path))
        assert out.dev[i]["dev_accuracy"] == alone.history[-1]["dev_accuracy"]
        # The base stayed one shared, unchanged copy.
        assert all(np.array_equal(x, y) for x, y in zip(
            jax.tree_util.tree_leaves(base), jax.tree_util.tree_leaves(alone.base)))
    assert min(np.abs(out.losses[i] - out.losses[j]).max() for i, j in [(0, 1), (1, 2)]) > 1e-3
