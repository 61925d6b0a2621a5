"""Hugging Face interop: logits parity with transformers' GPT-2 and OpenAI-GPT, import and export."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from gptjax import GPT, GPTConfig, init_params  # noqa: E402
from gptjax.nn.convert import ConversionError, from_hf, to_hf  # noqa: E402

# Unusual shapes: odd vocabulary, 5 or 3 heads (not a power of two), context 37.
SHAPES = [dict(vocab_size=101, n_positions=37, n_embd=60, n_layer=3, n_head=5),
          dict(vocab_size=257, n_positions=23, n_embd=48, n_layer=2, n_head=3)]
# Logits agree to max|diff| / max|ref| <= REL_TOL: fp32 rounding, nothing more. Measured on CPU:
# 3-4e-7 at transformers' default init, 3-7e-7 in the nonlinear regime of `_nonlinear`, and
# 1.23e-6 once in CI (a clean clone, default init, GPT-2 shape 0: a different summation order in
# the thread pools). 4e-6 is 30 float32 epsilons: still rounding, not a wrong formula.
REL_TOL = 4e-6
# A swapped GELU variant moves the logits by 1.4e-4..4e-4 (relative) in the nonlinear regime:
# 35x the tolerance at least, so a swapped variant cannot pass as rounding.
WRONG_VARIANT_MIN = 1e-4


def _gpt2(seed=0, cls="GPT2LMHeadModel", **shape):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**shape)
    return getattr(transformers, cls)(cfg).eval()


def _openai(seed=0, cls="OpenAIGPTLMHeadModel", **shape):
    torch.manual_seed(seed)
    cfg = transformers.OpenAIGPTConfig(**shape)
    return getattr(transformers, cls)(cfg).eval()


def _nonlinear(model, seed=0, std=0.1):
    """Every weight redrawn so that the MLP is far from linear: matrices N(0, std^2) (c_fc
    pre-activations of standard deviation ~0.8 at these widths, where the GELU curvature lives),
    biases N(0, std^2), layer-norm scales 1 + N(0, std^2).

    At transformers' default init (std 0.02) the pre-activations are so small that GELU is nearly
    linear and a wrong GELU variant stays within fp32 noise (OpenAI-GPT: 5e-7). transformers'
    own `initializer_range=0.3` is too far: there torch's fp32 logits differ from its fp64 ones by
    2e-6 relative, and OpenAI-GPT's Conv1D layers ignore initializer_range in transformers 5.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            is_scale = p.ndim == 1 and name.endswith("weight")  # ln_*.weight
            p.copy_(1.0 + noise if is_scale else noise)
    return model


def _rel_diff(ours, ref):
    """max|ours - ref| / max|ref|: the parity measure of every logits comparison here."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def _hf_logits(model, x):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(x))).logits.numpy()


def _tokens(shape, B=3):
    return np.random.RandomState(0).randint(0, shape["vocab_size"], (B, shape["n_positions"]))


def _ours(cfg, params, x):
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(x)))


@pytest.mark.parametrize("regime", ["default_init", "nonlinear"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", ["gpt2", "openai"])
def test_logits_parity_from_model_object(shape, family, regime):
    hf = _gpt2(**shape) if family == "gpt2" else _openai(**shape)
    if regime == "nonlinear":
        _nonlinear(hf)
    cfg, params = from_hf(hf)
    assert cfg.norm_position == ("pre" if family == "gpt2" else "post")
    x = _tokens(shape)
    rel = _rel_diff(_ours(cfg, params, x), _hf_logits(hf, x))
    print(f"max|logit diff| / max|logit| {family} {regime} {shape}: {rel:.2e}")
    assert rel <= REL_TOL


# (family, the transformers activation name, the GPTConfig.activation it must map to).
# OpenAI-GPT's "gelu" is transformers' gelu_new (the tanh approximation), GPT-2's "gelu" the
# exact erf form.
GELU_CASES = [("gpt2", "gelu_new", "gelu_tanh"), ("gpt2", "gelu", "gelu"),
              ("openai", "gelu", "gelu_tanh")]


@pytest.mark.parametrize("family, hf_act, ours_act", GELU_CASES)
def test_gelu_variant_is_the_one_transformers_runs(family, hf_act, ours_act):
    shape = SHAPES[0]
    hf = (_gpt2(seed=6, activation_function=hf_act, **shape) if family == "gpt2"
          else _openai(seed=6, afn=hf_act, **shape))
    _nonlinear(hf, seed=6)
    cfg, params = from_hf(hf)
    assert cfg.activation == ours_act
    x = _tokens(shape)
    ref = _hf_logits(hf, x)
    assert _rel_diff(_ours(cfg, params, x), ref) <= REL_TOL
    other = {"gelu_tanh": "gelu", "gelu": "gelu_tanh"}[ours_act]
    swapped = _rel_diff(_ours(cfg.replace(activation=other), params, x), ref)
    assert swapped > WRONG_VARIANT_MIN, (other, swapped)


@pytest.mark.parametrize("family", ["gpt2", "openai"])
@pytest.mark.parametrize("fmt", ["safetensors", "pytorch"])
def test_logits_parity_from_saved_directory(tmp_path, family, fmt):
    shape = SHAPES[0]
    hf = _gpt2(seed=1, **shape) if family == "gpt2" else _openai(seed=1, **shape)
    hf.save_pretrained(tmp_path)
    if fmt == "pytorch":
        # transformers v5 writes safetensors only; older releases and many hub repos ship .bin.
        (tmp_path / "model.safetensors").unlink()
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    cfg, params = from_hf(str(tmp_path))
    x = _tokens(shape)
    assert _rel_diff(_ours(cfg, params, x), _hf_logits(hf, x)) <= REL_TOL


def test_base_and_double_heads_weights_import():
    shape = SHAPES[1]
    lm = _gpt2(seed=2, **shape)
    x = _tokens(shape)
    ref = _hf_logits(lm, x)
    double = transformers.GPT2DoubleHeadsModel(lm.config).eval()
    missing = double.load_state_dict(lm.state_dict(), strict=False)
    assert not [k for k in missing.missing_keys if not k.startswith("multiple_choice")]
    # lm.transformer is a GPT2Model: tensor names without the `transformer.` prefix.
    for other in (lm.transformer, double):
        cfg, params = from_hf(other)
        assert _rel_diff(_ours(cfg, params, x), ref) <= REL_TOL
    om = transformers.OpenAIGPTDoubleHeadsModel(_openai(seed=3, **shape).config).eval()
    cfg, params = from_hf(om)
    with torch.no_grad():
        ref = om(torch.tensor(x)).logits.numpy()
    assert _rel_diff(_ours(cfg, params, x), ref) <= REL_TOL


@pytest.mark.parametrize("family", ["gpt2", "openai"])
def test_export_round_trip_in_transformers(tmp_path, family):
    shape = SHAPES[0]
    hf = _gpt2(seed=4, **shape) if family == "gpt2" else _openai(seed=4, **shape)
    cfg, params = from_hf(hf)
    to_hf(cfg, params, tmp_path)
    cls = transformers.GPT2LMHeadModel if family == "gpt2" else transformers.OpenAIGPTLMHeadModel
    back = cls.from_pretrained(tmp_path).eval()
    x = _tokens(shape)
    np.testing.assert_allclose(_hf_logits(back, x), _hf_logits(hf, x), atol=1e-6)


def test_export_of_gptjax_init_loads_in_transformers(tmp_path):
    cfg = GPTConfig.preset("tiny", vocab_size=99, n_ctx=29, n_head=4)
    import jax
    params = init_params(cfg, jax.random.key(0))
    to_hf(cfg, params, tmp_path)
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    x = np.random.RandomState(1).randint(0, 99, (2, 29))
    assert _rel_diff(_ours(cfg, params, x), _hf_logits(back, x)) <= REL_TOL
    # And it imports again as the same config.
    cfg2, _ = from_hf(str(tmp_path))
    assert cfg2 == cfg


def test_import_into_scan_layout():
    shape = SHAPES[0]
    hf = _gpt2(seed=5, **shape)
    cfg, params = from_hf(hf, scan_layers=True)
    assert "h" in params and "h_0" not in params
    x = _tokens(shape)
    assert _rel_diff(_ours(cfg, params, x), _hf_logits(hf, x)) <= REL_TOL


def test_bad_inputs_are_clear(tmp_path):
    with pytest.raises(ConversionError, match="not a directory"):
        from_hf(str(tmp_path / "nope"))
    with pytest.raises(ConversionError, match="has no config.json"):
        from_hf(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConversionError, match="model_type='llama' is not supported"):
        from_hf(str(tmp_path))


def test_openai_tf_checkpoint_needs_tensorflow(tmp_path):
    (tmp_path / "hparams.json").write_text(json.dumps(
        {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}))
    try:
        import tensorflow  # noqa: F401
        pytest.skip("tensorflow installed: the reader path is used instead")
    except ImportError:
        pass
    with pytest.raises(ConversionError, match="needs TensorFlow"):
        from_hf(str(tmp_path))


def test_banded_config_cannot_export(tmp_path):
    import jax
    cfg = GPTConfig.preset("tiny-gpt3")
    with pytest.raises(ConversionError, match="banded"):
        to_hf(cfg, init_params(cfg, jax.random.key(0)), tmp_path)
