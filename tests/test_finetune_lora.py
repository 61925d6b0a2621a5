"""LoRA for GPT-1's task heads (gptjax.finetune.lora): a frozen decoder (fp32 or int8), trained
adapters, task-token deltas and head; the run's dev metric, checkpoint and load_finetuned; the
start equal to full finetuning's; merged == unmerged; one-line errors for bad lora fields."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import GPTConfig, init_params
from gptjax.data.tasks import TASKS
from gptjax.defaults import finetune_config
from gptjax.finetune import heads
from gptjax.finetune import lora as ft_lora
from gptjax.finetune import loop as ft
from gptjax.nn import lora as nn_lora
from gptjax.nn import quant
from test_finetune import write_tasks


@pytest.fixture(scope="module")
def sst2(tmp_path_factory):
    return write_tasks(tmp_path_factory.mktemp("tasks"))["sst2"]


def lora_config(path, weights="fp32", **train):
    """A tiny scratch decoder (2 x 32, characters) finetuned on SST-2 with rank-4 adapters."""
    c = finetune_config("sst2", str(path))
    c.init.kind, c.tokenizer.kind = "scratch", "char"
    c.model.n_layer, c.model.n_embd, c.model.n_head, c.model.n_ctx = 2, 32, 2, 32
    c.task.max_len, c.task.train_examples = 32, 48
    c.optim.warmup_fraction, c.optim.learning_rate = 0.1, 1e-2
    c.train.epochs, c.train.batch_size, c.train.eval_batch_size = 2, 16, 8
    c.train.length_bucket, c.train.log_every = 32, 1
    c.lora.rank, c.lora.targets, c.lora.base_weights = 4, "all", weights
    c.train.update(train)
    return c


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(
        jax.device_get(tree), is_leaf=lambda x: isinstance(x, quant.WeightOnly))


def _same(a, b):
    if jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(b):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_lora_run_trains_only_adapters_tokens_and_head(sst2, tmp_path, weights):
    """A LoRA run end to end: the frozen base is bitwise the same after training, every trainable
    leaf moved, the optimizer state is the trainables' only, the dev metric is computed each
    epoch, and load_finetuned's model predicts what the best epoch predicted."""
    c = lora_config(sst2, weights, **({} if weights == "fp32" else
                                      {"epochs": 1, "max_steps": 2, "predict_test": False}))
    run, params = ft.prepare(c, str(tmp_path / "run"))
    start = jax.device_get(params)
    trainer = ft.Trainer(run, params, progress=False)
    opt_numbers = ft_lora.count(trainer.state.opt_state)
    trainer.fit()
    ft._predict_test(run, trainer.best_params)
    base = trainer.params["decoder"]
    assert _same(base, start["decoder"]) and len(jax.tree_util.tree_leaves(base)) > 0
    if weights == "int8":
        assert base["h_0"]["attn"]["c_attn"]["kernel_q"].values.dtype == jnp.int8
    trained = {k: v for k, v in trainer.state.params.items() if k != "decoder"}
    assert set(trained) == {"lora", "tokens", "head"}
    for (path, new), (_, old) in zip(_leaves(trained), _leaves({k: start[k] for k in trained})):
        assert not np.array_equal(new, old), jax.tree_util.keystr(path)
    # Adam's two moments of the trainable leaves (plus counters): no copy of the decoder.
    n_train = ft_lora.count(trained)
    assert 2 * n_train <= opt_numbers <= 2 * n_train + 8 < ft_lora.count(base)
    info = json.load(open(tmp_path / "run" / "finetune.json"))
    assert info["lora"] == {"rank": 4, "alpha": 16.0, "dropout": 0.0, "base_weights": weights,
                            "targets": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]}
    evals = [r for r in trainer.history if "dev_accuracy" in r]
    assert len(evals) == c.train.epochs and all(0 <= r["dev_accuracy"] <= 1 for r in evals)
    loaded = ft.load_finetuned(str(tmp_path / "run"))
    assert loaded.meta["epoch"] == trainer.best["epoch"] and _same(loaded.params["decoder"], base)
    enc = run.dev["dev"]
    out, preds = ft.predict(loaded.model_config, loaded.head_config, loaded.params, enc, 8, 32, 32)
    want, _ = ft.predict(run.model_cfg, run.head_cfg, trainer.best_params, enc, 8, 32, 32)
    np.testing.assert_array_equal(out, want)
    assert ft.split_metrics(TASKS["sst2"], enc, preds)["accuracy"] == trainer.best["dev_accuracy"]
    # (merged_params == these params: test_lora_starts_at_full_finetuning_and_merges)
    if weights != "fp32":
        return
    lines = (tmp_path / "run" / "predictions" / "SST-2.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 4


def _tiny(tie=True):
    cfg = GPTConfig.preset("tiny", vocab_size=40, n_layer=2, n_head=2, n_embd=32, n_ctx=16,
                           tie_embeddings=tie, embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    cfg, dec, _ = heads.add_special_tokens(cfg, init_params(cfg, jax.random.key(0)),
                                           jax.random.key(1))
    head_cfg = heads.HeadConfig("classification", 2, lm_coef=0.5, dropout=0.0)
    head = heads.init_head(jax.random.key(2), head_cfg, cfg.n_embd)
    tokens = (jnp.arange(3 * 12).reshape(3, 1, 12) * 7) % cfg.vocab_size
    tokens = tokens.at[:, :, 0].set(40).at[:, :, 5].set(41).at[:, :, 9].set(42)  # <s> $ <e>
    batch = {"tokens": tokens, "lengths": jnp.full((3, 1), 10, jnp.int32),
             "labels": jnp.array([0, 1, 1])}
    return cfg, dec, head, head_cfg, batch


@pytest.mark.parametrize("tie", [True, False])
def test_lora_starts_at_full_finetuning_and_merges(tie):
    """New adapters and zero token deltas compute what full finetuning starts from; with moved
    adapters and deltas (input rows and output head) the merged model computes the same."""
    cfg, dec, head, head_cfg, batch = _tiny(tie)
    lo = nn_lora.LoraConfig(rank=2, alpha=4, targets=("c_attn", "c_proj"))
    params = dict(ft_lora.init_trainable(cfg, lo, head, jax.random.key(3)), decoder=dec)
    moved = dict(params, **jax.tree.map(
        lambda x: x + 0.1 * jax.random.normal(jax.random.key(4), x.shape),
        {k: params[k] for k in ("lora", "tokens")}))

    @jax.jit  # one compilation for every forward of the test
    def run(full, start, moved):
        def loss(p):
            return heads.finetune_loss(cfg, p, batch, head_cfg, deterministic=True)
        grads = jax.grad(lambda t: loss(dict(moved, tokens=t))[0])(moved["tokens"])
        return (loss(full), loss(start), loss(moved), loss(ft_lora.merged_params(cfg, moved)),
                grads)

    (full, _), (start, _), (got, aux), (want, aux_m), g = run(
        {"decoder": dec, "head": head}, params, moved)
    np.testing.assert_allclose(start, full, rtol=1e-6)  # one fusion's rounding apart
    assert abs(float(got) - float(full)) > 1e-3  # the adapters and deltas matter
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(aux["lm_loss"], aux_m["lm_loss"], rtol=1e-6)
    np.testing.assert_allclose(aux["outputs"], aux_m["outputs"], rtol=1e-5, atol=1e-6)
    # The task tokens' gradient reaches both the input rows and the output head's columns.
    assert set(g) == ({"wte"} if tie else {"wte", "lm_head"})
    assert all(float(jnp.min(jnp.abs(x).sum(axis=-1 if k == "wte" else 0))) > 0
               for k, x in g.items())


@pytest.mark.parametrize("field, value, msg", [
    ("rank", -1, "lora.rank=-1: must be an integer >= 0 (0 = full finetuning)"),
    ("rank", 2.5, "lora.rank=2.5: must be an integer >= 0"),
    ("targets", "c_attn,q_proj", "lora.targets: 'q_proj' names no module; allowed: attn.c_attn"),
    ("base_weights", "fp8", "lora.base_weights='fp8': must be one of fp32, bf16, int8"),
    ("dropout", 1.0, "lora.dropout=1.0: must be a number in [0, 1)"),
    ("alpha", 0.0, "lora.alpha=0.0: must be a finite number > 0"),
])
def test_bad_lora_fields_are_one_line(sst2, tmp_path, field, value, msg):
    c = lora_config(sst2)
    with c.lora.ignore_type():
        c.lora[field] = value
    with pytest.raises(ValueError) as e:
        ft.finetune(c, str(tmp_path / "bad"), progress=False)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value), str(e.value)
