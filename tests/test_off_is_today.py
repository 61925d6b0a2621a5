"""Off means today's program (issue [7/7]): with capture, interventions and per-layer statistics
off, the lowered forward pass and train step are textually the ones gptjax lowered before any of
them existed (GPT-1 with dropout, GPT-3's dense/local pattern scanned with remat, and the sharded
step train.py compiles for a GPT-2), and the training losses are equal to the last bit.

"Before" is gptjax/ at commit BASE (the last commit before the taps and the statistics step),
read from this repository's git history into a temporary directory; the same child script runs
against it and against the working tree, each in its own process. A later change that alters
the plain programs on purpose moves BASE forward in the same commit, saying why.
"""

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO

BASE = "564048a"  # next35's tip: issue [6/7] done, issue [7/7] not started

_CHILD = r"""
import hashlib, json
import jax, jax.numpy as jnp, optax
from gptjax import GPT, GPTConfig, init_params
from gptjax.defaults import base_config, complete, model_config
from gptjax.train import topology as topo
from gptjax.train.experiment import model_config_from
from gptjax.train.setup import Setup
from gptjax.train.step import TrainState, make_train_step

def sha(text):
    return hashlib.sha256(text.encode()).hexdigest()

CONFIGS = {  # (GPT-2's train step: Setup's, below)
    "gpt3_scan_remat": ("tiny-gpt3", dict(scan_layers=True, remat="full", local_window=4)),
    "gpt1_dropout": ("tiny-gpt1", dict()),
}
out = {}
tokens = (jnp.arange(48).reshape(4, 12) * 7) % 64
batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1)}
for name, (preset, fields) in CONFIGS.items():
    cfg = GPTConfig.preset(preset, vocab_size=64, n_ctx=16, **fields)
    params = init_params(cfg, jax.random.key(0))
    opt = optax.adamw(1e-3)
    step = make_train_step(cfg, opt, lambda s: 1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
    fwd = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t)).lower(params, tokens)
    train = jax.jit(lambda *a: step(*a)).lower(state, batch, jax.random.key(0))
    out[name] = dict(forward=sha(fwd.as_text()), train_step=sha(train.as_text()),
                     logits=float(jnp.sum(fwd.compile()(params, tokens))).hex(), losses=[])
    train = train.compile()
    for i in range(3):
        state, metrics = train(state, batch, jax.random.key(i))
        out[name]["losses"].append(float(metrics["loss"]).hex())
# The run's own step: Setup's sharded train step (what train.py compiles), statistics unset.
c = base_config()
c.model = model_config("tiny", vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_ctx=16)
c.train.batch_size = 4
c = complete(c, base_config())
setup = Setup(c, model_config_from(c), 1000)
with setup.mesh:
    args = topo._abstract_args(setup, 4, 16)
    out["setup_train_step"] = sha(setup.train_step.lower(*args).as_text())
import gptjax
out["_source"] = gptjax.__file__
print(json.dumps(out))
"""


def _run(pythonpath: str) -> dict:
    env = dict(os.environ, PYTHONPATH=pythonpath, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device, as the plain single-device programs
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                         cwd=pythonpath, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


def _base_tree(tmp_path) -> str:
    has = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{BASE}^{{commit}}"],
                         capture_output=True)
    if has.returncode != 0:  # e.g. a shallow clone or a source tarball: nothing to compare with
        pytest.skip(f"commit {BASE} is not in this checkout's git history")
    tar = subprocess.run(["git", "-C", str(REPO), "archive", BASE, "gptjax"],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as t:
        t.extractall(tmp_path, filter="data")
    return str(tmp_path)


def test_plain_programs_and_losses_are_the_ones_before_capture_and_statistics(tmp_path):
    before = _run(_base_tree(tmp_path))
    now = _run(str(REPO))
    # Each child imported the tree it was given (not an installed gptjax).
    assert before.pop("_source").startswith(str(tmp_path)), before
    assert now.pop("_source").startswith(str(REPO)), now
    assert set(before) == set(now) == {"gpt3_scan_remat", "gpt1_dropout", "setup_train_step"}
    assert now == before
