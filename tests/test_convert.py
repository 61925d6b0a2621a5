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
TOL = 1e-4


def _gpt2(seed=0, cls="GPT2LMHeadModel", **shape):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(**shape)
    return getattr(transformers, cls)(cfg).eval()


def _openai(seed=0, cls="OpenAIGPTLMHeadModel", **shape):
    torch.manual_seed(seed)
    cfg = transformers.OpenAIGPTConfig(**shape)
    return getattr(transformers, cls)(cfg).eval()


def _hf_logits(model, x):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(x))).logits.numpy()


def _tokens(shape, B=3):
    return np.random.RandomState(0).randint(0, shape["vocab_size"], (B, shape["n_positions"]))


def _ours(cfg, params, x):
    return np.asarray(GPT(cfg).apply({"params": params}, jnp.asarray(x)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", ["gpt2", "openai"])
def test_logits_parity_from_model_object(shape, family):
    hf = _gpt2(**shape) if family == "gpt2" else _openai(**shape)
    cfg, params = from_hf(hf)
    assert cfg.norm_position == ("pre" if family == "gpt2" else "post")
    x = _tokens(shape)
    diff = np.abs(_ours(cfg, params, x) - _hf_logits(hf, x)).max()
    print(f"max |logit diff| {family} {shape}: {diff:.2e}")
    assert diff < TOL


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
    assert np.abs(_ours(cfg, params, x) - _hf_logits(hf, x)).max() < TOL


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
        assert np.abs(_ours(cfg, params, x) - ref).max() < TOL
    om = transformers.OpenAIGPTDoubleHeadsModel(_openai(seed=3, **shape).config).eval()
    cfg, params = from_hf(om)
    with torch.no_grad():
        ref = om(torch.tensor(x)).logits.numpy()
    assert np.abs(_ours(cfg, params, x) - ref).max() < TOL


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
    assert np.abs(_hf_logits(back, x) - _ours(cfg, params, x)).max() < TOL
    # And it imports again as the same config.
    cfg2, _ = from_hf(str(tmp_path))
    assert cfg2 == cfg


def test_import_into_scan_layout():
    shape = SHAPES[0]
    hf = _gpt2(seed=5, **shape)
    cfg, params = from_hf(hf, scan_layers=True)
    assert "h" in params and "h_0" not in params
    x = _tokens(shape)
    assert np.abs(_ours(cfg, params, x) - _hf_logits(hf, x)).max() < TOL


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
