"""Language-model finetuning in train.py: from a transformers GPT-2 directory or a gptjax run
(config.init), the nanoGPT finetune_shakespeare config, and LoRA over a frozen base
(config.lora): parity with transformers at step 0, resume, a base that never moves, int8 bases,
a LoRA run read back (merged) by load_pretrained, and one-line config errors."""

import importlib.util
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
from conftest import REPO
from gptjax.config import ConfigError
from gptjax.defaults import base_config, complete
from gptjax.nn import lora
from gptjax.nn.model import GPT
from gptjax.runs.checkpoint import CheckpointError
from gptjax.runs.pretrained import load_lora_run, load_pretrained
from gptjax.train import loop
from gptjax.train.experiment import check_train_config
from gptjax.train.lora_setup import LoraSetup
from gptjax.train.start import lora_settings

TEXT = "".join(f"Line {i}: Now is the winter of our discontent, made glorious summer.\n"
               for i in range(120))


def _shakespeare_config():
    spec = importlib.util.spec_from_file_location(
        "finetune_shakespeare", REPO / "configs" / "finetune_shakespeare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random transformers GPT-2 (2 x 32, GPT-2's real BPE files), once per module."""
    return conftest.hf_gpt2_dir(tmp_path_factory.mktemp("hf"), 64)


def _config(tmp, hf, **changes):
    """configs/finetune_shakespeare.py from `hf`, made tiny: 16-token windows, batch 4, no
    accumulation, steps as `changes` say; data a small text file under `tmp`."""
    c = _shakespeare_config()
    c.init.path = str(hf)
    c.data.path = str(conftest.tiny_corpus(tmp, TEXT))
    c.data.cache_dir = str(tmp / "cache")
    c.data.seq_len = 16
    c.train.batch_size, c.train.accum_steps, c.train.steps = 4, 1, 3
    c.train.eval_every, c.train.eval_batches, c.train.eval_batch_size = 0, 1, 4
    c.train.save_every = 2
    c.train.async_checkpointing = False
    c.sample.max_new_tokens = 0
    c.optim.learning_rate = 1e-2  # (tiny random model: steps that move)
    for k, v in changes.items():
        section, name = k.split("__")
        c[section][name] = v
    return c


def _losses(workdir):
    recs = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


def test_hf_init_first_loss_equals_transformers_then_resume(tmp_path, hf_dir):
    import torch  # the reference library, only here
    import transformers

    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    c = _config(tmp_path, hf, train__steps=4)
    full = loop.train_and_evaluate(c, str(tmp_path / "full"), progress=False)
    # The first logged loss is transformers' loss on the run's batch of step 0.
    run = loop.prepare(complete(_config(tmp_path, hf, train__steps=4), base_config()),
                       str(tmp_path / "full"))
    b = run.batcher.batch(0)
    run.batcher.close()
    ids = torch.tensor(np.concatenate([b["inputs"], b["targets"][:, -1:]], 1), dtype=torch.long)
    with torch.no_grad():
        ref = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()(ids, labels=ids).loss.item()
    first = _losses(tmp_path / "full")[1]
    assert abs(first - ref) <= 1e-5 * abs(ref), (first, ref)
    # The run holds the pretrained model's tokenizer and architecture, not config.model's.
    saved = json.load(open(tmp_path / "full" / "model_config.json"))
    assert (saved["n_layer"], saved["n_embd"], saved["vocab_size"], saved["n_ctx"]) == (
        2, 32, 50257, 64)
    assert run.tokenizer.kind == "gpt2_bpe" and run.tokenizer.vocab_size == 50257
    # Stopped after 2 steps, then resumed from its own checkpoint (the weights file is gone):
    # the same losses as the uninterrupted run, bit for bit.
    loop.train_and_evaluate(_config(tmp_path, hf, train__steps=2), str(tmp_path / "res"),
                            progress=False)
    os.remove(hf / "model.safetensors")
    resumed = loop.train_and_evaluate(c, str(tmp_path / "res"), progress=False)
    assert _losses(tmp_path / "res") == _losses(tmp_path / "full")
    assert resumed.val_loss == full.val_loss and _losses(tmp_path / "full")[4] < first


def test_workdir_init_starts_from_the_runs_weights(tmp_path):
    corpus = conftest.tiny_corpus(tmp_path)
    pre = conftest.tiny_run_config(corpus, tmp_path, {
        "train.steps": 2, "train.save_every": 2, "train.async_checkpointing": False})
    loop.train_and_evaluate(pre, str(tmp_path / "pre"), progress=False)
    c = conftest.tiny_run_config(corpus, tmp_path, {
        "train.steps": 1, "train.async_checkpointing": False})
    c.init.kind, c.init.path = "workdir", str(tmp_path / "pre")
    c.init.execution = "embd_pdrop=0,attn_pdrop=0,resid_pdrop=0"
    c.model.n_embd = 64  # not used: the architecture is the run's
    c.tokenizer.kind = "sentencepiece"  # not used either
    res = loop.train_and_evaluate(c, str(tmp_path / "ft"), progress=False)
    mc, params, tok = load_pretrained(workdir=str(tmp_path / "pre"))
    assert res.model_config.architecture() == mc.architecture() and res.tokenizer.kind == "char"
    run = loop.prepare(complete(c, base_config()), str(tmp_path / "ft"))
    b = run.batcher.batch(0)
    run.batcher.close()
    logits = GPT(mc).apply({"params": params}, b["inputs"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)
    np.testing.assert_allclose(_losses(tmp_path / "ft")[1], float(nll.mean()), rtol=1e-6)


def _lora_setup(weights, devices=None, fsdp=1):
    """A LoraSetup (rank 4, all four matrices) over a random 2 x 32 base of vocab 256."""
    from gptjax.defaults import model_config
    from gptjax.nn.model import init_params
    from gptjax.train.experiment import model_config_from
    c = base_config()
    c.model = model_config("tiny", vocab_size=256, n_layer=2, n_head=2, n_embd=32, n_ctx=16,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    c.optim.warmup_steps, c.optim.learning_rate = 0, 1e-2
    c.lora.rank, c.lora.targets, c.lora.base_weights = 4, "all", weights
    c.init.kind = "hf"  # (any pretrained kind: the base is given here)
    c.mesh.data, c.mesh.fsdp = -1, fsdp
    c.train.batch_size = 8
    mc = model_config_from(c)
    setup = LoraSetup(c, mc, 10, lora_settings(c), devices=devices)
    setup.set_base(init_params(mc, jax.random.key(0)))
    return setup


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_lora_steps_move_only_adapters(weights):
    setup = _lora_setup(weights)
    base_before = jax.device_get(setup.base)
    x = np.random.RandomState(0).randint(0, 256, (8, 17)).astype(np.int32)
    batch = setup.put_batch({"inputs": x[:, :-1], "targets": x[:, 1:]})
    state = setup.init_state(jax.random.key(1))
    a0 = jax.device_get(state.params)
    losses = []
    for _ in range(6):
        state, m = setup.train_step(state, batch, jax.random.key(2))
        losses.append(float(m["loss"]))
    assert losses[-1] < losses[0] - 0.05, losses
    for x0, x1 in zip(jax.tree_util.tree_leaves(base_before),
                      jax.tree_util.tree_leaves(jax.device_get(setup.base))):
        assert x0.dtype == x1.dtype and np.array_equal(x0, x1)  # bitwise
    if weights == "int8":
        assert any(x.dtype == np.int8 for x in jax.tree_util.tree_leaves(base_before))
    # Every adapter's B moved from zero; optimizer state only for adapters.
    for (_, ad0), (_, ad1) in zip(lora.adapters(a0), lora.adapters(jax.device_get(state.params))):
        assert not ad0.b.any() and ad1.b.any()
    n_ad = lora.num_lora_params(state.params)
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(state.opt_state)
                if x.ndim > 0)
    assert n_opt == 2 * n_ad  # Adam's two moments of the adapters, nothing of the base


def test_lora_run_merges_refuses_another_base_and_resumes(tmp_path, hf_dir):
    hf = tmp_path / "hf"
    shutil.copytree(hf_dir, hf)
    c = _config(tmp_path, hf, train__steps=2, lora__rank=4, lora__targets="c_attn,mlp.c_fc")
    loop.train_and_evaluate(c, str(tmp_path / "lora"), progress=False)
    wd = str(tmp_path / "lora")
    mc, base, adapters, lcfg, tok = load_lora_run(wd)
    assert lcfg.rank == 4 and lcfg.targets == ("attn.c_attn", "mlp.c_fc")
    assert tok.kind == "gpt2_bpe" and any(ad.b.any() for _, ad in lora.adapters(adapters))
    ckpt_files = os.listdir(tmp_path / "lora" / "checkpoints" / "2" / "state")
    assert ckpt_files  # adapters + their optimizer state only: far smaller than the base
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
               os.walk(tmp_path / "lora" / "checkpoints" / "2") for f in fs)
    assert size < os.path.getsize(hf / "model.safetensors") / 4, size
    # load_pretrained(workdir=<LoRA run>) is the merged model: sample/eval/serve read it as is.
    mc2, merged, _ = load_pretrained(workdir=wd)
    x = np.arange(16, dtype=np.int32)[None]
    np.testing.assert_allclose(GPT(mc2).apply({"params": merged}, x),
                               lora.apply(mc, base, adapters, x), rtol=1e-5, atol=1e-6)
    # Resuming with another rank, or over another base, is refused in one line.
    with pytest.raises(CheckpointError, match="lora.rank=4"):
        loop.train_and_evaluate(_config(tmp_path, hf, train__steps=3, lora__rank=8,
                                        lora__targets="c_attn,mlp.c_fc"), wd, progress=False)
    from transformers import GPT2LMHeadModel
    m = GPT2LMHeadModel.from_pretrained(hf)
    m.transformer.h[0].mlp.c_fc.weight.data += 1.0
    m.save_pretrained(hf)
    c3 = _config(tmp_path, hf, train__steps=3, lora__rank=4, lora__targets="c_attn,mlp.c_fc")
    with pytest.raises(CheckpointError, match="another base") as e:
        loop.train_and_evaluate(c3, wd, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("change, fragment", [
    ({"lora.targets": "attn.q_proj"}, "'attn.q_proj' names no module"),
    ({"lora.base_weights": "int4"}, "lora.base_weights='int4'"),
    ({"lora.rank": -1}, "lora.rank=-1"),
    ({"lora.alpha": 0.0}, "lora.alpha=0.0"),
    ({"init.kind": "scratch"}, "set init.kind to 'hf' or 'workdir'"),
    ({"init.kind": "gguf"}, "init.kind"),
    ({"init.path": "/nonexistent"}, "init.path='/nonexistent'"),
    ({"init.execution": "n_layer=3"}, "n_layer=3"),
])
def test_bad_init_and_lora_config_is_one_line(tmp_path, hf_dir, change, fragment):
    c = _config(tmp_path, hf_dir, lora__rank=4)
    for k, v in change.items():
        section, name = k.split(".")
        c[section][name] = v
    with pytest.raises(ConfigError) as e:
        check_train_config(complete(c, base_config()))
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)
