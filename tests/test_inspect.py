"""Activation capture and interventions (gptjax.nn.inspect): the plain program untouched when off,
exact patching and identity, head/neuron ablation equal to editing the weights, gradients through
interventions, vmap over a sweep's models, cached decoding, one-line errors, the README examples.
(8 fake devices: tests/multidevice_sharding.py.)"""

import functools
import importlib.util
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO
from gptjax import GPT, GPTConfig, init_params, sweep
from gptjax.defaults import base_config, model_config
from gptjax.config import ConfigError
from gptjax.nn import inspect, taps
from gptjax.nn.kv_cache import PagedCache, PagedView, init_pages
from gptjax.nn.model import init_cache
from gptjax.train.experiment import model_config_from
from gptjax.train.step import TrainState, make_train_step

CONFIGS = {
    "gpt2": dict(),
    "gpt3_scan_remat": dict(preset="tiny-gpt3", scan_layers=True, remat="full", local_window=4),
    "gpt1": dict(preset="tiny-gpt1"),
}


def _cfg(name="gpt2", **over):
    fields = dict(CONFIGS[name])
    preset = fields.pop("preset", "tiny")
    fields.update(over)
    return GPTConfig.preset(preset, vocab_size=64, n_ctx=16, **fields)


TOKENS = (jnp.arange(24).reshape(2, 12) * 7) % 64
CORRUPT = TOKENS.at[:, 3].set(5)


def _params(cfg, seed=0):
    return init_params(cfg, jax.random.key(seed))


@functools.lru_cache(maxsize=None)
def _plain_fn(cfg):
    return jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))


def _plain(cfg, params, tokens=TOKENS):
    return _plain_fn(cfg)(params, tokens)


@functools.lru_cache(maxsize=None)
def _capture_fn(cfg, patterns):
    return jax.jit(lambda p, t: inspect.forward_with_capture(cfg, p, t, list(patterns)))


def _capture(cfg, params, tokens, patterns=(), interventions=None):
    """forward_with_capture jitted (compiled once per config and patterns without
    interventions)."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if interventions is None:
        return _capture_fn(cfg, patterns)(params, tokens)

    def fn(p, t):
        return inspect.forward_with_capture(cfg, p, t, list(patterns), interventions)
    return jax.jit(fn)(params, tokens)


def _cut_out(monkeypatch):
    """The taps removed: the model as it was before capture existed."""
    monkeypatch.setattr(taps, "tap", lambda module, point, x: x)
    monkeypatch.setattr(taps, "wants", lambda module, point: False)
    monkeypatch.setattr(taps, "active", lambda: None)


@pytest.mark.parametrize("name", ["gpt2", "gpt3_scan_remat"])
def test_off_program_is_the_plain_one(name, monkeypatch):
    cfg = _cfg(name)
    params = _params(cfg)
    opt = optax.adamw(1e-3)
    step = make_train_step(cfg, opt, lambda s: 1e-3)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt.init(params))
    batch = {"inputs": TOKENS, "targets": jnp.roll(TOKENS, -1, 1)}

    def texts():  # new lambdas: jit's trace cache is keyed on the function
        fwd = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t)).lower(params, TOKENS)
        train = jax.jit(lambda *a: step(*a)).lower(state, batch, jax.random.key(0))
        return fwd.as_text(), train.as_text()

    def lowered(*args, logits_only=True):
        fn = jax.jit(lambda p, t: inspect.forward_with_capture(cfg, p, t, *args)[
            0 if logits_only else slice(None)])  # (a lambda: the module's name is the plain one's)
        return fn.lower(params, TOKENS).as_text()
    fwd, train = texts()
    # The capture API with nothing requested traces the taps with a request active: same program.
    assert lowered() == fwd
    # (The comparison sees a capture or an intervention.)
    assert lowered("h_1.mlp.act", logits_only=False) != fwd
    assert lowered((), {"wte": lambda x: x * 2}) != fwd
    _cut_out(monkeypatch)  # the model as it was before the taps: the same programs
    assert texts() == (fwd, train)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patching_every_point_and_identity_are_exact(name):
    cfg = _cfg(name)
    params = _params(cfg)
    plain = _plain(cfg, params)
    clean_logits, clean = _capture(cfg, params, TOKENS, "*")
    np.testing.assert_array_equal(clean_logits, plain)  # capture changes nothing
    names = inspect.point_names(cfg)
    assert sorted(clean) == sorted(names)  # (jit returns dicts with sorted keys)
    assert clean["h_1.attn.probs"].shape == (2, cfg.n_head, 12, 12)
    np.testing.assert_allclose(jnp.sum(clean["h_1.attn.probs"], -1), 1.0, rtol=1e-6)
    patched, got = _capture(cfg, params, CORRUPT, "*",
                            {n: inspect.patch(clean[n]) for n in names})
    np.testing.assert_array_equal(patched, clean_logits)
    for n in names:
        np.testing.assert_array_equal(got[n], clean[n], err_msg=n)
    corrupt = _plain(cfg, params, CORRUPT)
    assert float(jnp.max(jnp.abs(corrupt - clean_logits))) > 1e-3  # the corruption matters
    identity, _ = _capture(cfg, params, TOKENS, (), {"*": lambda x: x})
    np.testing.assert_array_equal(identity, plain)
    # Patching the last block's input at the corrupted position restores that position's logits
    # (earlier positions never saw the corruption; later ones still see it in their keys).
    last = f"h_{cfg.n_layer - 1}.resid_pre"
    one, _ = _capture(cfg, params, CORRUPT, (), {last: inspect.patch(clean[last], [3])})
    np.testing.assert_allclose(one[:, :4], clean_logits[:, :4], rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(corrupt[:, 3] - clean_logits[:, 3]))) > 1e-3
    assert float(jnp.max(jnp.abs(one[:, 4:] - clean_logits[:, 4:]))) > 1e-4


def _zero_head_by_hand(cfg, params, layer, head):
    params = jax.tree.map(lambda x: x, params)
    if cfg.scan_layers:
        P = len(cfg.attention_pattern)
        proj = params["h"][f"block_{layer % P}"]["attn"]["c_proj"]
        proj["kernel"] = proj["kernel"].at[layer // P, head].set(0)
    else:
        proj = params[f"h_{layer}"]["attn"]["c_proj"]
        proj["kernel"] = proj["kernel"].at[head].set(0)
    return params


def _zero_neuron_by_hand(cfg, params, layer, neuron):
    params = jax.tree.map(lambda x: x, params)
    if cfg.scan_layers:
        P = len(cfg.attention_pattern)
        proj = params["h"][f"block_{layer % P}"]["mlp"]["c_proj"]
        proj["kernel"] = proj["kernel"].at[layer // P, neuron].set(0)
    else:
        proj = params[f"h_{layer}"]["mlp"]["c_proj"]
        proj["kernel"] = proj["kernel"].at[neuron].set(0)
    return params


# Layer 2 of the scanned GPT-3 is a dense block; layer 3 a local one (window 4 of 12 tokens:
# the banded path), so the probabilities of both masks are the ones the attention used.
@pytest.mark.parametrize("name, layer", [("gpt2", 1), ("gpt3_scan_remat", 2),
                                         ("gpt3_scan_remat", 3)])
def test_ablations_equal_editing_the_weights(name, layer):
    cfg = _cfg(name)
    params = _params(cfg)
    head, neuron = 1, 5
    want = _plain(cfg, _zero_head_by_hand(cfg, params, layer, head))
    assert float(jnp.max(jnp.abs(want - _plain(cfg, params)))) > 1e-4
    got, _ = _capture(cfg, params, TOKENS, (), {f"h_{layer}.attn.z": inspect.ablate_heads(head)})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # Zero probabilities of that head remove its output too.
    got, _ = _capture(cfg, params, TOKENS, (),
                      {f"h_{layer}.attn.probs": lambda p: p.at[:, head].set(0)})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    want = _plain(cfg, _zero_neuron_by_hand(cfg, params, layer, neuron))
    got, _ = _capture(cfg, params, TOKENS, (),
                      {f"h_{layer}.mlp.act": inspect.ablate_neurons(neuron)})
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_gradients_flow_through_interventions():
    cfg = _cfg("gpt2")
    params = _params(cfg)
    emb = params["wte"]["embedding"][TOKENS]

    def through_tap(delta):
        logits, _ = inspect.forward_with_capture(cfg, params, TOKENS, (),
                                                 {"wte": lambda x: x + delta})
        return jnp.sum(logits[:, -1] ** 2)

    def through_inputs(e):
        logits = GPT(cfg).apply({"params": params}, None, inputs_embeds_BxTxC=e)
        return jnp.sum(logits[:, -1] ** 2)
    g = jax.jit(jax.grad(through_tap))(jnp.zeros_like(emb))
    np.testing.assert_allclose(g, jax.jit(jax.grad(through_inputs))(emb), rtol=1e-5, atol=1e-7)
    assert float(jnp.max(jnp.abs(g))) > 0
    # Attribution inside a scan (lax.switch on the period): a delta on h_1's output is one on
    # h_2's input, and reaches only positions up to the logit's.
    cfg = _cfg("gpt3_scan_remat")
    params = _params(cfg)

    def target(d1, d2):
        logits, _ = inspect.forward_with_capture(
            cfg, params, TOKENS, (), {"h_1.resid_post": lambda x: x + d1,
                                      "h_2.resid_pre": lambda x: x + d2})
        return jnp.sum(logits[:, 5])
    zeros = jnp.zeros((2, 12, 32))
    g1, g2 = jax.jit(jax.grad(target, argnums=(0, 1)))(zeros, zeros)
    np.testing.assert_allclose(g1, g2, rtol=1e-6, atol=1e-8)
    assert float(jnp.max(jnp.abs(g1[:, :6]))) > 0 and float(jnp.max(jnp.abs(g1[:, 6:]))) == 0


def test_vmap_over_a_sweeps_models_equals_each_alone():
    c = base_config()
    c.model = model_config("tiny", vocab_size=64, n_ctx=16)
    cfg = model_config_from(c)
    state, _, _, _ = sweep.init_sweep(c, cfg, [0, 1, 2])
    pats = ["h_*.attn.probs", "h_*.mlp.act", "*.resid_post"]
    logits, acts = jax.jit(jax.vmap(
        lambda p: inspect.forward_with_capture(cfg, p, TOKENS, pats)))(state.params)
    for i in range(3):
        alone_logits, alone = _capture(cfg, jax.tree.map(lambda x: x[i], state.params), TOKENS,
                                       pats)
        np.testing.assert_allclose(logits[i], alone_logits, rtol=1e-6, atol=1e-6)
        for n in alone:
            np.testing.assert_allclose(acts[n][i], alone[n], rtol=1e-6, atol=1e-6, err_msg=n)
    assert float(jnp.max(jnp.abs(acts["h_1.mlp.act"][0] - acts["h_1.mlp.act"][1]))) > 1e-3


@pytest.mark.parametrize("name", ["gpt2", "gpt3_scan_remat"])
def test_cached_decoding_captures_what_the_full_forward_does(name):
    cfg = _cfg(name)
    params = _params(cfg)
    pats = ["h_*.attn.probs", "h_*.mlp.act", "h_*.resid_post", "wte"]
    T, S = TOKENS.shape[1], 16
    full_logits, full = _capture(cfg, params, TOKENS, pats)

    @jax.jit
    def prefill_then_step(p):
        (_, cache), _ = inspect.forward_with_capture(cfg, p, TOKENS[:, :-1], pats,
                                                     cache=init_cache(cfg, 2, S))
        return inspect.forward_with_capture(cfg, p, TOKENS[:, -1:], pats, cache=cache)
    (logits, _), got = prefill_then_step(params)
    np.testing.assert_allclose(logits[:, 0], full_logits[:, -1], rtol=1e-5, atol=1e-5)
    for n in full:
        want = full[n][:, :, -1:] if n.endswith("probs") else full[n][:, -1:]
        have = got[n][..., :T] if n.endswith("probs") else got[n]
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6, err_msg=n)
    assert float(jnp.max(jnp.abs(got["h_0.attn.probs"][..., T:]))) == 0  # empty slots


def test_a_paged_cache_step_captures_what_a_dense_cache_step_does():
    """The serving engine's paged cache: one decode step of a row whose prompt sits in two
    scattered pages captures what the same step over a dense cache does (probabilities aside:
    a paged cache never forms them, tested in test_errors_are_one_line)."""
    from test_model import _pages_put  # the prompt's keys/values into pool slots, as insert does
    cfg = _cfg("gpt2")
    params = _params(cfg)
    pats = ["h_*.mlp.act", "h_*.resid_post", "h_*.attn.z"]
    G, L, table = 4, 5, [3, 1]
    (_, cache), _ = inspect.forward_with_capture(cfg, params, TOKENS[:1, :L],
                                                 cache=init_cache(cfg, 1, 16))
    step_tok, step_pos = TOKENS[:1, L:L + 1], jnp.array([[L]])
    (want_logits, _), want = inspect.forward_with_capture(cfg, params, step_tok, pats,
                                                          cache=cache, positions_BxT=step_pos)
    slots = jnp.array([table[p // G] * G + p % G for p in range(L)])
    pool = jax.tree_util.tree_map(lambda P, d: _pages_put(P, d, slots, L),
                                  init_pages(cfg, 4, G), cache["layers"])
    view = PagedView(jnp.array([[table[L // G] * G + L % G]]), jnp.array(table),
                     jnp.array([0, 0]), jnp.array([0, G]))
    (logits, _), got = inspect.forward_with_capture(cfg, params, step_tok, pats,
                                                    cache=PagedCache(pool, view),
                                                    positions_BxT=step_pos)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert sorted(got) == sorted(want) and len(got) == 3 * cfg.n_layer
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_logit_lens_of_the_last_layer_is_the_logits():
    for name in ["gpt2", "gpt1"]:
        cfg = _cfg(name)
        params = _params(cfg)
        logits, acts = _capture(cfg, params, TOKENS, f"h_{cfg.n_layer - 1}.resid_post")
        lens = inspect.logit_lens(cfg, params, acts[f"h_{cfg.n_layer - 1}.resid_post"])
        np.testing.assert_allclose(lens, logits, rtol=1e-6, atol=1e-6)


def test_errors_are_one_line():
    cfg = _cfg()
    params = _params(cfg)
    for point, fn, msg in [  # (JAX would drop an out-of-range write silently)
            ("h_0.attn.z", inspect.ablate_heads(7),
             r"ablate_heads\(7\): indices must be in 0\.\.1"),
            ("h_1.mlp.act", inspect.ablate_neurons([3, 128]),
             r"ablate_neurons\(\[3, 128\]\): indices must be in 0\.\.127")]:
        with pytest.raises(ValueError, match=msg) as e:
            inspect.forward_with_capture(cfg, params, TOKENS, (), {point: fn})
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"'h_9\.mlp\.act' matches no point.*available: wte, "
                                         r"wpe, h_\{0\.\.1\}\.\{resid_pre, attn\.probs") as e:
        inspect.forward_with_capture(cfg, params, TOKENS, ["h_*.mlp.act", "h_9.mlp.act"])
    assert "\n" not in str(e.value) and "mlp.act" in str(e.value)
    with pytest.raises(ValueError, match="matches no point") as e:
        inspect.forward_with_capture(cfg, params, TOKENS, (), {"h_0.mlp.gelu": lambda x: x})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="attention_impl='pallas' never forms") as e:
        inspect.forward_with_capture(_cfg(attention_impl="pallas"), params, TOKENS,
                                     "h_0.attn.probs")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="with attention dropout on") as e:
        inspect.forward_with_capture(_cfg(attn_pdrop=0.1), params, TOKENS, (),
                                     {"h_0.attn.probs": lambda p: p}, deterministic=False,
                                     rngs={"dropout": jax.random.key(0)})
    assert "\n" not in str(e.value)
    paged = PagedCache(init_pages(cfg, 4, 4), PagedView(*(jnp.zeros((2, 1), jnp.int32),) * 4))
    with pytest.raises(ValueError, match="'h_0.attn.probs': a paged cache attends page") as e:
        inspect.forward_with_capture(cfg, params, TOKENS[:, :1], "h_0.attn.probs", cache=paged,
                                     positions_BxT=jnp.zeros((2, 1), jnp.int32))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"interventions\['wte'\] is int; give a function"):
        inspect.forward_with_capture(cfg, params, TOKENS, (), {"wte": 0})
    with pytest.raises(ValueError, match=r"'h_0\.mlp\.act' returned \(2, 12, 3\)") as e:
        inspect.forward_with_capture(cfg, params, TOKENS, (),
                                     {"h_0.mlp.act": lambda x: x[..., :3]})
    assert "\n" not in str(e.value)


def _readme_blocks() -> list:
    text = (REPO / "README.md").read_text()
    section = text.split("## Looking inside the model", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_readme_research_examples_run():
    blocks = _readme_blocks()
    assert len(blocks) >= 2
    scope = {}
    for code in blocks:
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the README's own example
    assert scope["acts"]["h_0.mlp.act"].shape[-1] == 4 * scope["cfg"].n_embd


def test_worked_experiment_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "logit_lens_patching", REPO / "examples" / "logit_lens_patching.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    r = script.main(["--smoke", "--out", str(tmp_path), "--clean", "to be or not to be",
                     "--corrupt", "to be or Xot to be"])
    restored = np.asarray(r["restored"])
    assert restored.shape == (2, 18) and np.asarray(r["lens_logprob"]).shape == (2, 17)
    # Before the corrupted position nothing differs; patching it at the input restores all.
    # (An untrained model's logit difference is small: fp32 rounding shows at 1e-5 of it.)
    np.testing.assert_allclose(restored[:, :9], 0.0, atol=1e-3)
    np.testing.assert_allclose(restored[0, 9], 1.0, atol=1e-3)
    assert json.loads((tmp_path / "inspect.json").read_text())["target"] == r["target"]
    for png in ("lens.png", "patching.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
