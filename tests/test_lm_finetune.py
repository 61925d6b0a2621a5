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
from gptjax.train.start import check_run_meta

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


def _settings(tmp, hf, changes) -> dict:
    """configs/finetune_shakespeare.py's changes for a tiny run from `hf`: 16-token windows,
    batch 4, no accumulation, 3 steps (unless `changes` say otherwise: 'train__steps' is
    train.steps); data a small text file under `tmp`."""
    return dict({
        "init.path": str(hf), "data.path": str(conftest.tiny_corpus(tmp, TEXT)),
        "data.cache_dir": str(tmp / "cache"), "data.data_dir": str(tmp / "tfds"),
        "data.seq_len": 16, "train.batch_size": 4, "train.accum_steps": 1, "train.steps": 3,
        "train.eval_every": 0, "train.eval_batches": 1, "train.eval_batch_size": 4,
        "train.save_every": 2, "train.async_checkpointing": False, "sample.max_new_tokens": 0,
        "optim.learning_rate": 1e-2},  # (a tiny random model: steps that move)
        **{k.replace("__", "."): v for k, v in changes.items()})


def _config(tmp, hf, **changes):
    c = _shakespeare_config()
    for k, v in _settings(tmp, hf, changes).items():
        section, name = k.split(".")
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
    wd = str(tmp_path / "run")
    loop.train_and_evaluate(_config(tmp_path, hf, train__steps=2), wd, progress=False)
    # The first logged loss is transformers' loss on the run's batch of step 0.
    run = loop.prepare(complete(_config(tmp_path, hf), base_config()), wd)
    b = run.batcher.batch(0)
    run.batcher.close()
    ids = torch.tensor(np.concatenate([b["inputs"], b["targets"][:, -1:]], 1), dtype=torch.long)
    with torch.no_grad():
        ref = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()(ids, labels=ids).loss.item()
    losses = _losses(wd)
    assert abs(losses[1] - ref) <= 1e-5 * abs(ref), (losses[1], ref)
    # The run holds the pretrained model's tokenizer and architecture, not config.model's.
    saved = json.load(open(os.path.join(wd, "model_config.json")))
    assert (saved["n_layer"], saved["n_embd"], saved["vocab_size"], saved["n_ctx"]) == (
        2, 32, 50257, 64)
    assert run.tokenizer.kind == "gpt2_bpe" and run.tokenizer.vocab_size == 50257
    # Resumed, it continues from its own checkpoint of step 2 (the weights file is gone).
    os.remove(hf / "model.safetensors")
    res = loop.train_and_evaluate(_config(tmp_path, hf, train__steps=3), wd, progress=False)
    after = _losses(wd)
    assert res.step == 3 and sorted(after) == [1, 2, 3] and after[2] == losses[2]
    assert after[3] < losses[1]


def test_workdir_init_starts_from_the_runs_weights(tmp_path, tiny_run):
    """init.kind=workdir from conftest's tiny train.py run (its step-8 checkpoint)."""
    c = conftest.tiny_run_config(conftest.tiny_corpus(tmp_path), tmp_path, {
        "train.steps": 1, "train.async_checkpointing": False, "train.eval_batch_size": 64})
    c.init.kind, c.init.path, c.init.step = "workdir", str(tiny_run[0]), 8
    c.init.execution = "embd_pdrop=0,attn_pdrop=0,resid_pdrop=0"
    c.model.n_embd = 64  # not used: the architecture is the run's
    c.tokenizer.kind = "sentencepiece"  # not used either
    res = loop.train_and_evaluate(c, str(tmp_path / "ft"), progress=False)
    mc, params, tok = load_pretrained(workdir=str(tiny_run[0]), step=8)
    assert res.model_config.architecture() == mc.architecture() and res.tokenizer.kind == "char"
    run = loop.prepare(complete(c, base_config()), str(tmp_path / "ft"))
    b = run.batcher.batch(0)
    run.batcher.close()
    logits = GPT(mc).apply({"params": params}, b["inputs"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), b["targets"][..., None], -1)
    np.testing.assert_allclose(_losses(tmp_path / "ft")[1], float(nll.mean()), rtol=1e-6)
    meta = json.load(open(tmp_path / "ft" / "checkpoints" / "1" / "meta" / "metadata"))
    assert "lora" not in meta and meta["model_config"]["n_embd"] == 32


# A LoRA run over the tiny GPT-2 (int8 base, adapter dropout on, all four matrices), 8 steps.
# (fp32 and bf16 bases, sharded and not, whose every value stays as it was: tests/
# multidevice_sharding.py.)
LORA = {"train__steps": 8, "lora__rank": 4, "lora__targets": "c_attn,c_proj,mlp.c_fc",
        "lora__dropout": 0.1, "lora__base_weights": "int8", "train__eval_every": 4}


@pytest.fixture(scope="module")
def lora_ref(tmp_path_factory, hf_dir):
    """(folder, the LoRA run's result, its work directory), trained in-process once."""
    tmp = tmp_path_factory.mktemp("lora")
    res = loop.train_and_evaluate(_config(tmp, hf_dir, **LORA), str(tmp / "ref"), progress=False)
    return tmp, res, tmp / "ref"


def test_lora_run_merges_and_refuses_another_base(tmp_path, hf_dir, lora_ref):
    _, res, wd = lora_ref
    mc, base, adapters, lcfg, tok = load_lora_run(str(wd))
    assert (lcfg.rank, lcfg.alpha, lcfg.dropout) == (4, 16.0, 0.1)
    assert lcfg.targets == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert tok.kind == "gpt2_bpe" and base["wte"]["embedding_q"].values.dtype == jnp.int8
    # Over the int8 base the adapters trained: the loss fell, every B moved from zero, and the
    # optimizer state is Adam's two moments of the adapters (nothing of the base).
    losses = _losses(wd)
    assert losses[8] < losses[1] - 0.1, losses
    assert all(ad.b.any() for _, ad in lora.adapters(adapters))
    n_opt = sum(x.size for x in jax.tree_util.tree_leaves(res.state.opt_state) if x.ndim > 0)
    assert n_opt == 2 * lora.num_lora_params(adapters) == 2 * lora.num_lora_params(
        res.state.params)
    # A checkpoint holds the adapters and their optimizer state only: far less than the base.
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
               os.walk(wd / "checkpoints" / "8" / "state") for f in fs)
    assert size < os.path.getsize(hf_dir / "model.safetensors") / 4, size
    meta = json.load(open(wd / "checkpoints" / "8" / "meta" / "metadata"))
    assert meta["lora"]["base_weights"] == "int8" and meta["base"]["kind"] == "hf"
    assert len(meta["base"]["fingerprint"]) == 16
    # load_pretrained(workdir=<LoRA run>) is the merged model: sample/eval/serve read it as is.
    mc2, merged, _ = load_pretrained(workdir=str(wd))
    x = np.arange(16, dtype=np.int32)[None]
    np.testing.assert_allclose(GPT(mc2).apply({"params": merged}, x),
                               lora.apply(mc, base, adapters, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(jax.device_get(res.model_params()["wpe"]["embedding"]),
                                  merged["wpe"]["embedding"])
    # Resuming with other LoRA settings, without LoRA, or over another base is refused in one
    # line (the last through a run).
    here = {"lora": dict(meta["lora"], rank=8), "base": meta["base"]}
    with pytest.raises(CheckpointError, match="has lora.rank=4, this config 8"):
        check_run_meta(8, meta, model_cfg=mc, tokenizer=meta["tokenizer"], init_meta=here)
    with pytest.raises(CheckpointError, match=r"holds LoRA adapters but this config trains "
                       r"the full model \(lora.rank=0\)"):
        check_run_meta(8, meta, model_cfg=mc, tokenizer=meta["tokenizer"], init_meta={})
    shutil.copytree(wd, tmp_path / "run")
    from transformers import GPT2LMHeadModel
    m = GPT2LMHeadModel.from_pretrained(hf_dir)
    m.transformer.h[0].mlp.c_fc.weight.data += 1.0
    m.save_pretrained(tmp_path / "hf2")
    for f in ("vocab.json", "merges.txt"):
        shutil.copy(hf_dir / f, tmp_path / "hf2" / f)
    with pytest.raises(CheckpointError, match="another base") as e:
        loop.train_and_evaluate(_config(lora_ref[0], tmp_path / "hf2", **LORA),
                                str(tmp_path / "run"), progress=False)
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


def test_lora_run_sigterm_then_same_command_is_bit_exact(tmp_path, hf_dir, lora_ref):
    """A LoRA run (adapter dropout on) stopped by SIGTERM, then the same command: the losses and
    the final validation loss of an uninterrupted run (in-process), bit for bit."""
    import signal
    import subprocess
    import sys
    import time
    tmp, ref, _ = lora_ref
    wd = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--config=configs/finetune_shakespeare.py",
           f"--workdir={wd}", "--no_progress",
           *(f"--config.{k}={v}" for k, v in _settings(tmp, hf_dir, LORA).items())]
    env = conftest.subprocess_env()
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=dict(env, GPTJAX_FAULT_STEP_SLEEP_S="0.5"))
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not (
            (wd / "metrics.jsonl").exists() and len(_losses(wd)) >= 3):
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    stopped = int(out.split("SIGTERM: stopped after step ")[1].split()[0])
    assert 3 <= stopped < 8 and not (wd / "summary.json").exists()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"resumed from step {stopped}" in r.stdout and f"steps {stopped}->8" in r.stdout
    assert _losses(wd) == _losses(lora_ref[2]) and len(_losses(wd)) == 8
    assert json.load(open(wd / "summary.json"))["val_loss"] == ref.val_loss


def test_dry_run_states_lora_and_full_memory_without_weights(tmp_path, hf_dir):
    """train.py --dry_run with lora.rank > 0 reads only init.path's config.json: the LoRA plan
    (frozen int8 base + adapters; optimizer state and gradients of the adapters only) and the
    full-finetuning plan of the same model."""
    from gptjax.train.lora_setup import make_setup
    from gptjax.train.memory import dry_run, memory_plan
    from gptjax.train.start import init_architecture
    (tmp_path / "cfg").mkdir()
    shutil.copy(hf_dir / "config.json", tmp_path / "cfg" / "config.json")  # no weights
    c = complete(_config(tmp_path, tmp_path / "cfg", lora__rank=8, lora__targets="all",
                         lora__base_weights="int8"), base_config())
    text = dry_run(c, str(tmp_path / "wd"), compile_step=False)
    assert "full finetuning (lora.rank=0), memory plan" in text and "in int8, adapters" in text
    mc = init_architecture(c)
    lora_plan = memory_plan(make_setup(c, mc, 3), 4, 16)
    c.lora.rank, c.lora.base_weights = 0, "fp32"
    full = memory_plan(make_setup(c, mc, 3), 4, 16)
    # 2 layers x rank 8 x (in + out) of c_attn, attn.c_proj, c_fc, mlp.c_proj
    n_ad = 2 * 8 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert lora_plan["adapters"] == lora_plan["gradients"] == 4 * n_ad
    assert 2 * 4 * n_ad <= lora_plan["optimizer_state"] < 2 * 4 * n_ad + 64
    assert full["params"] == 4 * mc.num_params() and full["gradients"] == full["params"]
    # int8 kernels and embedding (fp32 scales, biases, norms, positions): about a quarter.
    assert full["params"] / 4.2 < lora_plan["base"] < full["params"] / 3
    assert lora_plan["params"] == lora_plan["base"] + lora_plan["adapters"]
    assert not os.path.exists(tmp_path / "wd" / "tokenizer")  # nothing built or read
