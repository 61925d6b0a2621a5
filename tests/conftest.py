"""Shared test fixtures: where the shared data lives, and small configs."""

import importlib.util
import os
import pathlib

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
