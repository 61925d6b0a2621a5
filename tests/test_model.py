"""The decoder: presets and parameter counts, causality, banded attention, scan/remat switches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptjax import GPT, GPTConfig, PRESETS, init_params
from gptjax.config import PUBLISHED_PARAMS, ConfigError
from gptjax.nn.losses import lm_loss
from gptjax.nn.layers import _flat_dot
from gptjax.nn.kv_cache import PagedCache, PagedView, init_pages
from gptjax.nn.model import init_cache, logical_axes
from gptjax.nn.param_layout import stack_layers, unstack_layers
from gptjax.nn.quant import quantize_params


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_abstractly(name):
    cfg = GPTConfig.preset(name)
    n = cfg.num_params()  # jax.eval_shape: a 175B model costs nothing
    assert n > 0
    if name in PUBLISHED_PARAMS:
        assert abs(n / PUBLISHED_PARAMS[name] - 1) < 0.02, (name, n, PUBLISHED_PARAMS[name])


def _counted(cfg, non_embedding=False):
    """The parameter count of the initialised model, read from its abstract shapes."""
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    return n - (cfg.vocab_size + cfg.n_ctx) * cfg.n_embd if non_embedding else n


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_analytic_num_params_equals_initialised_model(name):
    cfg = GPTConfig.preset(name)
    assert cfg.num_params() == _counted(cfg)
    assert cfg.num_params(non_embedding=True) == _counted(cfg, non_embedding=True)


@pytest.mark.parametrize("overrides", [
    dict(scan_layers=True),
    dict(tie_embeddings=False),
    dict(use_bias=False),
    dict(final_norm=False, n_inner=100, head_dim=8),
])
def test_analytic_num_params_equals_initialised_model_for_variants(overrides):
    cfg = GPTConfig.preset("tiny-gpt3", **overrides)
    assert cfg.num_params() == _counted(cfg)
    assert cfg.num_params(non_embedding=True) == _counted(cfg, non_embedding=True)


@pytest.mark.parametrize("scale_resid_init", [True, False])
@pytest.mark.parametrize("scan", [False, True])
def test_init_gpt2_residual_projections_scaled(scale_resid_init, scan):
    # GPT-2 section 2.3: the residual projections (attn.c_proj, mlp.c_proj) start at
    # std 0.02 / sqrt(2 n_layer); every other kernel and embedding at 0.02; biases 0; LN scales 1.
    # 8 x 128 gives 16k+ draws per kernel: empirical stds within 0.6%, checked to 3%.
    cfg = GPTConfig.preset("tiny", n_layer=8, n_head=4, n_embd=128, n_ctx=128,
                           scale_resid_init=scale_resid_init, scan_layers=scan)
    params = init_params(cfg, jax.random.key(0))
    resid = 0.02 / np.sqrt(2 * 8) if scale_resid_init else 0.02
    seen = {"resid": 0, "other": 0, "bias": 0, "scale": 0}
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        names = tuple(getattr(k, "key", None) for k in path)
        x = np.asarray(x)
        if names[-1] == "bias":
            assert np.all(x == 0), names
            seen["bias"] += 1
        elif names[-1] == "scale":
            assert np.all(x == 1), names
            seen["scale"] += 1
        elif names[-2:] == ("c_proj", "kernel"):
            for layer in (x if scan else [x]):  # one std per layer
                assert abs(layer.std() / resid - 1) < 0.03, (names, layer.std(), resid)
            seen["resid"] += 1
        else:
            assert abs(x.std() / 0.02 - 1) < 0.03, (names, x.std())
            seen["other"] += 1
    per_layer = 1 if scan else 8
    assert seen == {"resid": 2 * per_layer, "other": 2 + 2 * per_layer,
                    "bias": 6 * per_layer + 1, "scale": 2 * per_layer + 1}, seen


def test_gpt2_small_exact_count():
    # 124,439,808: the released GPT-2 small checkpoint with tied embeddings.
    assert GPTConfig.preset("gpt2").num_params() == 124_439_808
    # HF openai-gpt has 116,534,784 parameters with its 40,478-row table; ours adds 3 special rows.
    assert GPTConfig.preset("gpt1").num_params() == 116_534_784 + 3 * 768


def test_gpt3_alternates_dense_and_banded():
    cfg = GPTConfig.preset("gpt3-175b")
    kinds = cfg.layer_kinds()
    assert kinds[:4] == ("dense", "local", "dense", "local") and len(kinds) == 96
    assert cfg.n_ctx == 2048 and cfg.local_window == 256


def test_flops_per_token_formula():
    cfg = GPTConfig.preset("gpt2")
    n = cfg.num_params(non_embedding=True)
    expected = 6 * (n + 768 * 50257) + 12 * 12 * 768 * 1024
    assert cfg.flops_per_token(1024) == expected
    # A banded layer attends to at most `window` keys, so GPT-3's count is below the dense one.
    g3 = GPTConfig.preset("gpt3-small")
    assert g3.flops_per_token(2048) < g3.replace(attention_pattern=("dense",)).flops_per_token(2048)


@pytest.mark.parametrize("bad, msg", [
    (dict(n_embd=30, n_head=4), "n_embd=30 is not divisible by n_head=4"),
    (dict(norm_position="middle"), "norm_position='middle'"),
    (dict(activation="swish"), "activation='swish'"),
    (dict(attention_pattern=("dense", "sparse")), "'sparse'"),
    (dict(embd_pdrop=1.5), "embd_pdrop=1.5"),
    (dict(n_layer=0), "n_layer=0"),
])
def test_invalid_configs_raise_one_line(bad, msg):
    with pytest.raises(ConfigError) as e:
        GPTConfig.preset("tiny", **bad)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'"):
        GPTConfig.preset("gpt5")


def _tokens(cfg, B=2, T=None, seed=0):
    T = cfg.n_ctx if T is None else T
    return jax.random.randint(jax.random.key(seed), (B, T), 0, cfg.vocab_size)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt1", "tiny-gpt3"])
def test_forward_shapes_and_dtype_under_jit(name):
    cfg = GPTConfig.preset(name)
    params = init_params(cfg, jax.random.key(0))
    logits = jax.jit(lambda p, x: GPT(cfg).apply({"params": p}, x))(params, _tokens(cfg))
    assert logits.shape == (2, cfg.n_ctx, cfg.vocab_size) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_bf16_compute_gives_fp32_logits_close_to_fp32():
    cfg = GPTConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    x = _tokens(cfg)
    ref = GPT(cfg).apply({"params": params}, x)
    out = GPT(cfg.replace(dtype="bfloat16")).apply({"params": params}, x)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, ref, atol=0.05)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt1", "tiny-gpt3"])
def test_causality_gradient_is_exactly_zero(name):
    cfg = GPTConfig.preset(name)
    params = init_params(cfg, jax.random.key(1))
    T = 16
    emb = jax.random.normal(jax.random.key(2), (1, T, cfg.n_embd))

    def logits_at(e, t):
        return GPT(cfg).apply({"params": params}, None, inputs_embeds_BxTxC=e)[0, t].sum()

    for t in (0, 5, T - 2):
        g = jax.grad(logits_at)(emb, t)
        g = np.asarray(g)
        assert np.all(g[0, t + 1:] == 0.0), f"position {t} sees the future"
        assert np.any(g[0, : t + 1] != 0.0)


def test_banded_equals_dense_when_window_covers_context_and_differs_otherwise():
    dense = GPTConfig.preset("tiny", attention_pattern=("dense",))
    params = init_params(dense, jax.random.key(0))
    x = _tokens(dense)
    ref = GPT(dense).apply({"params": params}, x)
    wide = dense.replace(attention_pattern=("dense", "local"), local_window=dense.n_ctx)
    # Equal up to rounding: dense layers take attention.causal_attention, banded the mask.
    np.testing.assert_allclose(GPT(wide).apply({"params": params}, x), ref, atol=1e-6, rtol=0)
    narrow = wide.replace(local_window=4)
    out = GPT(narrow).apply({"params": params}, x)
    # The first `window` positions see the same keys either way; later ones do not.
    np.testing.assert_allclose(out[:, :4], ref[:, :4], atol=1e-6)
    assert np.abs(np.asarray(out[:, 8:] - ref[:, 8:])).max() > 1e-3


def test_banded_layer_ignores_keys_outside_window():
    cfg = GPTConfig.preset("tiny", n_layer=1, attention_pattern=("local",), local_window=3)
    params = init_params(cfg, jax.random.key(0))
    T = 12
    emb = jax.random.normal(jax.random.key(3), (1, T, cfg.n_embd))
    g = jax.grad(lambda e: GPT(cfg).apply({"params": params}, None, inputs_embeds_BxTxC=e)
                 [0, 10].sum())(emb)
    g = np.abs(np.asarray(g[0])).sum(-1)
    assert np.all(g[:8] == 0) and np.all(g[8:11] > 0) and np.all(g[11:] == 0)


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt1", "tiny-gpt3"])
@pytest.mark.parametrize("remat", ["none", "full", "dots"])
def test_scan_and_remat_leave_outputs_and_grads_unchanged(name, remat):
    cfg = GPTConfig.preset(name)
    params = init_params(cfg, jax.random.key(0))
    x = _tokens(cfg, T=32)

    def loss(p, c):
        logits = GPT(c).apply({"params": p}, x[:, :-1])
        return lm_loss(logits, x[:, 1:])

    ref_l, ref_g = jax.value_and_grad(loss)(params, cfg)
    scan_cfg = cfg.replace(scan_layers=True, remat=remat)
    stacked = stack_layers(cfg, params)
    l, g = jax.jit(jax.value_and_grad(loss), static_argnums=1)(stacked, scan_cfg)
    np.testing.assert_allclose(l, ref_l, rtol=1e-6)
    g = unstack_layers(cfg, g)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(ref_g)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    loop_remat = cfg.replace(remat=remat)
    np.testing.assert_allclose(jax.jit(loss, static_argnums=1)(params, loop_remat), ref_l,
                               rtol=1e-6)


def test_scan_init_matches_layout_and_axes():
    cfg = GPTConfig.preset("tiny-gpt3", scan_layers=True)
    params = init_params(cfg, jax.random.key(0))
    k = params["h"]["block_1"]["attn"]["c_attn"]["kernel"]
    assert k.shape == (2, 32, 3, 2, 16)  # 4 layers = 2 periods of (dense, local)
    axes = logical_axes(cfg)
    assert tuple(axes["h"]["block_1"]["attn"]["c_attn"]["kernel"]) == (
        "layers", "embed", None, "heads", "head_dim")


def test_every_parameter_has_logical_axes():
    cfg = GPTConfig.preset("tiny", tie_embeddings=False)
    axes = logical_axes(cfg)
    shapes = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    flat_a = jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(
        x, jax.sharding.PartitionSpec))
    flat_s = jax.tree_util.tree_leaves_with_path(shapes)
    assert len(flat_a) == len(flat_s)
    for (path, spec), (_, shape) in zip(flat_a, flat_s):
        assert len(spec) == len(shape.shape), path
        assert any(a is not None for a in spec), f"{path} has no logical axis name"


@pytest.mark.parametrize("name", ["tiny", "tiny-gpt1", "tiny-gpt3"])
@pytest.mark.parametrize("scan", [False, True])
def test_cached_decoding_equals_full_forward(name, scan):
    cfg = GPTConfig.preset(name, scan_layers=scan)
    params = init_params(cfg, jax.random.key(0))
    x = _tokens(cfg, T=24)
    full = GPT(cfg).apply({"params": params}, x)
    cache = init_cache(cfg, 2, max_len=32)
    # Prefill 10 tokens, then decode one at a time.
    logits, cache = GPT(cfg).apply({"params": params}, x[:, :10], cache=cache)
    steps = [logits]
    step_fn = jax.jit(lambda p, t, c: GPT(cfg).apply({"params": p}, t, cache=c))
    for t in range(10, 24):
        logits, cache = step_fn(params, x[:, t:t + 1], cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("preset, scan, weights", [("tiny", False, "fp32"), ("tiny", True, "fp32"),
                                                    ("tiny-gpt3", False, "fp32"),
                                                    ("tiny", False, "int8")])
def test_paged_cache_steps_equal_dense_cache_steps(preset, scan, weights):
    """Rows of different lengths whose keys/values live in scattered pages of one pool (the
    serving engine's paged cache) decode exactly as each row alone over a dense cache: logits of
    every step, and the keys/values the pool then holds; dense and local (GPT-3) layers; fp32 and
    weight-only int8 parameters."""
    cfg = GPTConfig.preset(preset, scan_layers=scan)
    params = init_params(cfg, jax.random.key(0))
    if weights == "int8":
        params = quantize_params(cfg, params, "int8")
    G, N = 4, 16
    lens = [5, 11, 2]
    tables = [[3, 7], [1, 9, 4, 12], [15, 6]]  # each row's pages, out of order, never page 0
    x = _tokens(cfg, B=3, T=16)
    apply = lambda c, t, pos: GPT(cfg).apply({"params": params}, t, pos, cache=c)  # noqa: E731
    pool = init_pages(cfg, N, G)
    want = []
    for b, L in enumerate(lens):  # the reference: each row alone, prompt then 3 steps, dense
        logits, c = apply(init_cache(cfg, 1, 16), x[b:b + 1, :L], jnp.arange(L)[None])
        steps = []
        for t in range(3):
            lg, c = apply(c, x[b:b + 1, L + t:L + t + 1], jnp.array([[L + t]]))
            steps.append(lg[0, 0])
        want.append((steps, c))
        # The prompt's keys/values written into the row's pages (what the engine's insert does).
        slots = jnp.array([tables[b][p // G] * G + p % G for p in range(L)])
        pool = jax.tree_util.tree_map(
            lambda P, d: _pages_put(P, d, slots, L), pool, c["layers"])
    step = jax.jit(apply)
    for t in range(3):
        pos = [L + t for L in lens]
        ids, rows, starts = [], [], []
        for b, p in enumerate(pos):
            for j in range(p // G + 1):
                ids.append(tables[b][j])
                rows.append(b)
                starts.append(j * G)
        pad = 16 - len(ids)  # padded to a bucket: rows == B (3) are padding
        view = PagedView(jnp.array([[tables[b][p // G] * G + p % G] for b, p in enumerate(pos)]),
                         jnp.array(ids + [0] * pad), jnp.array(rows + [3] * pad),
                         jnp.array(starts + [0] * pad))
        tok = jnp.stack([x[b, pos[b]] for b in range(3)])[:, None]
        lg, out = step(PagedCache(pool, view), tok, jnp.array(pos)[:, None])
        pool = out.layers
        for b in range(3):
            np.testing.assert_allclose(lg[b, 0], want[b][0][t], rtol=1e-5, atol=1e-5)
    for b, L in enumerate(lens):  # every position of every row, in its page of the pool
        slots = jnp.array([tables[b][p // G] * G + p % G for p in range(L + 3)])
        for P, d in zip(jax.tree_util.tree_leaves(pool),
                        jax.tree_util.tree_leaves(want[b][1]["layers"])):
            got = P.reshape(P.shape[:-4] + (-1,) + P.shape[-2:])[..., slots, :, :]
            ref = jnp.moveaxis(d[..., :L + 3], -1, -3)  # [.., H, D, S] -> [.., S, H, D]
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="paged cache .* needs positions_BxT"):
        GPT(cfg).apply({"params": params}, tok, cache=PagedCache(pool, view))


def _pages_put(pool, dense, slots, L):
    """A one-row dense cache's first L slots ([.., H, D, S]) into pool slots ([.., N, G, H, D])."""
    flat = pool.reshape(pool.shape[:-4] + (-1,) + pool.shape[-2:])
    kv = jnp.moveaxis(dense[..., :L], -1, -3)
    return flat.at[..., slots, :, :].set(kv).reshape(pool.shape)


def test_left_padding_with_positions_matches_unpadded():
    cfg = GPTConfig.preset("tiny-gpt3")
    params = init_params(cfg, jax.random.key(0))
    x = _tokens(cfg, B=1, T=12)
    ref = GPT(cfg).apply({"params": params}, x)
    pad = 5
    xp = jnp.concatenate([jnp.zeros((1, pad), x.dtype), x], 1)
    pos = jnp.concatenate([-jnp.ones((1, pad), jnp.int32), jnp.arange(12)[None]], 1)
    out = GPT(cfg).apply({"params": params}, xp, pos)
    np.testing.assert_allclose(out[:, pad:], ref, atol=1e-5)


def test_dropout_is_active_only_when_not_deterministic():
    cfg = GPTConfig.preset("tiny")
    params = init_params(cfg, jax.random.key(0))
    x = _tokens(cfg)
    a = GPT(cfg).apply({"params": params}, x, deterministic=False,
                       rngs={"dropout": jax.random.key(1)})
    b = GPT(cfg).apply({"params": params}, x, deterministic=False,
                       rngs={"dropout": jax.random.key(2)})
    c = GPT(cfg).apply({"params": params}, x)
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    np.testing.assert_array_equal(c, GPT(cfg).apply({"params": params}, x))


def test_lm_loss_matches_manual_and_weights():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    t = jax.random.randint(jax.random.key(1), (2, 5), 0, 7)
    lp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(lp, t[..., None], -1)[..., 0]
    np.testing.assert_allclose(lm_loss(logits, t), nll.mean(), rtol=1e-6)
    w = jnp.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 1]])
    np.testing.assert_allclose(lm_loss(logits, t, w), (nll * w).sum() / 4, rtol=1e-6)
    assert lm_loss(logits.astype(jnp.bfloat16), t).dtype == jnp.float32


@pytest.mark.parametrize("eq,x_shape,k_shape,b_shape", [
    ("BTC,CKHD->BTKHD", (2, 5, 8), (8, 3, 2, 4), (3, 2, 4)),  # c_attn
    ("BTHD,HDC->BTC", (2, 5, 2, 4), (2, 4, 8), (8,)),         # c_proj: two input axes
    ("BTC,CF->BTF", (3, 1, 8), (8, 16), (16,)),               # one decode position
    ("BTC,VC->BTV", (2, 5, 8), (11, 8), (11,)),               # einsum fallback
])
def test_flat_dot_equals_einsum_and_its_gradients(eq, x_shape, k_shape, b_shape):
    kx, kk, kb = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    k = jax.random.normal(kk, k_shape)
    b = jax.random.normal(kb, b_shape)

    def ref(x, k, b):
        return jnp.sum(jnp.sin(jnp.einsum(eq, x, k) + b))

    def got(x, k, b):
        return jnp.sum(jnp.sin(_flat_dot(eq, x, k, b)))

    np.testing.assert_allclose(_flat_dot(eq, x, k, b), jnp.einsum(eq, x, k) + b, rtol=1e-6,
                               atol=1e-5)
    for g, r in zip(jax.grad(got, (0, 1, 2))(x, k, b), jax.grad(ref, (0, 1, 2))(x, k, b)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)
