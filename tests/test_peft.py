"""PEFT interop (gptjax.nn.peft, gptjax.runs.export): gptjax adapters load in `peft` over
transformers' GPT-2 with the same logits, `peft`'s adapters import with the same logits, an int8
base with an imported adapter, the merged transformers export, load_pretrained(peft_dir=...), and
one-line errors."""

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers

from conftest import REPO, hf_gpt2_dir, shared_data_dir, small_hf_lm, subprocess_env
from gptjax import GPT
from gptjax.data.tokenizers import CharTokenizer, from_hf_files
from gptjax.eval import run
from gptjax.nn import lora, quant
from gptjax.nn.convert import ConversionError, from_hf
from gptjax.nn.param_layout import stack_layers
from gptjax.nn.peft import export_peft, from_peft
from gptjax.runs.export import export_merged_hf, write_hf_tokenizer
from gptjax.runs.pretrained import load_pretrained

SHAPE = dict(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
TOKENS = np.arange(24).reshape(2, 12) % 64
REL = 1e-5  # max|ours - theirs| / max|theirs|, the bound (measured: ~2e-7, fp32 rounding)


def _close(ours, theirs, rel=REL):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    scale = float(np.max(np.abs(theirs)))
    assert float(np.max(np.abs(ours - theirs))) <= rel * scale, (
        float(np.max(np.abs(ours - theirs))) / scale)


@pytest.fixture(scope="module")
def gpt2():
    """(transformers GPT-2, its gptjax config and parameters)."""
    model = small_hf_lm("gpt2", 0, **SHAPE)
    cfg, base = from_hf(model)
    return model, cfg, base


def _adapters(cfg, targets, rank=4, alpha=8, seed=1):
    """Adapters with A and B drawn N(0, 0.1^2) (a new adapter's B is zero: this one matters)."""
    shapes = lora.abstract_lora(cfg, lora.LoraConfig(rank=rank, alpha=alpha, targets=targets))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), jnp.float32), shapes)


# Jitted: one compile per model and tree instead of one per op.
_lora_apply = jax.jit(lora.apply, static_argnums=0)
_quantize = jax.jit(quant.quantize_params, static_argnums=(0, 2))
_plain_apply = jax.jit(lambda cfg, params, x: GPT(cfg).apply({"params": params}, x),
                       static_argnums=0)


def _torch_logits(model):
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


def _lora_modules(peft_model):
    """The module names `peft` put a LoRA layer on ('h.0.attn.c_proj', ...)."""
    return sorted(n.split("transformer.", 1)[1] for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and len(m.lora_A))


@pytest.mark.parametrize("targets, scan", [(("all",), False), (("attn.c_proj",), False),
                                           (("c_attn", "mlp.c_proj"), True)])
def test_exported_adapter_loads_in_peft(gpt2, tmp_path, targets, scan):
    model, cfg, base = gpt2
    if scan:
        cfg = cfg.with_execution(scan_layers=True)
        base = stack_layers(cfg, base)
    ad = _adapters(cfg, targets)
    ours = _lora_apply(cfg, base, ad, TOKENS)
    assert float(jnp.max(jnp.abs(ours - _plain_apply(cfg, base, TOKENS)))) > 1e-2
    export_peft(cfg, ad, tmp_path, base_model_name_or_path="gpt2-tiny")
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    modules = lora.resolve_targets(targets)
    assert _lora_modules(pm) == sorted(f"h.{i}.{m}" for i in range(2) for m in modules)
    _close(ours, _torch_logits(pm))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (
        4, 8, "gpt2-tiny")
    # And back: the same adapters, bit for bit, in the same layout.
    lora_cfg, back = from_peft(cfg, tmp_path)
    assert lora_cfg == lora.LoraConfig(rank=4, alpha=8.0, targets=modules)
    assert jax.tree.structure(back) == jax.tree.structure(ad)
    jax.tree.map(np.testing.assert_array_equal, back, ad)


def test_openai_gpt_adapter_loads_in_peft(tmp_path):
    model = small_hf_lm("openai", 0, **SHAPE)
    cfg, base = from_hf(model)
    ad = _adapters(cfg, ("c_fc", "c_proj"))
    export_peft(cfg, ad, tmp_path)
    pm = peft.PeftModel.from_pretrained(model, tmp_path)
    _close(_lora_apply(cfg, base, ad, TOKENS), _torch_logits(pm))


def _peft_made(model, out, seed=3, **options):
    """An adapter made by `peft` over `model` (B randomised), saved to `out`; the PeftModel."""
    options = dict(dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                        fan_in_fan_out=True, lora_dropout=0.1), **options)
    pm = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**options))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(out)
    return pm.eval()


@pytest.mark.parametrize("options, scan", [
    (dict(), False),
    (dict(r=2, lora_alpha=16, target_modules=["c_proj"], layers_to_transform=[1]), True)])
def test_peft_made_adapter_imports(gpt2, tmp_path, options, scan):
    model, cfg, base = gpt2
    pm = _peft_made(model, tmp_path, **options)
    theirs = _torch_logits(pm)
    assert float(np.max(np.abs(theirs - _torch_logits(model)))) > 1e-2
    if scan:
        cfg = cfg.with_execution(scan_layers=True)
        base = stack_layers(cfg, base)
    lora_cfg, ad = from_peft(cfg, tmp_path)
    r, alpha = options.get("r", 4), options.get("lora_alpha", 8)
    targets = ("attn.c_proj", "mlp.c_proj") if options else tuple(lora.TARGETS)
    assert lora_cfg == lora.LoraConfig(rank=r, alpha=float(alpha), dropout=0.1, targets=targets)
    # The same tree init_lora makes for that config: it can go on training in gptjax.
    assert jax.tree.structure(ad) == jax.tree.structure(lora.abstract_lora(cfg, lora_cfg))
    assert jax.tree.map(jnp.shape, ad) == jax.tree.map(jnp.shape, lora.abstract_lora(
        cfg, lora_cfg))
    _close(_lora_apply(cfg, base, ad, TOKENS), theirs)


def test_int8_base_with_imported_adapter(gpt2, tmp_path):
    model, cfg, base = gpt2
    _peft_made(model, tmp_path)
    _, ad = from_peft(cfg, tmp_path)
    q = _quantize(cfg, base, "int8")
    merged = jax.jit(lora.merge, static_argnums=0)(cfg, q, ad)
    _close(_lora_apply(cfg, q, ad, TOKENS), _plain_apply(cfg, merged, TOKENS))


def test_merged_export_equals_merge_and_unload(gpt2, tmp_path):
    model, cfg, base = gpt2
    ad = _adapters(cfg, ("all",))
    export_peft(cfg, ad, tmp_path / "adapter")
    merged_by_peft = peft.PeftModel.from_pretrained(copy.deepcopy(model),
                                                    tmp_path / "adapter").merge_and_unload()
    export_merged_hf(cfg, base, ad, tmp_path / "hf")
    ours = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    _close(_torch_logits(ours), _torch_logits(merged_by_peft))
    _close(_torch_logits(ours), _lora_apply(cfg, base, ad, TOKENS))
    # An int8 base is dequantized, then merged.
    q = _quantize(cfg, base, "int8")
    export_merged_hf(cfg, q, ad, tmp_path / "hf8")
    ours8 = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf8").eval()
    _close(_torch_logits(ours8), _lora_apply(cfg, q, ad, TOKENS))


def test_tokenizer_files_for_transformers(tmp_path):
    bpe = shared_data_dir() / "gpt2_bpe"
    if not bpe.is_dir():
        pytest.skip(f"{bpe} is absent")
    tok = from_hf_files(bpe)
    write_hf_tokenizer(tok, tmp_path, model_max_length=16)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    text = "Hello world, it's 2026!\n  caf\u00e9 \U0001F600 ok"
    assert theirs(text)["input_ids"] == tok.encode(text)
    assert theirs.eos_token_id == tok.eos_id == 50256 and theirs.model_max_length == 16
    with pytest.raises(ConversionError, match=r"^tokenizer kind 'char' has no transformers"):
        write_hf_tokenizer(CharTokenizer.from_config(
            texts=["ab"], directory=None, vocab_size=0, path="", unknown="error",
            user_defined_symbols=()), tmp_path)


def test_load_pretrained_merges_a_peft_adapter(tmp_path):
    hf = hf_gpt2_dir(tmp_path / "hf", 16)
    model = transformers.GPT2LMHeadModel.from_pretrained(hf).eval()
    pm = _peft_made(model, tmp_path / "adapter")
    theirs = _torch_logits(pm)
    cfg, params, tok = load_pretrained(hf_dir=str(hf), peft_dir=str(tmp_path / "adapter"))
    assert tok.vocab_size == 50257
    _close(_plain_apply(cfg, params, TOKENS), theirs)
    cfg, params, _ = load_pretrained(hf_dir=str(hf), peft_dir=str(tmp_path / "adapter"),
                                     execution="scan_layers=True")
    assert "h" in params
    _close(_plain_apply(cfg, params, TOKENS), theirs)
    # The merged model written back out, with its tokenizer, loads as a plain GPT-2 directory.
    base_cfg, base = from_hf(str(hf))
    _, ad = from_peft(base_cfg, tmp_path / "adapter")
    export_merged_hf(base_cfg, base, ad, tmp_path / "merged", tokenizer=tok)
    cfg, params, tok2 = load_pretrained(hf_dir=str(tmp_path / "merged"))
    _close(_plain_apply(cfg, params, TOKENS), theirs)
    assert tok2.encode("Hello world") == tok.encode("Hello world") == [15496, 995]
    with pytest.raises(ValueError, match=r"^--peft_dir='x' goes with --hf_dir"):
        load_pretrained(workdir=str(tmp_path), peft_dir="x")
    # eval.py's loader passes it on.
    [(_, cfg, params, _, _)] = run.load_models([], [str(hf)], peft_dir=str(tmp_path / "adapter"))
    _close(_plain_apply(cfg, params, TOKENS), theirs)
    with pytest.raises(ValueError, match=r"^--peft_dir='x' goes with --hf_dir"):
        run.load_models([str(tmp_path)], [], peft_dir="x")


def _edit_config(d, **changes):
    path = d / "adapter_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


def _one_line(fn, pattern):
    with pytest.raises(ConversionError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and re.search(pattern, msg), msg


@pytest.mark.parametrize("change, pattern", [
    (dict(peft_type="IA3"), r"peft_type='IA3' is not supported; allowed: 'LORA'$"),
    (dict(use_rslora=True), r"use_rslora=True \(rsLoRA scaling\) is not supported"),
    (dict(use_dora=True), r"use_dora=True \(DoRA\) is not supported"),
    (dict(bias="lora_only"), r"bias='lora_only' \(trained biases\) is not supported; allowed: "
                             r"'none'$"),
    (dict(modules_to_save=["lm_head"]), r"modules_to_save=\['lm_head'\] \(modules_to_save"),
    (dict(rank_pattern={"c_fc": 8}), r"rank_pattern=\{'c_fc': 8\} \(per-module ranks\)"),
    (dict(init_lora_weights="pissa"), r"init_lora_weights='pissa' \(an adapter over modified "
                                      r"base weights\) is not supported"),
])
def test_unsupported_peft_options_are_one_line(gpt2, tmp_path, change, pattern):
    _, cfg, _ = gpt2
    export_peft(cfg, _adapters(cfg, ("all",)), tmp_path)
    _edit_config(tmp_path, **change)
    _one_line(lambda: from_peft(cfg, tmp_path), pattern)


def test_bad_adapters_are_one_line(gpt2, tmp_path):
    _, cfg, _ = gpt2
    export_peft(cfg, _adapters(cfg, ("all",)), tmp_path / "a")
    # An adapter of another model: the first mismatching tensor, its shape and the expected one.
    wide = dataclasses.replace(cfg, n_embd=48, n_head=3)
    _one_line(lambda: from_peft(wide, tmp_path / "a"),
              r"tensor 'base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight' "
              r"has shape \(4, 32\); this model \(r=4\) expects \(4, 48\)$")
    shallow = dataclasses.replace(cfg, n_layer=1)
    _one_line(lambda: from_peft(shallow, tmp_path / "a"), r"is for layer 1; the model has 1 layers")
    # Missing files.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    os.remove(tmp_path / "b" / "adapter_model.safetensors")
    _one_line(lambda: from_peft(cfg, tmp_path / "b"),
              r"has neither adapter_model.safetensors nor adapter_model.bin$")
    _one_line(lambda: from_peft(cfg, tmp_path / "nowhere"),
              r"'.*nowhere' has no adapter_config.json: not a PEFT adapter directory$")
    # Export: one rank and alpha per PEFT config.
    mixed = _adapters(cfg, ("c_attn",))
    mixed["h_0"]["mlp"] = _adapters(cfg, ("c_fc",), rank=2)["h_0"]["mlp"]
    _one_line(lambda: export_peft(cfg, mixed, tmp_path / "c"),
              r"^the adapters have different rank values \[2, 4\]; a PEFT LoRA config has one$")
    # Adapters of another model.
    _one_line(lambda: export_peft(wide, _adapters(cfg, ("c_fc",)), tmp_path / "d"),
              r"^adapter h_0.mlp.c_fc has A \(32, 4\) and B \(4, 128\); this model's mlp.c_fc "
              r"takes 48 inputs to 192 outputs$")


def test_sample_py_takes_peft_dir(tmp_path):
    """--peft_dir reaches load_pretrained from the command line (ModelFlags): a bad adapter is
    one error line, exit status 2."""
    hf = hf_gpt2_dir(tmp_path / "hf", 16)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    r = subprocess.run([sys.executable, "sample.py", f"--hf_dir={hf}",
                        f"--peft_dir={tmp_path / 'adapter'}", "--prompt=hi"], cwd=REPO,
                       capture_output=True, text=True, timeout=300, env=subprocess_env())
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'adapter' / 'adapter_config.json'}: peft_type='PREFIX_TUNING' is "
        "not supported; allowed: 'LORA'")
