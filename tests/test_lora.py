"""LoRA as pure functions (gptjax.nn.lora): merged == unmerged, only adapters get gradients,
weight-only bases, the train step's HLO untouched when no adapter is given, one-line errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import GPT, GPTConfig, init_params
from gptjax.nn import lora, quant


def _cfg(scan=False):
    return GPTConfig.preset("tiny", vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_ctx=16,
                            scan_layers=scan)


def _adapters(cfg, targets=("all",), rank=4):
    ad = lora.init_lora(cfg, lora.LoraConfig(rank=rank, alpha=8, targets=targets),
                        jax.random.key(1))
    # B starts at zero; move it so the branch matters.
    return jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(2), x.shape), ad)


TOKENS = jnp.arange(24).reshape(2, 12) % 64


@pytest.mark.parametrize("scan", [False, True])
def test_merged_equals_unmerged(scan):
    cfg = _cfg(scan)
    base = init_params(cfg, jax.random.key(0))
    ad = _adapters(cfg)
    unmerged = lora.apply(cfg, base, ad, TOKENS)
    merged = GPT(cfg).apply({"params": lora.merge(cfg, base, ad)}, TOKENS)
    plain = GPT(cfg).apply({"params": base}, TOKENS)
    assert float(jnp.max(jnp.abs(unmerged - plain))) > 1e-2  # the adapters change the model
    np.testing.assert_allclose(unmerged, merged, rtol=1e-6, atol=1e-6 * float(
        jnp.max(jnp.abs(merged))))


def test_new_adapter_is_the_identity():
    cfg = _cfg()
    base = init_params(cfg, jax.random.key(0))
    ad = lora.init_lora(cfg, lora.LoraConfig(rank=2, targets=("c_attn", "c_fc")),
                        jax.random.key(1))
    np.testing.assert_array_equal(lora.apply(cfg, base, ad, TOKENS),
                                  GPT(cfg).apply({"params": base}, TOKENS))


@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_weight_only_base(weights):
    cfg = _cfg()
    base = quant.quantize_params(cfg, init_params(cfg, jax.random.key(0)), weights)
    ad = _adapters(cfg)
    got = lora.apply(cfg, base, ad, TOKENS)
    want = GPT(cfg).apply({"params": lora.merge(cfg, base, ad)}, TOKENS)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda a: jnp.sum(lora.apply(cfg, base, a, TOKENS) ** 2))(ad)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads))


def test_targets_and_counts():
    cfg = _cfg()
    ad = lora.init_lora(cfg, lora.LoraConfig(rank=4, targets=("c_proj",)), jax.random.key(0))
    names = sorted(".".join(p) for p, _ in lora.adapters(ad))
    assert names == ["h_0.attn.c_proj", "h_0.mlp.c_proj", "h_1.attn.c_proj", "h_1.mlp.c_proj"]
    # attn.c_proj: A [H, D, r] + B [r, C]; mlp.c_proj: A [F, r] + B [r, C]
    per_layer = (2 * 16 * 4 + 4 * 32) + (128 * 4 + 4 * 32)
    assert lora.num_lora_params(ad) == 2 * per_layer


@pytest.mark.parametrize("bad, msg", [
    (dict(targets=("q_proj",)), "lora.targets: 'q_proj' names no module; allowed: attn.c_attn"),
    (dict(rank=0), "lora.rank=0: must be an integer >= 1"),
    (dict(dropout=1.0), "lora.dropout=1.0: must be a number in [0, 1)"),
])
def test_bad_config_is_one_line(bad, msg):
    with pytest.raises(ValueError) as e:
        lora.init_lora(_cfg(), lora.LoraConfig(**bad), jax.random.key(0))
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


def test_adapter_of_another_model_is_one_line():
    small, big = _cfg(), GPTConfig.preset("tiny", vocab_size=64, n_layer=2, n_head=2, n_embd=48,
                                          n_ctx=16)
    ad = lora.init_lora(big, lora.LoraConfig(rank=4), jax.random.key(0))
    base = init_params(small, jax.random.key(0))
    for fn in (lambda: lora.merge(small, base, ad), lambda: lora.apply(small, base, ad, TOKENS)):
        with pytest.raises(ValueError) as e:
            fn()
        msg = str(e.value)
        assert msg.startswith("adapter h_0.attn.c_attn has A (48, 4) and B (4, 3, 2, 24); this "
                              "model's kernel (32, 3, 2, 16) takes A (32, 4)"), msg
        assert "\n" not in msg
    stacked = lora.init_lora(_cfg(scan=True), lora.LoraConfig(rank=4), jax.random.key(0))
    with pytest.raises(ValueError, match=r"adapter h.block_0.attn.c_attn: this model has no "
                       r"Linear there to adapt"):
        lora.merge(small, base, stacked)
