"""The trainer: bit-exact resume, optimizer pieces, gradient accumulation, non-finite handling,
and every shipped config building."""

import glob
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from ml_collections import config_flags  # noqa: F401  (config files import gptjax.defaults)

import conftest
from conftest import REPO
from gptjax.data.token_cache import load_tokens
from gptjax.defaults import base_config, complete, model_config
from gptjax.nn.model import init_params
from gptjax.train.optim import decay_mask, lr_schedule
from gptjax.train.experiment import build_source, model_config_from
from gptjax.train.loop import train_and_evaluate
from gptjax.train.step import TrainState, make_train_step


def tiny_run_config(tmp_path, steps=12) -> ml_collections.ConfigDict:
    """conftest's tiny run (its fixed schedule: a run stopped early has the same one) with 2
    layers, dropout and periodic evaluation."""
    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(400))
    return conftest.tiny_run_config(conftest.tiny_corpus(tmp_path, text), tmp_path, {
        "model.n_layer": 2, "model.embd_pdrop": 0.1, "model.attn_pdrop": 0.1,
        "model.resid_pdrop": 0.1, "optim.warmup_steps": 3, "train.steps": steps,
        "train.eval_every": 4, "train.eval_batches": 2, "train.eval_batch_size": 8})


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_resume_is_bit_exact(tmp_path):
    c = tiny_run_config(tmp_path)
    full = train_and_evaluate(c, str(tmp_path / "full"), progress=False)
    # Stop after 6 steps (with a checkpoint at step 4 and a final one at 6), then resume to 12.
    c6 = tiny_run_config(tmp_path)
    c6.train.steps = 6
    train_and_evaluate(c6, str(tmp_path / "resumed"), progress=False)
    assert sorted(map(int, os.listdir(tmp_path / "resumed" / "checkpoints")))[-1] == 6
    resumed = train_and_evaluate(c, str(tmp_path / "resumed"), progress=False)
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 13))
    for step in a:
        assert a[step] == b[step], f"step {step}: {a[step]} != {b[step]}"
    assert full.val_loss == resumed.val_loss
    assert full.summary() == json.load(open(tmp_path / "full" / "summary.json"))
    for x, y in zip(jax.tree_util.tree_leaves(full.state.params),
                    jax.tree_util.tree_leaves(resumed.state.params)):
        np.testing.assert_array_equal(x, y)
    # The run directory has what users look at.
    for name in ("loss.png", "summary.json", "config.json", "tokenizer/tokenizer.json"):
        assert (tmp_path / "full" / name).exists(), name
    assert glob.glob(str(tmp_path / "full" / "tensorboard" / "events.*"))
    recs = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    logged = [r for r in recs if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(logged[0])
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8, 12] and "val_ppl" in evals[0]
    # Training made progress.
    assert a[12] < a[1]


def test_resume_refuses_other_architecture(tmp_path):
    c = tiny_run_config(tmp_path, steps=4)
    train_and_evaluate(c, str(tmp_path / "run"), progress=False)
    c.model.n_embd = 64
    with pytest.raises(ValueError, match="another architecture"):
        train_and_evaluate(c, str(tmp_path / "run"), progress=False)


def test_lr_schedule_warmup_and_cosine_floor():
    s = lr_schedule(learning_rate=1e-3, warmup_steps=100, decay_steps=2000, min_lr=1e-4)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(50)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(100)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(1050)), 1e-4 + 0.5 * (1e-3 - 1e-4), rtol=1e-5)
    np.testing.assert_allclose(float(s(2000)), 1e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(5000)), 1e-4, rtol=1e-6)
    lin = lr_schedule(learning_rate=1.0, warmup_steps=0, decay_steps=10, schedule="linear")
    np.testing.assert_allclose([float(lin(i)) for i in (0, 5, 10)], [1.0, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="schedule='step'"):
        lr_schedule(learning_rate=1.0, warmup_steps=0, decay_steps=1, schedule="step")


@pytest.mark.parametrize("scan", [False, True])
def test_weight_decay_mask(scan):
    cfg = model_config_from(base_config(), vocab_size=256).replace(scan_layers=scan)
    cfg = cfg.replace(n_layer=2)
    from gptjax.nn.model import abstract_params
    mask = decay_mask(abstract_params(cfg))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    for path, decayed in flat.items():
        if "bias" in path or "ln_" in path:
            assert not decayed, path
        else:
            assert decayed, path
    assert not decay_mask(abstract_params(cfg), decay_embeddings=False)["wte"]["embedding"]


def _step_setup(accum):
    c = base_config()
    c.model = model_config("tiny", embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    c.optim.warmup_steps = 0
    mc = model_config_from(c)
    from gptjax.train.optim import make_optimizer
    tx, sched = make_optimizer(c.optim, 10)
    params = init_params(mc, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(mc, tx, sched, accum_steps=accum))
    x = jax.random.randint(jax.random.key(1), (8, 33), 0, mc.vocab_size)
    return state, step, {"inputs": x[:, :-1], "targets": x[:, 1:]}


def test_gradient_accumulation_matches_one_big_batch():
    s1, f1, b = _step_setup(1)
    s4, f4, _ = _step_setup(4)
    n1, m1 = f1(s1, b, jax.random.key(0))
    n4, m4 = f4(s4, b, jax.random.key(0))
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-4)
    lr = base_config().optim.learning_rate  # (no warmup: the first step's rate)
    for path, a in jax.tree_util.tree_leaves_with_path(n1.params):
        a, bb = np.asarray(a), np.asarray(_leaf(n4.params, path))
        if jax.tree_util.keystr(path).endswith("['c_attn']['bias']"):
            # The key bias's gradient is analytically zero (softmax is shift-invariant per
            # query): rounding noise that Adam (noise / eps) turns into steps of up to lr.
            np.testing.assert_allclose(a[[0, 2]], bb[[0, 2]], atol=2e-6)
            assert np.abs(a[1] - bb[1]).max() <= 2 * lr
        else:
            np.testing.assert_allclose(a, bb, atol=2e-6, err_msg=jax.tree_util.keystr(path))


def _leaf(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_nonfinite_step_is_skipped():
    state, step, b = _step_setup(1)
    bad = jax.tree_util.tree_map(lambda p: p, state)
    bad = bad.replace(params=jax.tree_util.tree_map(lambda p: p, state.params))
    bad.params["wte"]["embedding"] = bad.params["wte"]["embedding"].at[0, 0].set(jnp.nan)
    b = {"inputs": b["inputs"].at[0, 0].set(0), "targets": b["targets"]}
    new, m = step(bad, b, jax.random.key(0))
    assert int(m["skipped"]) == 1 and not np.isfinite(float(m["loss"]))
    for x, y in zip(jax.tree_util.tree_leaves(new.params), jax.tree_util.tree_leaves(bad.params)):
        np.testing.assert_array_equal(x, y)
    # Adam's moments and count too (a select per element keeps them, gptjax.train.step).
    for x, y in zip(jax.tree_util.tree_leaves(new.opt_state),
                    jax.tree_util.tree_leaves(bad.opt_state)):
        np.testing.assert_array_equal(x, y)
    assert int(new.step) == 1


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs" / "*.py"))))
def test_every_config_parses_and_builds(path):
    name = os.path.basename(path)
    if name in ("__init__.py", "common.py"):
        return
    import importlib.util
    spec = importlib.util.spec_from_file_location("cfg_" + name[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.__doc__ and "python train.py" in mod.__doc__ and "Expected" in mod.__doc__
    args = {"gpt2.py": ["gpt2", "gpt2-xl"], "gpt3.py": ["gpt3-small", "gpt3-175b"]}.get(name, [None])
    for arg in args:
        c = mod.get_config() if arg is None else mod.get_config(arg)
        mc = model_config_from(c, vocab_size=50257)
        assert mc.num_params() > 0  # abstract: a 175B config costs nothing
        assert c.train.batch_size > 0 and c.train.steps > 0


def test_bf16_compute_keeps_fp32_master_weights_and_optimizer_state():
    c = base_config()
    c.model = model_config("tiny", dtype="bfloat16", param_dtype="float32")
    c.optim.warmup_steps = 0
    mc = model_config_from(c)
    from gptjax.train.optim import make_optimizer
    tx, sched = make_optimizer(c.optim, 10)
    params = init_params(mc, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    x = jax.random.randint(jax.random.key(1), (4, 33), 0, mc.vocab_size)
    new, m = jax.jit(make_train_step(mc, tx, sched))(
        state, {"inputs": x[:, :-1], "targets": x[:, 1:]}, jax.random.key(0))
    assert np.isfinite(float(m["loss"]))
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(new.params))
    assert all(s.dtype in (jnp.float32, jnp.int32)
               for s in jax.tree_util.tree_leaves(new.opt_state))
    # The update moved the fp32 weights by less than a bf16 ulp of some entries: master weights
    # keep precision bf16 storage would lose.
    d = np.abs(np.asarray(new.params["wte"]["embedding"] - params["wte"]["embedding"]))
    assert d.max() > 0


def test_epochs_set_the_number_of_steps(tmp_path):
    """train.epochs > 0 (GPT-1's "100 epochs") trains ceil(epochs x train tokens / tokens per
    batch) steps, whatever train.steps says."""
    c = tiny_run_config(tmp_path, steps=1000)
    c.train.epochs = 0.05
    c.train.eval_every = 0
    c.train.save_every = 1000
    result = train_and_evaluate(c, str(tmp_path / "run"), progress=False)
    source = build_source(complete(c, base_config()))
    n_train = len(load_tokens(source, "train", result.tokenizer, cache_dir=c.data.cache_dir))
    assert n_train > 10_000
    assert result.step == math.ceil(0.05 * n_train / (4 * 32))
    with open(tmp_path / "run" / "summary.json") as fh:
        assert json.load(fh)["step"] == result.step
