"""PEFT interop: gptjax LoRA adapters as Hugging Face PEFT directories, and back.

    export_peft(model_cfg, adapters, "out/adapter", base_model_name_or_path="gpt2")
    # torch: PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hf_dir), "out/adapter")
    lora_cfg, adapters = from_peft(model_cfg, "someone/else/adapter")

A PEFT directory holds `adapter_config.json` and `adapter_model.safetensors` (older PEFT wrote
`adapter_model.bin`, read here too). transformers' GPT-2 and OpenAI-GPT use Conv1D layers
(weight [in, out]), which PEFT's LoRA handles with `fan_in_fan_out=True`: per module it stores
`lora_A.weight` [r, in] and `lora_B.weight` [out, r] under names like
`base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`, and scales the branch by
lora_alpha / r, as gptjax does. gptjax's A [in..., r] is lora_A transposed with its input dims
flattened (attn.c_proj's [H, D]), B [r, out...] is lora_B transposed (c_attn's out dims
[3, H, D] flatten to HF's 3C in the same order as gptjax.nn.convert flattens the kernel).

PEFT's `c_proj` names both the attention and the MLP projection, so an adapter of only one of
them is written with its full name (`attn.c_proj`), which PEFT matches as a name suffix.
PEFT options gptjax does not implement (rsLoRA, DoRA, trained biases, modules_to_save, per-module
ranks, ...) are refused on import with a one-line error naming them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

import jax.numpy as jnp
import numpy as np
from safetensors.flax import load_file
from safetensors.numpy import save_file

from gptjax.config import GPTConfig
from gptjax.nn import lora
from gptjax.nn.adapter import LEAF, Adapter
from gptjax.nn.convert import ConversionError, _gist, config_to_hf, read_weight_files
from gptjax.nn.model import abstract_params
from gptjax.nn.param_layout import stack_layers, unstack_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model.transformer."  # the key prefix of a PeftModel over an LM head model

# A LoRA tensor of a GPT-2 / OpenAI-GPT block, with or without the PeftModel / LM-head prefixes.
_KEY = re.compile(r"^(?:base_model\.model\.)?(?:transformer\.)?h\.(\d+)\."
                  r"(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight$")
# PEFT LoRA options with no gptjax equivalent: any value other than these means "unsupported".
_UNSUPPORTED = {"use_rslora": "rsLoRA scaling", "use_dora": "DoRA", "lora_bias": "LoRA biases",
                "modules_to_save": "modules_to_save (fully trained modules)",
                "rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
                "target_parameters": "target_parameters", "use_qalora": "QALoRA",
                "trainable_token_indices": "trainable tokens",
                "layer_replication": "layer_replication",
                "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
                "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing",
                "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA",
                "loftq_config": "LoftQ (adapters of a quantized base)"}
# Initialisations that only set the adapter's starting A and B (the file holds the trained ones);
# the others (pissa, olora, corda, loftq, ...) change the base weights too.
_PLAIN_INITS = (True, False, "gaussian")


def peft_target_modules(modules) -> list:
    """PEFT's `target_modules` for gptjax module names (lora.TARGETS): the short names where
    they name exactly those modules (`c_attn`, `c_fc`, `c_proj` for both projections), the full
    name (`attn.c_proj`, `mlp.c_proj`) when only one projection is adapted."""
    chosen = set(modules)
    out = [m.split(".")[1] for m in ("attn.c_attn", "mlp.c_fc") if m in chosen]
    projections = [m for m in ("attn.c_proj", "mlp.c_proj") if m in chosen]
    out += ["c_proj"] if len(projections) == 2 else projections
    return out


def _per_layer(model_cfg: GPTConfig, adapters: Any) -> dict:
    """{(layer, module): Adapter} of an adapter tree in either layout."""
    tree = dict(adapters)
    if "h" in tree:
        tree = unstack_layers(model_cfg, tree)
    out = {}
    for path, ad in lora.adapters(tree):
        m = re.fullmatch(r"h_(\d+)", path[0]) if len(path) == 3 else None
        name = ".".join(path[1:])
        if m is None or name not in lora.TARGETS:
            raise ConversionError(f"adapter at {'.'.join(path)!r} is not one of a block's "
                                  f"matrices ({', '.join(lora.TARGETS)}); PEFT export needs those")
        out[(int(m.group(1)), name)] = ad
    if not out:
        raise ConversionError("the adapter tree holds no adapters")
    return out


def _one(values: dict, what: str):
    """The one value all adapters share, or a one-line error listing the different ones."""
    distinct = sorted(set(values.values()))
    if len(distinct) != 1:
        raise ConversionError(f"the adapters have different {what} values {distinct}; a PEFT "
                              f"LoRA config has one")
    return distinct[0]


def to_peft_state_dict(model_cfg: GPTConfig, adapters: Any) -> tuple:
    """(PEFT tensors by name as fp32 numpy, rank, alpha, dropout, gptjax module names).

    A module adapted in some layers only gets zero tensors (no change) in the others, since
    PEFT's target_modules name a module in every layer.
    """
    per = _per_layer(model_cfg, adapters)
    rank = _one({k: int(ad.a.shape[-1]) for k, ad in per.items()}, "rank")
    scale = _one({k: float(ad.scale) for k, ad in per.items()}, "scale (alpha / rank)")
    dropout = _one({k: float(ad.dropout) for k, ad in per.items()}, "dropout")
    modules = tuple(m for m in lora.TARGETS if any(k[1] == m for k in per))
    in_out = _in_out(model_cfg)
    sd = {}
    for i in range(model_cfg.n_layer):
        for m in modules:
            d_in, d_out = in_out[m]
            ad = per.get((i, m))
            if ad is not None and (np.prod(ad.a.shape[:-1]), np.prod(ad.b.shape[1:])) != (
                    d_in, d_out):
                raise ConversionError(f"adapter h_{i}.{m} has A {tuple(ad.a.shape)} and B "
                                      f"{tuple(ad.b.shape)}; this model's {m} takes {d_in} "
                                      f"inputs to {d_out} outputs")
            a = np.zeros((rank, d_in), np.float32) if ad is None else np.asarray(
                ad.a, np.float32).reshape(d_in, rank).T
            b = np.zeros((d_out, rank), np.float32) if ad is None else np.asarray(
                ad.b, np.float32).reshape(rank, d_out).T
            sd[f"{PREFIX}h.{i}.{m}.lora_A.weight"] = np.ascontiguousarray(a)
            sd[f"{PREFIX}h.{i}.{m}.lora_B.weight"] = np.ascontiguousarray(b)
    return sd, rank, scale * rank, dropout, modules


def _in_out(model_cfg: GPTConfig) -> dict:
    """{module: (flattened input size, flattened output size)} of a block's matrices."""
    shapes = abstract_params(model_cfg.with_execution(scan_layers=False))["h_0"]
    out = {}
    for m, n_in in lora.TARGETS.items():
        shape = shapes[m.split(".")[0]][m.split(".")[1]]["kernel"].shape
        out[m] = (int(np.prod(shape[:n_in])), int(np.prod(shape[n_in:])))
    return out


def export_peft(model_cfg: GPTConfig, adapters: Any, out_dir,
                base_model_name_or_path: Optional[str] = None) -> str:
    """Write `adapters` as a PEFT LoRA directory that `peft.PeftModel.from_pretrained(model,
    out_dir)` loads over transformers' GPT2LMHeadModel (or OpenAIGPTLMHeadModel) of the same
    weights.

    Args:
      model_cfg: the base model's architecture (either layout).
      adapters: the adapter tree (gptjax.nn.lora; every adapter of one rank, alpha and dropout).
      out_dir: the directory to write (created; files there are overwritten).
      base_model_name_or_path: recorded in the config, where PEFT's AutoPeftModel* look for the
        base model (a local directory or a hub name); None leaves it empty.

    Returns:
      out_dir.
    """
    config_to_hf(model_cfg)  # an architecture transformers has (one-line error otherwise)
    sd, rank, alpha, dropout, modules = to_peft_state_dict(model_cfg, adapters)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
        "lora_alpha": round(alpha) if abs(alpha - round(alpha)) < 1e-9 else alpha,
        "lora_dropout": dropout, "target_modules": peft_target_modules(modules),
        "fan_in_fan_out": True, "bias": "none", "use_rslora": False, "use_dora": False,
        "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
    }
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    save_file(sd, os.path.join(out_dir, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as fh:
        json.dump(config, fh, indent=2)
    return out_dir


def read_peft_config(peft_dir) -> dict:
    """The `adapter_config.json` of a PEFT LoRA directory, checked for options gptjax runs.

    Raises:
      ConversionError: a missing or unreadable file, another PEFT type than LORA, or an option
        gptjax does not implement (named).
    """
    path = os.path.join(os.fspath(peft_dir), CONFIG_NAME)
    if not os.path.isfile(path):
        raise ConversionError(f"{os.fspath(peft_dir)!r} has no {CONFIG_NAME}: not a PEFT "
                              "adapter directory")
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path} is not valid JSON ({_gist(e)})") from e
    if not isinstance(cfg, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    if cfg.get("peft_type") != "LORA":
        raise ConversionError(f"{path}: peft_type={cfg.get('peft_type')!r} is not supported; "
                              "allowed: 'LORA'")
    if cfg.get("bias", "none") != "none":
        raise ConversionError(f"{path}: bias={cfg['bias']!r} (trained biases) is not supported; "
                              "allowed: 'none'")
    for key, what in _UNSUPPORTED.items():
        if cfg.get(key):
            raise ConversionError(f"{path}: {key}={cfg[key]!r} ({what}) is not supported by "
                                  "gptjax's LoRA; allowed: false / null / empty")
    init = cfg.get("init_lora_weights", True)
    if init not in _PLAIN_INITS:
        raise ConversionError(f"{path}: init_lora_weights={init!r} (an adapter over modified base "
                              "weights) is not supported; allowed: true, false, 'gaussian'")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or isinstance(cfg.get(key), bool):
            raise ConversionError(f"{path}: {key}={cfg.get(key)!r} must be a number")
    return cfg


def _load_tensors(peft_dir: str) -> dict:
    """The adapter's tensors (fp32 numpy) from adapter_model.safetensors or adapter_model.bin."""
    tensors = read_weight_files(peft_dir, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME,
                                load_safetensors=load_file)
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}


def _pairs(model_cfg: GPTConfig, tensors: dict, rank: int, where: str) -> dict:
    """{(layer, module): (A [r, in], B [out, r])}, every name and shape checked."""
    in_out, found = _in_out(model_cfg), {}
    for key, value in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ConversionError(f"{where}: tensor {key!r} is not a LoRA matrix of a GPT-2 "
                                  f"block ({', '.join(lora.TARGETS)}); not supported")
        layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= model_cfg.n_layer:
            raise ConversionError(f"{where}: tensor {key!r} is for layer {layer}; the model has "
                                  f"{model_cfg.n_layer} layers")
        d_in, d_out = in_out[module]
        want = (rank, d_in) if ab == "A" else (d_out, rank)
        if tuple(value.shape) != want:
            raise ConversionError(f"{where}: tensor {key!r} has shape {tuple(value.shape)}; "
                                  f"this model (r={rank}) expects {want}")
        found.setdefault((layer, module), {})[ab] = value
    for (layer, module), ab in sorted(found.items()):
        if len(ab) != 2:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ConversionError(f"{where}: layer {layer} {module} has no {missing} tensor")
    if not found:
        raise ConversionError(f"{where}: no LoRA tensors")
    return {k: (v["A"], v["B"]) for k, v in found.items()}


def from_peft(model_cfg: GPTConfig, peft_dir) -> tuple:
    """Import a PEFT LoRA adapter of a GPT-2 / OpenAI-GPT model (made by `peft` over
    transformers): (LoraConfig, adapters) for `model_cfg`'s layout.

    The targets are the modules the file holds tensors for; a layer without them (PEFT's
    layers_to_transform) gets a zero adapter there, which changes nothing.

    Args:
      model_cfg: the base model's architecture (the adapter's shapes are checked against it).
      peft_dir: a local PEFT directory (`adapter_config.json` + `adapter_model.safetensors`).

    Returns:
      (LoraConfig(rank=r, alpha=lora_alpha, dropout=lora_dropout, targets=...), the adapter
      tree: fp32 A and B, `scan_layers`-stacked when the config says so).

    Raises:
      ConversionError: a missing file, another PEFT type, an unsupported option, or a tensor of
        another name or shape than the model's (named, with its shape and the expected one).
    """
    peft_dir = os.fspath(peft_dir)
    cfg = read_peft_config(peft_dir)
    rank = cfg["r"]
    pairs = _pairs(model_cfg, _load_tensors(peft_dir), rank, peft_dir)
    modules = tuple(m for m in lora.TARGETS if any(k[1] == m for k in pairs))
    lora_cfg = lora.LoraConfig(rank=rank, alpha=float(cfg["lora_alpha"]),
                               dropout=float(cfg.get("lora_dropout") or 0.0), targets=modules)
    lora.check_lora_config(lora_cfg)
    shapes = abstract_params(model_cfg.with_execution(scan_layers=False))["h_0"]
    tree: dict = {}
    for i in range(model_cfg.n_layer):
        for m in modules:
            kernel = shapes[m.split(".")[0]][m.split(".")[1]]["kernel"].shape
            d_in, d_out = kernel[:lora.TARGETS[m]], kernel[lora.TARGETS[m]:]
            a, b = pairs.get((i, m), (np.zeros((rank, int(np.prod(d_in))), np.float32),
                                      np.zeros((int(np.prod(d_out)), rank), np.float32)))
            tree.setdefault(f"h_{i}", {}).setdefault(m.split(".")[0], {})[m.split(".")[1]] = {
                LEAF: Adapter(jnp.asarray(a.T.reshape(d_in + (rank,))),
                                   jnp.asarray(b.T.reshape((rank,) + d_out)),
                                   lora_cfg.scale, float(lora_cfg.dropout))}
    if model_cfg.scan_layers:
        tree = stack_layers(model_cfg, tree)
    return lora_cfg, tree
