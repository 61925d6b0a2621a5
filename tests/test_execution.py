"""The architecture apart from how it runs: a checkpoint resumes and loads under any execution.

Execution (`GPTConfig.EXECUTION_FIELDS`: attention kernel, remat, scan, compute dtype, dropout)
may change between a checkpoint and the run that resumes or loads it, and one line names the
change; a change of architecture is still refused with one `error:` line. The runs go through
train.py and sample.py in subprocesses (test_reliability's tiny default-config flags and XLA
cache); the loaders of eval.py, finetune.py and serve.py are called as those scripts call them.
"""

import shutil

import jax
import ml_collections
import numpy as np
import pytest

from gptjax.config import EXECUTION_FIELDS, ConfigError, GPTConfig, parse_execution
from gptjax.defaults import base_config, finetune_config
from gptjax.nn.model import GPT, init_params
from gptjax.nn.param_layout import convert_layout, stack_layers
from gptjax.runs.checkpoint import CheckpointError
from gptjax.runs.pretrained import check_checkpoint_meta, execution_change, load_pretrained
from gptjax.train.optim import make_optimizer
from test_reliability import assert_one_line_error, losses, run, train_flags

try:  # test_reliability's module fixture, until tests/conftest.py holds the shared one
    from test_reliability import env  # noqa: F401
except ImportError:
    pass

STOP, END = 60, 80


def flags(tmp, workdir, steps, *extra):
    """The tiny run's flags, with the schedule of an END-step run stopped at `steps`. Dropout is
    off (the default config's): with it, nn.scan draws other masks than the loop of layers."""
    return train_flags(tmp, workdir, f"--config.train.steps={steps}",
                       f"--config.optim.decay_steps={END}", "--config.train.save_every=20",
                       "--config.train.log_every=1", "--config.model.embd_pdrop=0.0",
                       "--config.model.attn_pdrop=0.0", "--config.model.resid_pdrop=0.0", *extra)


@pytest.fixture(scope="module")
def runs(env):  # noqa: F811
    """(uninterrupted END-step run with xla attention, a run stopped at STOP with 'auto')."""
    tmp = env[0]
    full, stopped = tmp / "execution_full", tmp / "execution_stopped"
    r = run(env, "train.py", flags(tmp, full, END))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(env, "train.py", flags(tmp, stopped, STOP, "--config.model.attention_impl=auto"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(full)) == list(range(1, END + 1))
    return full, stopped


@pytest.mark.parametrize("field, value, named", [
    ("remat", "full", "remat 'none' -> 'full'"),
    ("attention_impl", "xla", "attention_impl 'auto' -> 'xla'"),
    ("scan_layers", True, "scan_layers False -> True"),
])
def test_resume_under_another_execution(env, runs, tmp_path, field, value, named):  # noqa: F811
    full, stopped = runs
    wd = tmp_path / "run"
    shutil.copytree(stopped, wd)
    r = run(env, "train.py", flags(env[0], wd, END, "--config.model.attention_impl=auto",
                                   f"--config.model.{field}={value}"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    said = [ln for ln in (r.stdout + r.stderr).splitlines() if "execution" in ln]
    assert said == [f"resuming step {STOP} with another execution: {named}"], said
    assert f"steps {STOP}->{END}" in r.stdout
    a, b = losses(full), losses(wd)
    assert sorted(b) == list(range(1, END + 1))
    for s in range(1, END + 1):
        assert abs(a[s]["loss"] - b[s]["loss"]) <= 1e-5 * abs(a[s]["loss"]), (s, a[s], b[s])
    # The run directory now records the execution it ran with, and loads under it.
    cfg, params, _ = load_pretrained(workdir=str(wd))
    assert getattr(cfg, field) == value and ("h" in params) == cfg.scan_layers


def test_changing_the_architecture_is_still_refused(env, runs, tmp_path):  # noqa: F811
    wd = tmp_path / "run"
    shutil.copytree(runs[1], wd)
    before = (wd / "model_config.json").read_text()
    r = run(env, "train.py", flags(env[0], wd, END, "--config.model.n_layer=2"))
    assert_one_line_error(r, f"checkpoint step {STOP} is of another architecture",
                          "n_layer 1 there, 2 here", "use another --workdir")
    assert (wd / "model_config.json").read_text() == before


def test_sample_py_with_an_execution_override(env, runs):  # noqa: F811
    stopped = runs[1]
    args = [f"--workdir={stopped}", "--prompt=to be", "--max_new_tokens=8", "--temperature=0"]
    plain = run(env, "sample.py", args)
    r = run(env, "sample.py", [*args, "--execution=attention_impl=xla,remat=full,"
                               "scan_layers=true"])
    assert plain.returncode == 0 and r.returncode == 0, r.stderr[-3000:]
    notes = [ln for ln in r.stderr.splitlines() if "execution" in ln]
    assert notes == [f"note: loading step {STOP} with another execution: attention_impl 'auto' "
                     "-> 'xla', remat 'none' -> 'full', scan_layers False -> True"], notes
    assert r.stdout == plain.stdout and r.stdout.startswith("to be")  # the same greedy text
    bad = run(env, "sample.py", [*args, "--execution=n_layer=2"])
    assert_one_line_error(bad, "execution override 'n_layer=2'", "remat")


def _logits(cfg, params):
    tokens = np.arange(16, dtype=np.int32)[None] % cfg.vocab_size
    return np.asarray(GPT(cfg).apply({"params": params}, tokens))


def test_library_loaders_apply_execution_overrides(runs, capsys):
    """load_pretrained (sample.py, serve.py), eval's load_models and finetune's decoder."""
    from gptjax.eval.run import load_models
    from gptjax.finetune.decoder import pretrained_decoder
    from gptjax.finetune.dryrun import decoder_config

    stopped = str(runs[1])
    cfg, params, _ = load_pretrained(workdir=stopped)
    assert cfg.attention_impl == "auto" and "h_0" in params
    assert "execution" not in capsys.readouterr().err  # nothing changed, nothing said
    over = dict(attention_impl="xla", scan_layers=True, remat="dots")
    cfg2, params2, _ = load_pretrained(workdir=stopped, execution=over)
    assert cfg2.architecture() == cfg.architecture() and cfg2.execution() == dict(
        cfg.execution(), **over)
    for x, y in zip(jax.tree_util.tree_leaves(stack_layers(cfg2, params)),
                    jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(x, y)  # moved to the scan layout, not one number changed
    np.testing.assert_allclose(_logits(cfg2, params2), _logits(cfg, params), rtol=1e-5,
                               atol=1e-5)
    (_, cfg3, params3, _, _), = load_models([stopped], execution="scan_layers=true")
    assert cfg3.scan_layers and "h" in params3
    init = ml_collections.ConfigDict(dict(kind="workdir", path=stopped, tokenizer_path="",
                                          execution="remat=full,embd_pdrop=0.2"))
    cfg4, _, _ = pretrained_decoder(init)
    assert (cfg4.remat, cfg4.embd_pdrop) == ("full", 0.2)
    ft = finetune_config("sst2")  # finetune.py --dry_run reads the same init (no weights)
    ft.init.update(kind="workdir", path=stopped, execution="remat=full")
    assert decoder_config(ft) == cfg4.with_execution(embd_pdrop=cfg.embd_pdrop)
    assert capsys.readouterr().err.count("with another execution") == 3
    with pytest.raises(ConfigError, match="n_embd: not an execution field"):
        load_pretrained(workdir=stopped, execution={"n_embd": 64})


def test_hf_directory_loads_with_an_execution_override(runs, tmp_path, capsys):
    from conftest import small_hf_lm

    small_hf_lm("gpt2", 0, vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                n_head=2).save_pretrained(tmp_path)
    tok_dir = str(runs[1] / "tokenizer")  # a gptjax tokenizer (tokenizer.json), 40 characters
    cfg, params, _ = load_pretrained(hf_dir=str(tmp_path), tokenizer_path=tok_dir)
    assert "execution" not in capsys.readouterr().err
    cfg2, params2, _ = load_pretrained(hf_dir=str(tmp_path), tokenizer_path=tok_dir,
                                       execution="scan_layers=true,remat=full")
    assert (cfg2.scan_layers, cfg2.remat) == (True, "full") and "h" in params2
    assert f"note: loading {tmp_path} with another execution: remat 'none' -> 'full', " \
           "scan_layers False -> True" in capsys.readouterr().err
    np.testing.assert_allclose(_logits(cfg2, params2), _logits(cfg, params), rtol=1e-5,
                               atol=1e-5)


def test_serve_loads_with_an_execution_override(runs, monkeypatch, capsys):
    """serve.py's `serve` loads the model with the override (stopped before the engine builds:
    loading is all that the override concerns)."""
    from gptjax.inference import serving

    class Loaded(Exception):
        pass

    def load(**kw):
        raise Loaded(load_pretrained(**kw)[0])
    monkeypatch.setattr(serving, "load_pretrained", load)
    with pytest.raises(Loaded) as got:
        serving.serve(workdir=str(runs[1]), port=8123, execution="attention_impl=xla,remat=full")
    config = got.value.args[0]
    assert (config.attention_impl, config.remat, config.n_layer) == ("xla", "full", 1)
    assert "with another execution: attention_impl 'auto' -> 'xla'" in capsys.readouterr().err


def test_the_partition_of_the_fields():
    cfg = GPTConfig.preset("tiny", remat="full", attention_impl="auto")
    assert set(cfg.architecture()) | set(cfg.execution()) == set(cfg.to_dict())
    assert not set(cfg.architecture()) & set(EXECUTION_FIELDS)
    assert "param_dtype" in cfg.architecture()  # the dtype the checkpoint's arrays are stored in
    assert cfg.with_execution(remat="none").remat == "none"
    with pytest.raises(ConfigError, match="remat='bogus'"):
        cfg.with_execution(remat="bogus")
    assert parse_execution("attention_impl=xla, scan_layers=false,resid_pdrop=0.1") == dict(
        attention_impl="xla", scan_layers=False, resid_pdrop=0.1)
    for bad in ("remat", "vocab_size=3", "scan_layers=maybe", "attn_pdrop=x"):
        with pytest.raises(ConfigError, match="execution override"):
            parse_execution(bad)


def test_checkpoint_meta_compares_the_architecture_only():
    here = GPTConfig.preset("tiny", remat="full", attention_impl="auto", scan_layers=True)
    tok = {"kind": "char", "vocab_size": 256}
    old = GPTConfig.preset("tiny").to_dict()  # what checkpoints have always saved: every field
    check_checkpoint_meta(60, {"model_config": old, "tokenizer": tok}, model_cfg=here,
                          tokenizer=tok)
    meta = {"model_config": old}
    assert execution_change(meta, here) == (
        "attention_impl 'xla' -> 'auto', remat 'none' -> 'full', scan_layers False -> True")
    assert execution_change(meta, here.with_execution(**GPTConfig.preset(
        "tiny").execution())) is None
    predates = {k: v for k, v in old.items() if k != "use_bias"}  # saved before the field
    check_checkpoint_meta(60, {"model_config": predates}, model_cfg=here, tokenizer=tok)
    for field, value in (("n_layer", 3), ("n_embd", 64), ("param_dtype", "bfloat16")):
        with pytest.raises(CheckpointError) as e:
            check_checkpoint_meta(60, {"model_config": dict(old, **{field: value})},
                                  model_cfg=here, tokenizer=tok)
        assert str(e.value) == (
            f"checkpoint step 60 is of another architecture than this config ({field} "
            f"{value!r} there, {old[field]!r} here); use another --workdir")


def test_convert_layout_moves_params_and_adam_moments_exactly():
    cfg = GPTConfig.preset("tiny-gpt3")  # two attention kinds: a scan period of 2
    tx, _ = make_optimizer(base_config().optim, 100)  # train.py's: clipping, AdamW with a decay mask

    def state_of(config):  # parameters and the optimizer state after one update (moments != 0)
        params = init_params(config, jax.random.key(0))
        return {"params": params, "opt": tx.update(params, tx.init(params), params)[1]}
    state = jax.jit(state_of, static_argnums=0)(cfg)
    stacked = convert_layout(cfg, state, scan_layers=True)
    want = jax.eval_shape(lambda: state_of(cfg.with_execution(scan_layers=True)))
    assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(want)
    assert [x.shape for x in jax.tree_util.tree_leaves(stacked)] == [
        x.shape for x in jax.tree_util.tree_leaves(want)]
    back = convert_layout(cfg, stacked, scan_layers=False)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(state)
    for x, y in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(x, y)
