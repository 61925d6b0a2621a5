"""Shared test fixtures: where the shared data lives, and small configs."""

import atexit
import contextlib
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

# With the `tpu` extra installed (tests/test_topology.py) but no TPU here, keep JAX on CPU: libtpu
# would otherwise probe for a TPU and print warnings. Topology compiles still work with this.
if (importlib.util.find_spec("libtpu") and "JAX_PLATFORMS" not in os.environ
        and not os.path.exists("/dev/accel0") and not os.path.exists("/dev/vfio/0")):
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest

# fp32 parity tests compare against transformers/full-precision references at 1e-4..1e-6. On GPUs
# XLA's default precision runs fp32 matmuls in TF32 (10-bit mantissa), which is a speed setting,
# not the model's numerics: tests ask for full fp32 so that they check the same thing everywhere.
jax.config.update("jax_default_matmul_precision", "highest")

# In-process tests run under JAX's default (asynchronous) dispatch whichever test comes first: the
# library never applies gptjax.train.hostmem (the entry scripts do, at their process edge), and
# with the backend created here a test that calls hostmem.inline_cpu_dispatch() itself changes
# nothing for the tests after it. Tests that run train.py or finetune.py in a child process get
# what users get.
jax.devices()

REPO = pathlib.Path(__file__).resolve().parents[1]


def shared_data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GPTJAX_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_tfds_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("GPTJAX_SHARED_TFDS", REPO.parent / "shared" / "tfds"))


@pytest.fixture
def shared_data() -> pathlib.Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"shared data folder {d} is absent (set GPTJAX_SHARED_DATA)")
    return d


@pytest.fixture
def shared_tfds() -> pathlib.Path:
    d = shared_tfds_dir()
    if not d.is_dir():
        pytest.skip(f"shared tfds data_dir {d} is absent (set GPTJAX_SHARED_TFDS)")
    return d


def small_hf_lm(family: str, seed: int, **shape):
    """A randomly initialised transformers LM ('openai': OpenAIGPTLMHeadModel, 'gpt2':
    GPT2LMHeadModel) of the given shape (vocab_size, n_positions, n_embd, n_layer, n_head), in
    eval mode, with torch seeded by `seed`."""
    import torch  # the reference libraries, imported only by the tests that compare with them
    import transformers

    torch.manual_seed(seed)
    if family == "openai":
        return transformers.OpenAIGPTLMHeadModel(transformers.OpenAIGPTConfig(**shape)).eval()
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape)).eval()


# ================================================================================ tiny runs
# The tiny train.py run that the end-to-end tests share (config key -> value); each test names
# only what it changes. One program (the learning-rate schedule is fixed: a run stopped early or
# run longer has the same one), so the session's XLA cache (`subprocess_env`) compiles it once.
TINY_RUN = {
    "data.dataset": "local_text", "data.validation_fraction": 0.1, "tokenizer.kind": "char",
    "model.n_layer": 1, "model.n_embd": 32, "model.n_head": 2, "model.n_ctx": 32,
    "train.steps": 12, "train.batch_size": 4, "train.log_every": 1, "train.eval_every": 0,
    "train.save_every": 4, "optim.warmup_steps": 2, "optim.decay_steps": 12,
    "sample.max_new_tokens": 0,
}
# A 16-wide pretrained decoder with checkpoints at steps 2 and 4 (the finetuning and zero-shot
# tests start from one): the changes to TINY_RUN.
PRETRAINED = {"model.n_embd": 16, "model.n_ctx": 48, "model.embd_pdrop": 0.0,
              "model.attn_pdrop": 0.0, "model.resid_pdrop": 0.0, "optim.warmup_steps": 1,
              "train.steps": 4, "train.eval_batches": 1, "train.eval_batch_size": 4,
              "train.save_every": 2, "train.async_checkpointing": False,
              "optim.decay_steps": 0}
TINY_TEXT = "".join(f"to be or not to be, line {i}\n" for i in range(300))


def tiny_corpus(root: pathlib.Path, text: str = TINY_TEXT) -> pathlib.Path:
    """`root`/corpus.txt holding `text` (written once)."""
    path = root / "corpus.txt"
    if not path.exists():
        path.write_text(text)
    return path


def tiny_settings(corpus, root, changes: Optional[dict] = None) -> dict:
    """TINY_RUN reading `corpus`, with its caches under `root`, and `changes` applied."""
    return dict(TINY_RUN, **{"data.path": str(corpus), "data.cache_dir": f"{root}/cache",
                             "data.data_dir": f"{root}/tfds"}, **(changes or {}))


def tiny_train_flags(corpus, root, workdir, changes: Optional[dict] = None, *extra) -> list:
    """train.py's flags for the tiny run (see `tiny_settings`) into `workdir`, then `extra`."""
    return [f"--workdir={workdir}", "--no_progress",
            *(f"--config.{k}={v}" for k, v in tiny_settings(corpus, root, changes).items()),
            *extra]


def tiny_run_config(corpus, root, changes: Optional[dict] = None):
    """The tiny run as a complete-able experiment ConfigDict (for in-process training)."""
    from gptjax.defaults import base_config  # local: keeps conftest light for collection

    c = base_config()
    for key, value in tiny_settings(corpus, root, changes).items():
        section, name = key.split(".")
        c[section][name] = value
    return c


# One persistent XLA compilation cache for the subprocesses of the whole session: the runs of
# the same programs (the tiny run above; sample.py on it) compile once, whichever test comes first.
XLA_CACHE = pathlib.Path(tempfile.mkdtemp(prefix="gptjax-tests-xla-"))
atexit.register(shutil.rmtree, XLA_CACHE, True)


class EvalRecorder:
    """A stand-in for a train Setup in evaluation tests (gptjax.train.run_data.evaluate /
    val_metrics): no mesh, batches as they are, every eval_step returns `result` and records the
    keys of the batch it was given in `seen`."""

    mesh = contextlib.nullcontext()

    def __init__(self, result=(1.0, 1.0)):
        self.result, self.seen = result, []

    def put_batch(self, batch):
        return batch

    def eval_step(self, params, batch):
        self.seen.append(set(batch))
        return self.result


def subprocess_env(devices: Optional[int] = None) -> dict:
    """The environment of a train.py / sample.py subprocess: this repository first on the path,
    JAX on CPU (`devices` fake ones, if given), the session's XLA cache, and no fault injection
    or debug output set."""
    e = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
             JAX_COMPILATION_CACHE_DIR=str(XLA_CACHE),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    if devices is not None:
        e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    for k in list(e):
        if k.startswith("GPTJAX_FAULT_") or k == "GPTJAX_DEBUG":
            del e[k]
    return e


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """(the session's folder holding the tiny corpus and its caches, the environment of the
    subprocesses that train on it). Tests name their work directories in it uniquely."""
    tmp = tmp_path_factory.mktemp("tiny")
    tiny_corpus(tmp)
    return tmp, subprocess_env()


def train_flags(tmp, workdir, *extra):
    """train.py's flags for the tiny run on `env`'s corpus (`tmp`): 12 steps, a checkpoint every
    4, all kept; `extra` flags after them (later flags win)."""
    return tiny_train_flags(tmp / "corpus.txt", tmp, workdir, {"train.keep_checkpoints": 10},
                            *extra)


@pytest.fixture(scope="session")
def tiny_run(env):
    """The tiny run, trained once per session by `python train.py` with `train_flags` and a
    20-character sample of "to be" at the end: (work directory, the run's stdout). Tests that
    change it work on a copy."""
    wd = env[0] / "tiny_run"
    r = subprocess.run([sys.executable, "train.py", *train_flags(
        env[0], wd, "--config.sample.max_new_tokens=20", "--config.sample.prompt=to be")],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env[1])
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return wd, r.stdout


def hf_gpt2_dir(d: pathlib.Path, n_positions: int, **shape) -> pathlib.Path:
    """`d` as a transformers GPT-2 directory: a seeded 2 x 32 model of `n_positions` (and
    `shape`), with GPT-2's real BPE files from the shared data (skips the test without them)."""
    bpe = shared_data_dir() / "gpt2_bpe"
    if not bpe.is_dir():
        pytest.skip(f"{bpe} is absent")
    shape = dict(dict(vocab_size=50257, n_embd=32, n_layer=2, n_head=2), **shape)
    small_hf_lm("gpt2", 0, n_positions=n_positions, **shape).save_pretrained(d)
    shutil.copy(bpe / "encoder.json", d / "vocab.json")
    shutil.copy(bpe / "vocab.bpe", d / "merges.txt")
    return d
