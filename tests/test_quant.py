"""Weight-only bf16 / int8 decoding: the model's own call on quantized parameters equals it on the
dequantized reference, a decode step reads the int8 bytes (XLA's count), every decoding method
works in every format, perplexity of a small trained model within 1% of fp32, bad input."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gptjax import GPTConfig, init_params, lm_loss
from gptjax.inference.decoding import decode_step, prefill, prepare_for_decoding, weights_format
from gptjax.inference.sampling import generate
from gptjax.nn import quant as nnquant
from gptjax.nn.model import GPT, init_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


def _cfg(preset="tiny", **kw):
    return dataclasses.replace(GPTConfig.preset(preset), **kw)


def _params(cfg, seed=0):
    # A larger init than the preset's so the quantization error shows in the logits.
    p = init_params(cfg, jax.random.key(seed))
    return jax.tree_util.tree_map(lambda x: x * 5.0 if x.ndim >= 2 else x, p)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("rows", [1, 3, nnquant.REDUCE_MAX_ROWS + 5])
@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_matmul_equals_the_dequantized_matrix(rows, weights):
    """Each row-count path (single-row reduce, few-row reduce, dequantized dot) computes
    x @ dequantize(w).T; int8 error per channel is at most half a step of its scale."""
    k = jax.random.normal(jax.random.key(0), (24, 2, 5))  # [in, out dims]
    w = nnquant.quantize(k, 1, weights)
    assert w.values.dtype == {"bf16": jnp.bfloat16, "int8": jnp.int8}[weights]
    kernel = nnquant.to_kernel(w)
    assert kernel.shape == k.shape
    if weights == "int8":
        step = np.asarray(w.scale).reshape(2, 5)
        assert np.all(np.abs(np.asarray(kernel - k)) <= step[None] / 2 + 1e-6)
    x = jax.random.normal(jax.random.key(1), (rows, 24))
    got = nnquant.linear("RC,CKO->RKO", x, w, None)
    np.testing.assert_allclose(got, jnp.einsum("RC,CKO->RKO", x, kernel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["bf16", "int8"])
@pytest.mark.parametrize("preset,scan,tied", [("tiny", False, True), ("tiny", True, True),
                                              ("tiny-gpt1", False, True), ("tiny-gpt3", True, True),
                                              ("tiny", False, False), ("tiny", True, False)])
def test_gpt_call_with_quantized_params_equals_the_dequantized(preset, scan, tied, weights):
    """GPT(config).apply on quantize_params' output (kernels, embedding lookup, tied or untied
    head all weight-only) computes what it computes on the dequantized parameters: with a cache
    (logits and the cache written) and without (every position's logits and hidden states)."""
    cfg = _cfg(preset, scan_layers=scan, tie_embeddings=tied)
    params = _params(cfg)
    qparams = nnquant.quantize_params(cfg, params, weights)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(qparams)[0]]
    left = [k for k in paths if "'kernel'" in k or "'embedding'" in k and "wte" in k
            or "'lm_head'" in k]
    assert not left, left  # every matrix a decode step streams is weight-only
    assert "embedding_q" in qparams["wte"] and ("lm_head_q" in qparams) == (not tied)
    ref_params = nnquant.dequantize_params(cfg, qparams)
    toks = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 7)), jnp.int32)
    pos = jnp.asarray([[-1, -1, 0, 1, 2, 3, 4], list(range(7))], jnp.int32)
    call = jax.jit(lambda p, c: GPT(cfg).apply({"params": p}, toks, pos, cache=c))
    got, cache = call(qparams, init_cache(cfg, 2, 16))
    ref, ref_cache = call(ref_params, init_cache(cfg, 2, 16))
    assert _rel(got, ref) < 1e-5
    for a, b in zip(jax.tree_util.tree_leaves(cache), jax.tree_util.tree_leaves(ref_cache)):
        if a.dtype == jnp.int32:  # positions and index
            np.testing.assert_array_equal(a, b)
        else:  # keys and values
            assert _rel(a, b) < 1e-5
    full = jax.jit(lambda p: GPT(cfg).apply({"params": p}, toks, return_hidden=True))
    (got, got_h), (ref, ref_h) = full(qparams), full(ref_params)
    assert _rel(got, ref) < 1e-5 and _rel(got_h, ref_h) < 1e-5
    # and the quantized numbers are not the fp32 ones (the test would be empty otherwise)
    assert _rel(GPT(cfg).apply({"params": params}, toks), ref) > 1e-6


def test_a_decode_step_streams_the_int8_weights():
    """XLA's count of the bytes one compiled int8 decode step accesses is about a quarter of
    fp32's on a model whose weights dominate (GPT-2 small: 164 MB against 534 MB): the int8 rows
    are read as int8 by the model's call, never through a dequantized fp32 copy."""
    cfg = _cfg(n_layer=2, n_embd=256, n_head=4, vocab_size=4096, n_ctx=64)
    params = init_params(cfg, jax.random.key(0))

    def step_bytes(weights):
        prepared = prepare_for_decoding(cfg, params, weights=weights)
        tok = jnp.zeros((1,), jnp.int32)
        step = jax.jit(lambda p, t, c: decode_step(cfg, p, t, t, c))
        cost = step.lower(prepared, tok, init_cache(cfg, 1, 64)).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        n_param = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(prepared))
        return float(cost["bytes accessed"]), n_param

    fp32, fp32_params = step_bytes("fp32")
    int8, int8_params = step_bytes("int8")
    assert fp32 >= fp32_params  # every fp32 weight byte is read once per step
    assert int8_params < 0.3 * fp32_params
    assert int8 < 0.35 * fp32, (int8, fp32)


@pytest.mark.parametrize("scan", [False, True])
@pytest.mark.parametrize("weights", ["bf16", "int8"])
def test_quantized_decoding_equals_the_dequantized_reference(weights, scan):
    """Prefill and decode steps with bf16/int8 params equal GPT on the dequantized params."""
    cfg = _cfg(scan_layers=scan)
    params = _params(cfg)
    prepared = prepare_for_decoding(cfg, params, weights=weights)
    assert weights_format(prepared) == weights
    ref_params = nnquant.dequantize_params(cfg, prepared.params)
    ref = prepare_for_decoding(cfg, ref_params, out_in=False)
    toks = jnp.asarray([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], jnp.int32)
    lengths = jnp.asarray([3, 5], jnp.int32)
    a, ca = prefill(cfg, prepared, toks, lengths, 12, last_only=True)
    b, cb = prefill(cfg, ref, toks, lengths, 12, last_only=True)
    assert _rel(a, b) < 1e-5
    pos = lengths
    for _ in range(4):
        nxt = jnp.argmax(b, axis=-1).astype(jnp.int32)
        a, ca = decode_step(cfg, prepared, nxt, pos, ca)
        b, cb = decode_step(cfg, ref, nxt, pos, cb)
        assert _rel(a, b) < 1e-5
        pos = pos + 1
    # and the quantized weights are not the fp32 ones (the test would be empty otherwise)
    c, _ = prefill(cfg, params, toks, lengths, 12, last_only=True)
    assert _rel(c, b) > 1e-6


@pytest.mark.parametrize("weights", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("method", ["greedy", "sampling", "beam"])
def test_every_decoding_method_works_with_every_format(method, weights):
    """generate with prepared params equals generate with the dequantized reference params."""
    cfg = _cfg()
    params = _params(cfg, seed=1)
    prepared = prepare_for_decoding(cfg, params, weights=weights)
    ref = (params if weights == "fp32"
           else nnquant.dequantize_params(cfg, prepared.params))
    opts = {"greedy": dict(temperature=0.0),
            "sampling": dict(temperature=0.8, top_k=20, top_p=0.9, rng=3),
            "beam": dict(num_beams=3, temperature=1.0, num_return_sequences=2)}[method]
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    got = generate(cfg, prepared, prompts, max_new_tokens=8, return_scores=True, **opts)
    want = generate(cfg, ref, prompts, max_new_tokens=8, return_scores=True, **opts)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-4)


def test_bad_weights_is_one_line():
    cfg = _cfg()
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError) as e:
        prepare_for_decoding(cfg, params, weights="int4")
    assert str(e.value) == "weights='int4': must be one of fp32, bf16, int8"
    prepared = prepare_for_decoding(cfg, params, weights="int8")
    assert prepare_for_decoding(cfg, prepared) is prepared
    with pytest.raises(ValueError, match="already prepared with weights='int8'") as e:
        prepare_for_decoding(cfg, prepared, weights="bf16")
    assert "\n" not in str(e.value)


def _byte_batches(text: bytes, T: int, n: int, seed: int):
    data = np.frombuffer(text, np.uint8).astype(np.int32)
    starts = np.random.RandomState(seed).randint(0, len(data) - T - 1, n)
    return jnp.asarray(np.stack([data[s:s + T + 1] for s in starts]))


@pytest.mark.slow
def test_perplexity_of_a_trained_model_within_one_percent():
    """A small byte-level model trained on this repository's source: validation perplexity with
    bf16 and int8 weights, through the quantized model call, within 1% of fp32's."""
    cfg = _cfg(n_layer=2, n_embd=64, n_head=4, n_ctx=64)
    files = sorted((REPO / "gptjax").rglob("*.py"))
    train = b"".join(p.read_bytes() for p in files[1::2])
    val = b"".join(p.read_bytes() for p in files[::2])[:200_000]
    params = init_params(cfg, jax.random.key(0))
    opt = optax.adam(3e-3)

    @jax.jit
    def step(params, state, batch):
        def loss(p):
            logits = GPT(cfg).apply({"params": p}, batch[:, :-1])
            return lm_loss(logits, batch[:, 1:])
        l, g = jax.value_and_grad(loss)(params)
        upd, state = opt.update(g, state, params)
        return optax.apply_updates(params, upd), state, l

    state = opt.init(params)
    for i in range(300):
        params, state, _ = step(params, state, _byte_batches(train, 64, 16, i))
    val_batch = _byte_batches(val, 63, 64, 12345)

    def val_ppl(p, weights):
        prepared = prepare_for_decoding(cfg, p, weights=weights, out_in=False)
        lengths = jnp.full((val_batch.shape[0],), 63, jnp.int32)
        logits, _ = prefill(cfg, prepared, val_batch[:, :-1], lengths, 63)
        return float(jnp.exp(lm_loss(logits, val_batch[:, 1:])))

    ppl = {w: val_ppl(params, w) for w in ("fp32", "bf16", "int8")}
    assert ppl["fp32"] < 20, ppl  # trained (13.3 here): bytes of Python source, far below 256
    for w in ("bf16", "int8"):
        assert abs(ppl[w] / ppl["fp32"] - 1) < 0.01, ppl
