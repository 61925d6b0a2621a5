"""Document-masked packing (issue 34 item 1): no attention across documents of a packed window.

A window holds document A (slots 0..a-1) then document B (from its end-of-text token on). B's
logits must be bitwise equal whatever A's tokens are, under every kernel that takes segment ids,
with positions restarting and without; B's loss has an exactly zero gradient at A's embeddings.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import EvalRecorder

from gptjax.config import ConfigError, GPTConfig
from gptjax.data import LMBatcher
from gptjax.data.documents import DocumentBatcher, DocumentMask, batch_keys, document_mask
from gptjax.defaults import base_config, complete, model_config
from gptjax.nn import attention as A
from gptjax.nn.kernels import splash_attention
from gptjax.nn.model import GPT, init_cache, init_params
from gptjax.train import topology as topo
from gptjax.train import run_data, step as step_mod
from gptjax.train.experiment import check_train_config, model_config_from
from gptjax.train.setup import Setup

EOS, V, T, SPLIT = 63, 64, 32, 11  # A = slots 0..10, B = the EOS at slot 11 and after


def _window(a_seed: int, restart: bool):
    """One packed window A + EOS + B, with A drawn from `a_seed`, and its document arrays."""
    a = np.random.default_rng(a_seed).integers(0, EOS, SPLIT)
    b = np.random.default_rng(99).integers(0, EOS, T - SPLIT - 1)
    inputs = np.concatenate([a, [EOS], b]).astype(np.int32)[None]
    return inputs, DocumentMask(EOS, restart).arrays(inputs)


def _cfg(impl: str, **kw) -> GPTConfig:
    return GPTConfig(vocab_size=V, n_ctx=T, n_embd=32, n_head=2, n_layer=2, embd_pdrop=0.0,
                     attn_pdrop=0.0, resid_pdrop=0.0, attention_impl=impl, **kw)


def test_segment_ids_and_positions_of_a_window():
    inputs = np.array([[5, 6, EOS, 7, 8, 9, EOS, 1], [EOS, 2, 3, 4, 5, 6, 7, 8]], np.int32)
    got = DocumentMask(EOS, True).arrays(inputs)
    np.testing.assert_array_equal(got["segment_ids"], [[0, 0, 1, 1, 1, 1, 2, 2],
                                                       [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(got["positions"], [[0, 1, 0, 1, 2, 3, 0, 1],
                                                     [0, 1, 2, 3, 4, 5, 6, 7]])
    assert got["segment_ids"].dtype == got["positions"].dtype == np.int32
    assert set(DocumentMask(EOS, False).arrays(inputs)) == {"segment_ids"}


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("restart", [True, False], ids=["restart", "no_restart"])
def test_b_logits_do_not_depend_on_a(impl, restart):
    cfg = _cfg(impl, attention_pattern=("dense", "local"), local_window=8)
    params = init_params(cfg, jax.random.key(0))
    model = GPT(cfg)

    @jax.jit
    def logits(inputs, seg, pos):
        return model.apply({"params": params}, inputs, pos, segment_ids_BxT=seg)

    outs = []
    for a_seed in (0, 1):
        inputs, docs = _window(a_seed, restart)
        assert not np.array_equal(inputs[0, :SPLIT], _window(1 - a_seed, restart)[0][0, :SPLIT])
        outs.append(np.asarray(logits(inputs, docs["segment_ids"], docs.get("positions"))))
    np.testing.assert_array_equal(outs[0][0, SPLIT:], outs[1][0, SPLIT:])  # bitwise, fp32
    assert not np.array_equal(outs[0][0, :SPLIT], outs[1][0, :SPLIT])
    # Without segment ids B does see A: the test can fail.
    plain = [np.asarray(model.apply({"params": params}, _window(s, restart)[0])) for s in (0, 1)]
    assert not np.array_equal(plain[0][0, SPLIT:], plain[1][0, SPLIT:])
    if restart:  # B in the window is B alone at positions 0..
        alone = model.apply({"params": params}, _window(0, True)[0][:, SPLIT:])
        np.testing.assert_allclose(outs[0][0, SPLIT:], np.asarray(alone)[0], atol=2e-5)

    # B's loss has an exactly zero gradient at A's (input) embeddings.
    inputs, docs = _window(0, restart)
    emb = params["wte"]["embedding"][inputs]

    def b_loss(emb):
        lg = model.apply({"params": params}, None, docs.get("positions"),
                         inputs_embeds_BxTxC=emb, segment_ids_BxT=docs["segment_ids"])
        return jnp.sum(jax.nn.log_softmax(lg[0, SPLIT:-1])[jnp.arange(T - SPLIT - 1),
                                                             inputs[0, SPLIT + 1:]])
    g = np.asarray(jax.grad(b_loss)(emb))
    assert np.all(g[0, :SPLIT] == 0.0) and np.abs(g[0, SPLIT:]).max() > 0


@pytest.mark.parametrize("window", [None, 24])
def test_pallas_multi_tile_segments_equal_xla(window):
    """T=128 in 16-wide tiles, many documents: the kernel's block skipping over packed segment
    ids and positions gives XLA's masked attention and gradients."""
    from gptjax.nn import attention as A  # heavy: (the test's reference path)
    from gptjax.nn.kernels.flash_pallas import flash_attention  # heavy: the Pallas kernel
    B, T_, H, D = 2, 128, 2, 16
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((B, T_, H, D)), jnp.float32) for _ in range(3))
    seg = jnp.asarray(np.cumsum(r.random((B, T_)) < 0.08, -1).astype(np.int32))
    tiles = dict(block_q=16, block_k=16, block_q_bwd=16, block_k_bwd=16, interpret=True)

    def pallas(q, k, v):
        return flash_attention(q, k, v, window=window, segment_ids_BxT=seg, **tiles)

    def xla(q, k, v):
        return A.attention(q, k, v, None, None, window=window, impl="xla", segment_ids_BxT=seg)
    np.testing.assert_allclose(pallas(q, k, v), xla(q, k, v), atol=2e-6)
    grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), (0, 1, 2))(q, k, v)
             for f in (pallas, xla)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=2e-5)


def test_splash_interpret_masks_documents():
    """Splash's SegmentIds in interpret mode: B's outputs bitwise equal over A, equal to the XLA
    masked reference, zero gradient at A's queries, keys and values."""
    B, H, D = 1, 2, 16
    seg = jnp.asarray(_window(0, False)[1]["segment_ids"])
    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.standard_normal((B, T, H, D)), jnp.float32) for _ in range(3))
    outs = []
    for s in (0, 1):
        a = np.random.default_rng(s + 1)
        q2, k2, v2 = (x.at[:, :SPLIT].set(a.standard_normal((B, SPLIT, H, D))) for x in (q, k, v))
        out = splash_attention(q2, k2, v2, interpret=True, segment_ids_BxT=seg)
        ref = A.attention(q2, k2, v2, None, None, window=None, impl="xla", segment_ids_BxT=seg)
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=2e-6)
        outs.append(np.asarray(out)[:, SPLIT:])
    np.testing.assert_array_equal(outs[0], outs[1])
    grads = jax.grad(lambda q, k, v: jnp.sum(splash_attention(
        q, k, v, interpret=True, segment_ids_BxT=seg)[:, SPLIT:]), argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.asarray(g)[:, :SPLIT] == 0.0) for g in grads)


def _run_config(document_mask: bool, impl: str = "xla", restart: bool = True, mesh=(1, 1, 1)):
    c = base_config()
    c.model = model_config("tiny", vocab_size=512 if impl == "splash" else V, n_layer=2,
                           n_head=2, n_embd=128 if impl == "splash" else 32,
                           n_ctx=128 if impl == "splash" else T, attention_impl=impl,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    c.train.batch_size = 4
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.data.document_mask, c.data.position_restart = document_mask, restart
    return complete(c, base_config())


@pytest.mark.skipif(not topo.libtpu_available(), reason='libtpu is not installed: pip install '
                    '-e ".[tpu]" (CI installs it)')
@pytest.mark.parametrize("restart", [True, False], ids=["restart", "no_restart"])
def test_splash_train_step_compiles_for_tpu_with_segment_ids(restart):
    """The document-masked train step, compiled ahead of time for v5e:2x2: splash runs (Mosaic
    custom calls) and takes the segment ids: its kernels (forward, dq, dkv) each gain the two
    segment-id operands next to the mask-off step's."""
    operands = {}
    for on in (False, True):
        config = _run_config(on, "splash", restart, mesh=(1, 2, 2))
        setup = Setup(config, model_config_from(config), 1000,
                      devices=topo.topology_devices("v5e:2x2", 1))
        with setup.mesh:
            lowered = setup.train_step.lower(*topo._abstract_args(setup, 4, 128))
        if on:
            res = topo.compile_lowered(lambda: lowered, setup.mesh)
            assert "error" not in res, res.get("error")
            assert "tpu_custom_call" in res["compiled"].as_text()
        calls = re.findall(r"@tpu_custom_call\(([^)]*)\)", lowered.as_text())
        assert calls, "splash did not run"
        operands[on] = sorted(c.count("%") for c in calls)
    assert len(operands[True]) == len(operands[False]) >= 3
    assert all(b == a + 2 for a, b in zip(operands[False], operands[True])), operands


def test_batcher_adds_documents_as_a_pure_function_of_the_step():
    tokens = np.random.default_rng(0).integers(0, EOS, 2000).astype(np.int32)
    tokens[np.random.default_rng(1).choice(2000, 120, replace=False)] = EOS
    mask = DocumentMask(EOS, True)
    for mode in ("packed", "random_offset"):
        one = DocumentBatcher(LMBatcher(tokens, 16, 8, 3, mode), mask)
        two = [DocumentBatcher(LMBatcher(tokens, 16, 8, 3, mode, p, 2), mask) for p in (0, 1)]
        for step in (0, 5, 130):
            b = one.batch(step)
            assert set(b) == {"inputs", "targets", "segment_ids", "positions"}
            for k, v in mask.arrays(b["inputs"]).items():
                np.testing.assert_array_equal(b[k], v)
            np.testing.assert_array_equal(b["segment_ids"], np.cumsum(b["inputs"] == EOS, 1))
            again = one.batch(step)
            halves = [t.batch(step) for t in two]
            for k in b:
                np.testing.assert_array_equal(b[k], again[k])
                np.testing.assert_array_equal(b[k], np.concatenate([h[k] for h in halves]))
    state = one.state()
    assert state["document_mask"] == {"eos_id": EOS, "position_restart": True}
    one.restore(state)
    other = DocumentBatcher(LMBatcher(tokens, 16, 8, 3, "random_offset"), DocumentMask(EOS, False))
    with pytest.raises(ValueError, match="document_mask") as e:
        other.restore(state)
    assert "\n" not in str(e.value)


def test_make_batcher_and_evaluate_follow_the_switch():
    class Tok:
        kind, eos_id = "gpt2_bpe", EOS
    tokens = np.random.default_rng(0).integers(0, V, 500).astype(np.int32)
    for on in (False, True):
        config = _run_config(on)
        config.data.prefetch = 0
        b = run_data.make_batcher(config, None, Tok(), tokens, T)
        assert set(b.batch(0)) == set(batch_keys(config.data)) == (
            {"inputs", "targets", "segment_ids", "positions"} if on else {"inputs", "targets"})
        setup = EvalRecorder((0.0, 1.0))
        run_data.evaluate(setup, None, tokens, T, 4, 1, document_mask(config.data, Tok()))
        assert setup.seen == [set(batch_keys(config.data)) | {"weights"}]


def test_mask_off_step_program_is_the_plain_one(monkeypatch):
    """Mask off, the batch carries no document arrays and the lowered train step is the one with
    the document plumbing cut out (and, checked by hand, the one before it existed)."""
    config = _run_config(False)
    setup = Setup(config, model_config_from(config), 1000)

    def hlo():
        with setup.mesh:
            return setup.train_step.lower(*topo._abstract_args(setup, 4, T)).as_text()
    before = hlo()
    monkeypatch.setattr(step_mod, "document_args", lambda batch: {})
    setup._build_steps()
    assert hlo() == before


def test_one_line_errors():
    q = jnp.zeros((1, 8, 2, 8), jnp.bfloat16)
    seg = jnp.zeros((1, 8), jnp.int32)
    with pytest.raises(ConfigError, match="'xla', 'pallas', 'splash'") as e:
        A.attention(q, q, q, None, None, window=None, impl="cudnn", segment_ids_BxT=seg)
    assert "cudnn" in str(e.value) and "\n" not in str(e.value)

    class NoEos:
        kind, eos_id = "char", None
    with pytest.raises(ValueError, match="document_mask=True needs an end-of-text") as e:
        document_mask(_run_config(True).data, NoEos())
    assert "'char'" in str(e.value) and "\n" not in str(e.value)
    config = _run_config(True, "cudnn")
    with pytest.raises(ConfigError, match="document_mask=True with model.attention_impl='cudnn'"):
        check_train_config(config, 1)
    config = _run_config(True)
    config.data.position_restart = 1
    with pytest.raises(ConfigError, match=r"data.position_restart=1; allowed: True or False"):
        check_train_config(config, 1)
    cfg = _cfg("xla")
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match="cache=None only"):
        GPT(cfg).apply({"params": params}, jnp.zeros((1, 4), jnp.int32),
                       cache=init_cache(cfg, 1), segment_ids_BxT=jnp.zeros((1, 4), jnp.int32))


def test_auto_picks_a_kernel_that_masks_documents():
    from jax._src.mesh import AbstractDevice  # no public constructor in jax 0.10
    q = jnp.zeros((2, 8, 2, 8), jnp.bfloat16)
    for platform, kind, want in (("gpu", "H100", "xla"), ("tpu", "TPU v5 lite", "splash")):
        dev = AbstractDevice(device_kind=kind, num_cores=None, platform=platform)
        mesh = jax.sharding.AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor"),
                                         abstract_device=dev)
        with jax.sharding.use_abstract_mesh(mesh):
            impl, why = A._choose_auto(q, None, False, True)
        assert impl == want and (why is None) == (want == "splash"), (impl, why)
        assert want == "splash" or "'xla', 'pallas', 'splash'" in why
