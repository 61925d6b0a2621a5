"""Every attention implementation available here equals the masked XLA reference.

Outputs and gradients, fp32, dense and banded, plain and ragged (left-padded) positions, the
KV-cache decode shape; Pallas and splash run in interpret mode on CPU. The reference mask itself is
checked against jax.nn.dot_product_attention's own causal/local-window masking (written by the JAX
team, not here), which also pins the argument mapping used for cuDNN.
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax.config import ConfigError, GPTConfig
from gptjax.nn import attention as A
from gptjax.nn.kernels.flash_pallas import _block_ranges
from gptjax.nn.model import GPT, init_params


def _qkv(B, T, H, D, S=None, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    S = T if S is None else S
    q = jax.random.normal(ks[0], (B, T, H, D))
    k = jax.random.normal(ks[1], (B, S, H, D))
    v = jax.random.normal(ks[2], (B, S, H, D))
    # A fixed random cotangent, so gradients weight every output element differently.
    ct = jax.random.normal(ks[3], (B, T, H, D))
    return q, k, v, ct


def _ragged(B, T, pads):
    """Left-padded positions: row b has pads[b] padding tokens (position -1), then 0, 1, ..."""
    t = np.arange(T)
    return jnp.asarray(np.stack([np.where(t < p, -1, t - p) for p in pads]), jnp.int32)


def _reference(q, k, v, q_pos, k_pos, window):
    if q_pos is None:
        q_pos = k_pos = A.default_positions(q.shape[0], q.shape[1])
    return A.xla_attention(q, k, v, A.attention_mask(q_pos, k_pos, window))


def _assert_same(f, g, q, k, v, ct, valid=None, atol=2e-5):
    """f and g agree in outputs and in the gradients of <out, ct> wrt q, k, v (valid rows only)."""
    w = 1.0 if valid is None else valid[:, :, None, None].astype(jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * ct * w)

    np.testing.assert_allclose(f(q, k, v) * w, g(q, k, v) * w, atol=atol, rtol=0)
    for a, b in zip(jax.grad(loss(f), (0, 1, 2))(q, k, v), jax.grad(loss(g), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize("window", [None, 5])
def test_reference_mask_equals_jax_dot_product_attention(window):
    # jax.nn.dot_product_attention's XLA path with is_causal and local_window_size=(w - 1, 0) is
    # the call our cuDNN path makes; it must equal our position mask with band w.
    q, k, v, _ = _qkv(2, 17, 3, 8)
    ref = _reference(q, k, v, None, None, window)
    got = A.cudnn_attention(q, k, v, window=window, implementation="xla")
    np.testing.assert_allclose(got, ref, atol=2e-6, rtol=0)


def test_blocked_local_equals_masked_reference_outputs_and_grads():
    # T not a multiple of the window, and long enough (T > 2w) that attention() takes this path.
    q, k, v, ct = _qkv(2, 45, 2, 8)
    w = 7
    _assert_same(lambda q, k, v: _reference(q, k, v, None, None, w),
                 lambda q, k, v: A.attention(q, k, v, None, None, window=w, impl="xla"),
                 q, k, v, ct, atol=2e-6)


@pytest.mark.parametrize("T", [17, 128, 130])
def test_causal_fast_path_equals_reference_outputs_and_grads(T):
    # attention(impl='xla') without positions takes causal_attention: heads first, the softmax
    # normalized after the value product, and (T >= 128, even) two query halves.
    q, k, v, ct = _qkv(2, T, 3, 16, seed=T)
    _assert_same(lambda q, k, v: _reference(q, k, v, None, None, None),
                 lambda q, k, v: A.attention(q, k, v, None, None, window=None, impl="xla"),
                 q, k, v, ct, atol=2e-5)


def test_causal_fast_path_dropout_and_bf16_match_reference():
    q, k, v, _ = _qkv(2, 128, 2, 8, seed=3)
    rng = jax.random.key(7)
    mask = A.attention_mask(*(A.default_positions(2, 128),) * 2, None)
    # The same key draws the same keep-mask (one block of the reference's [B, H, T, S] shape).
    ref = A.xla_attention(q, k, v, mask, dropout_rate=0.3, dropout_rng=rng)
    got = A.causal_attention(q, k, v, dropout_rate=0.3, dropout_rng=rng)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=0)
    assert not np.allclose(got, A.causal_attention(q, k, v), atol=1e-3)  # dropout did act
    qb, kb, vb = (x.astype(jnp.bfloat16) for x in (q, k, v))
    got_bf16 = A.causal_attention(qb, kb, vb)
    assert got_bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got_bf16, np.float32),
                               np.asarray(A.xla_attention(qb, kb, vb, mask), np.float32),
                               atol=3e-2, rtol=0)


def test_blocked_local_needs_no_txt_buffer():
    # The banded path's largest intermediate is T x 2w per head, never T x T.
    T, w = 2048, 16
    q = jax.ShapeDtypeStruct((1, T, 1, 8), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda q: A.attention(q, q, q, None, None, window=w, impl="xla"))(q)
    biggest = max(np.prod(v.aval.shape) for eq in jaxpr.eqns for v in eq.outvars)
    assert biggest <= T * 2 * w, biggest
    dense = jax.make_jaxpr(lambda q: A.attention(q, q, q, None, None, window=None, impl="xla"))(q)
    # The dense causal path's biggest is its second query half's scores: T/2 x T.
    assert max(np.prod(v.aval.shape) for eq in dense.eqns for v in eq.outvars) >= T * T // 2


@pytest.mark.parametrize("window", [None, 9])
def test_pallas_equals_reference_ragged_positions(window):
    B, T = 2, 40
    q, k, v, ct = _qkv(B, T, 2, 24)  # head width 24: padded to 32 inside the kernel
    pos = _ragged(B, T, [0, 7])
    fl = lambda q, k, v: A.flash_attention(q, k, v, pos, pos, window=window, block_q=16,
                                           block_k=16, block_q_bwd=16, block_k_bwd=32)
    ref = lambda q, k, v: _reference(q, k, v, pos, pos, window)
    _assert_same(ref, fl, q, k, v, ct, valid=pos >= 0)


def test_pallas_decode_against_a_cache():
    # One new query per row against a 48-slot cache: row 0 has 20 filled slots, row 1 has 3
    # padding slots then 30; empty slots carry position -1. Banded (w=8) and dense.
    B, S = 2, 48
    q, k, v, _ = _qkv(B, 1, 2, 16, S=S, seed=1)
    s = np.arange(S)
    k_pos = jnp.asarray(np.stack([np.where(s < 20, s, -1),
                                  np.where((s >= 3) & (s < 33), s - 3, -1)]), jnp.int32)
    q_pos = jnp.asarray([[19], [29]], jnp.int32)
    for window in (None, 8):
        got = A.attention(q, k, v, q_pos, k_pos, window=window, impl="pallas")
        np.testing.assert_allclose(got, _reference(q, k, v, q_pos, k_pos, window), atol=2e-6)


def test_block_ranges_skip_only_invisible_blocks():
    # Plain positions, T = 64 in blocks of 16: causal visits the lower triangle of blocks, a band
    # of 16 visits each block and its predecessor.
    pos = A.default_positions(1, 64)
    lo, hi, klo, khi = _block_ranges(pos, pos, None, 16, 16)
    np.testing.assert_array_equal(lo[0], [0, 0, 0, 0])
    np.testing.assert_array_equal(hi[0], [1, 2, 3, 4])
    np.testing.assert_array_equal(klo[0], [0, 1, 2, 3])
    np.testing.assert_array_equal(khi[0], [4, 4, 4, 4])
    lo, hi, _, _ = _block_ranges(pos, pos, 16, 16, 16)
    np.testing.assert_array_equal(lo[0], [0, 0, 1, 2])
    np.testing.assert_array_equal(hi[0], [1, 2, 3, 4])


def test_splash_interpret_equals_reference():
    pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention")
    B, T, w = 1, 200, 33  # T padded to 256 inside; band not a multiple of the block
    q, k, v, ct = _qkv(B, T, 2, 16, seed=2)
    _assert_same(lambda q, k, v: _reference(q, k, v, None, None, w),
                 lambda q, k, v: A.splash_attention(q, k, v, window=w, block=128, interpret=True),
                 q, k, v, ct)


def _tiny(**kw):
    base = dict(vocab_size=64, n_ctx=48, n_layer=2, n_head=2, n_embd=32,
                attention_pattern=("dense", "local"), local_window=8, embd_pdrop=0.0,
                attn_pdrop=0.0, resid_pdrop=0.0)
    return GPTConfig(**{**base, **kw})


def test_model_pallas_equals_xla_logits_and_grads():
    cfg = _tiny()
    params = init_params(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, cfg.vocab_size)

    def loss(impl):
        model = GPT(cfg.replace(attention_impl=impl))
        return lambda p: jnp.mean(jax.nn.log_softmax(model.apply({"params": p}, tokens))[..., 3])

    l_x, g_x = jax.value_and_grad(loss("xla"))(params)
    l_p, g_p = jax.value_and_grad(loss("pallas"))(params)
    np.testing.assert_allclose(l_p, l_x, atol=1e-6, rtol=0)
    flat_x, flat_p = jax.tree_util.tree_leaves(g_x), jax.tree_util.tree_leaves(g_p)
    for a, b in zip(flat_x, flat_p):
        np.testing.assert_allclose(b, a, atol=2e-6, rtol=0)


def test_auto_is_xla_on_cpu_and_logs_why_once(caplog):
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU choice")
    q, k, v, _ = _qkv(1, 9, 2, 8)
    A._logged.clear()
    with caplog.at_level(logging.WARNING, logger="gptjax.nn.attention"):
        a = A.attention(q, k, v, None, None, window=None, impl="auto")
        A.attention(q, k, v, None, None, window=None, impl="auto")
    np.testing.assert_array_equal(a, A.attention(q, k, v, None, None, window=None, impl="xla"))
    msgs = [r.getMessage() for r in caplog.records if "auto" in r.getMessage()]
    assert len(msgs) == 1 and "xla" in msgs[0], msgs


def test_unavailable_impls_raise_one_line_config_errors():
    q, k, v, _ = _qkv(1, 8, 2, 8)
    if jax.default_backend() != "gpu":
        with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
            A.attention(q, k, v, None, None, window=None, impl="cudnn")
    if jax.default_backend() != "tpu":
        with pytest.raises(ConfigError, match="attention_impl='splash' needs a TPU"):
            A.attention(q, k, v, None, None, window=None, impl="splash")
    for impl in ("pallas", "cudnn", "splash"):
        with pytest.raises(ConfigError, match=f"attention_impl='{impl}' does not apply attention "
                                              "dropout"):
            A.attention(q, k, v, None, None, window=None, impl=impl, dropout_rate=0.1,
                        dropout_rng=jax.random.key(0))
    # Through the model: a training step with dropout under pallas names the impl and the rate.
    cfg = _tiny(attn_pdrop=0.1, attention_impl="pallas")
    params = init_params(cfg.replace(attention_impl="xla"), jax.random.key(0))
    with pytest.raises(ConfigError, match="attn_pdrop=0.1"):
        GPT(cfg).apply({"params": params}, jnp.zeros((1, 8), jnp.int32), deterministic=False,
                       rngs={"dropout": jax.random.key(1)})


def test_cudnn_rejects_fp32_on_gpu():
    if jax.default_backend() != "gpu":
        pytest.skip("needs a GPU")
    q, k, v, _ = _qkv(1, 8, 2, 8)
    with pytest.raises(ConfigError, match="bfloat16 or float16"):
        A.attention(q, k, v, None, None, window=None, impl="cudnn")
