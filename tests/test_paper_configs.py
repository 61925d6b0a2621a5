"""The pretraining configs against the papers' numbers (issue 21, item 4).

Every value is read from the config objects, and the learning-rate schedule from the optimizer
they build (gptjax.train.optim.make_optimizer): the rate at step 0, at the end of warmup and at
the end of the decay. The papers: GPT-1 (Radford et al. 2018, section 4.1), GPT-2 (Radford et al.
2019, section 2.3; optimizer and budget assumed, see configs/gpt2.py), nanoGPT's GPT-2
reproduction (config/train_gpt2.py), GPT-3 (Brown et al. 2020, Table 2.1 and Appendix B).
"""

import importlib.util
import math

import pytest

from conftest import REPO
from gptjax import sharding as shd
from gptjax.config import REMAT_POLICIES, ConfigError
from gptjax.train.experiment import check_train_config, model_config_from, resolve_steps
from gptjax.train.optim import decay_mask, make_optimizer


def load(name):
    spec = importlib.util.spec_from_file_location("paper_cfg_" + name,
                                                  REPO / "configs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def lr_at(c, total_steps, steps):
    _, sched = make_optimizer(c.optim, total_steps)
    return [float(sched(s)) for s in steps]


def chips(topology: str) -> int:
    """Chips of a single-slice TPU topology name ('v5e:2x2' -> 4, 'v5p:4x4x8' -> 128)."""
    return math.prod(int(d) for d in topology.split(":")[1].split("x"))


def check_pod(c, pod, seq_len):
    """The documented mesh covers the topology, is what the config resolves to there, divides
    the batch, and the remat policy is the config's."""
    n = chips(pod["topology"])
    assert math.prod(pod["mesh"].values()) == n
    resolved = shd.resolve_mesh_shape({a: c.mesh[a] for a in shd.MESH_AXES}, n)
    assert {a: resolved[a] for a in pod["mesh"]} == pod["mesh"]
    dp = pod["mesh"]["data"] * pod["mesh"]["fsdp"]
    assert c.train.batch_size % (dp * c.train.accum_steps) == 0
    assert c.model.remat == pod["remat"] and pod["remat"] in REMAT_POLICIES
    check_train_config(c, num_devices=n)  # the experiment's own validation on that slice
    assert (c.data.seq_len or c.model.n_ctx) == seq_len


# ============================================================================ GPT-1
def test_gpt1_section_4_1():
    mod = load("gpt1")
    c = mod.get_config()
    mc = model_config_from(c, vocab_size=40478 + 3)
    assert (mc.n_layer, mc.n_embd, mc.n_head, mc.n_inner or 4 * mc.n_embd) == (12, 768, 12, 3072)
    assert mc.n_ctx == 512 and mc.norm_position == "post" and mc.activation.startswith("gelu")
    assert (mc.embd_pdrop, mc.attn_pdrop, mc.resid_pdrop) == (0.1, 0.1, 0.1)
    assert c.tokenizer.vocab_size == 40478          # 40,000 merges + the base pieces
    assert c.train.batch_size == 64 and c.data.sampling == "random_offset"
    o = c.optim
    assert (o.learning_rate, o.warmup_steps, o.schedule, o.min_lr) == (2.5e-4, 2000, "cosine", 0.0)
    assert (o.b1, o.b2, o.weight_decay, o.decay_steps) == (0.9, 0.999, 0.01, 0)
    assert o.decay_embeddings  # "all non bias or gain weights"
    mask = decay_mask({"wte": {"embedding": 0}, "h": {"attn": {"c_attn": {"kernel": 0, "bias": 0}},
                                                      "ln_1": {"scale": 0, "bias": 0}}})
    assert mask == {"wte": {"embedding": True}, "h": {"attn": {"c_attn": {"kernel": True,
                    "bias": False}}, "ln_1": {"scale": False, "bias": False}}}
    # 100 epochs, as epochs: resolved from the training split's size.
    assert c.train.epochs == 100
    tokens = 800_000_000                            # ~BooksCorpus
    steps = resolve_steps(c, tokens, 512)
    assert steps == math.ceil(100 * tokens / (64 * 512)) == 2_441_407
    lr0, lr_peak, lr_end = lr_at(c, steps, [0, 2000, steps])
    assert lr0 == 0.0 and lr_peak == pytest.approx(2.5e-4)
    assert lr_end == pytest.approx(0.0, abs=1e-12)
    check_pod(c, mod.POD, 512)


def test_epochs_resolve_into_steps_and_are_checked():
    c = load("gpt1").get_config()
    c.train.epochs = 0.0
    assert resolve_steps(c, 10**9, 512) == c.train.steps  # epochs off: train.steps
    c.train.epochs = 0.5
    assert resolve_steps(c, 64 * 512 * 10, 512) == 5
    c.train.epochs = -1.0
    with pytest.raises(ConfigError, match="train.epochs"):
        check_train_config(c, num_devices=1)


# ============================================================================ GPT-2
@pytest.mark.parametrize("size,lr", [("gpt2", 6e-4), ("gpt2-medium", 3e-4),
                                     ("gpt2-large", 2.5e-4), ("gpt2-xl", 2e-4)])
def test_gpt2_paper(size, lr):
    mod = load("gpt2")
    assert "ASSUMED" in mod.__doc__ and "token budget" in mod.__doc__
    c = mod.get_config(size)
    mc = model_config_from(c)
    assert mc.n_ctx == 1024 and mc.norm_position == "pre"
    assert c.tokenizer.kind == "gpt2_bpe"           # 50,257 tokens, padded:
    assert mc.vocab_size == 50304 and mc.vocab_size % 64 == 0 and mc.vocab_size >= 50257
    assert c.train.batch_size == 512 and c.train.accum_steps == 1   # paper: 512 x 1024
    assert c.train.steps == math.ceil(300e9 / (512 * 1024)) == 572_205  # assumed 300B tokens
    o = c.optim
    assert (o.learning_rate, o.min_lr, o.warmup_steps, o.decay_steps) == (lr, 0.1 * lr, 2000, 0)
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    lr0, lr_peak, lr_end = lr_at(c, c.train.steps, [0, 2000, c.train.steps])
    assert lr0 == 0.0 and lr_peak == pytest.approx(lr) and lr_end == pytest.approx(0.1 * lr)
    check_pod(c, mod.POD[size], 1024)


def test_gpt2_nanogpt_reproduction():
    mod = load("gpt2_nanogpt")
    assert "nanoGPT" in mod.__doc__ and "NOT the paper" in mod.__doc__
    c = mod.get_config()
    mc = model_config_from(c)
    assert (mc.n_layer, mc.n_embd, mc.n_ctx, mc.vocab_size) == (12, 768, 1024, 50304)
    assert (mc.embd_pdrop, mc.attn_pdrop, mc.resid_pdrop) == (0.0, 0.0, 0.0)
    # 480 = micro-batch 12 x 5 accumulation steps x 8 devices
    dp = mod.POD["mesh"]["data"] * mod.POD["mesh"]["fsdp"]
    assert c.train.batch_size == 480 and c.train.accum_steps == 5 and dp == 8
    assert c.train.batch_size // (dp * c.train.accum_steps) == 12
    o = c.optim
    assert (o.learning_rate, o.warmup_steps, o.decay_steps, o.min_lr) == (6e-4, 2000, 600_000, 6e-5)
    assert (o.b1, o.b2, o.weight_decay, o.grad_clip) == (0.9, 0.95, 0.1, 1.0)
    assert c.train.steps == 600_000
    lr0, lr_peak, lr_end = lr_at(c, c.train.steps, [0, 2000, 600_000])
    assert lr0 == 0.0 and lr_peak == pytest.approx(6e-4) and lr_end == pytest.approx(6e-5)
    check_pod(c, mod.POD, 1024)


# ============================================================================ GPT-3
# Table 2.1: n_layers, d_model, d_head, learning rate, batch size in tokens. (13B's d_model is
# printed as 5140; 40 heads x 128 = 5120 is the model. XL's 24 heads do not divide 2048 into
# d_head 128; the preset keeps d_head 128 with 16 heads.)
TABLE_2_1 = {
    "gpt3-small": (12, 768, 64, 6.0e-4, 0.5e6),
    "gpt3-medium": (24, 1024, 64, 3.0e-4, 0.5e6),
    "gpt3-large": (24, 1536, 96, 2.5e-4, 0.5e6),
    "gpt3-xl": (24, 2048, 128, 2.0e-4, 1e6),
    "gpt3-2.7b": (32, 2560, 80, 1.6e-4, 1e6),
    "gpt3-6.7b": (32, 4096, 128, 1.2e-4, 2e6),
    "gpt3-13b": (40, 5120, 128, 1.0e-4, 2e6),
    "gpt3-175b": (96, 12288, 128, 0.6e-4, 3.2e6),
}


@pytest.mark.parametrize("size", sorted(TABLE_2_1))
def test_gpt3_table_2_1_and_appendix_b(size):
    n_layer, d_model, d_head, lr, batch_tokens = TABLE_2_1[size]
    mod = load("gpt3")
    c = mod.get_config(size)
    mc = model_config_from(c)
    assert (mc.n_layer, mc.n_embd, mc.n_embd // mc.n_head if mc.head_dim is None else mc.head_dim,
            mc.n_ctx) == (n_layer, d_model, d_head, 2048)
    assert mc.attention_pattern == ("dense", "local") and mc.local_window == 256
    # Batch: a multiple of 256 sequences within 5% of the paper's tokens per batch, and the
    # docstring states the difference.
    tokens = c.train.batch_size * 2048
    assert c.train.batch_size % 256 == 0 and abs(tokens / batch_tokens - 1) <= 0.05
    assert f"{tokens:,}" in mod.__doc__
    assert f"{100 * (tokens / batch_tokens - 1):+.2f}%" in mod.__doc__
    o = c.optim
    assert (o.learning_rate, o.min_lr, o.schedule) == (lr, pytest.approx(0.1 * lr), "cosine")
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    # 375M tokens of warmup, cosine to 10% at 260B tokens, 300B in all (to within one update).
    assert abs(o.warmup_steps * tokens - 375e6) < tokens
    assert abs(o.decay_steps * tokens - 260e9) < tokens
    assert 0 <= c.train.steps * tokens - 300e9 < tokens
    lr0, lr_peak, lr_decayed, lr_end = lr_at(c, c.train.steps, [0, o.warmup_steps, o.decay_steps,
                                                                 c.train.steps])
    assert lr0 == 0.0 and lr_peak == pytest.approx(lr)
    assert lr_decayed == pytest.approx(0.1 * lr) and lr_end == pytest.approx(0.1 * lr)
    check_pod(c, mod.POD[size], 2048)
