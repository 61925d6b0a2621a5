"""Hugging Face interop: import GPT-2 / OpenAI-GPT weights and export gptjax models as GPT-2.

`from_hf` reads a transformers model object (GPT2LMHeadModel, GPT2Model, GPT2DoubleHeadsModel,
OpenAIGPTLMHeadModel, OpenAIGPTModel, OpenAIGPTDoubleHeadsModel) or a local directory holding
`config.json` plus `model.safetensors` or `pytorch_model.bin`, or an original OpenAI GPT-2
TensorFlow checkpoint directory (`hparams.json` + `model.ckpt.*`). No network is used: a path is a
path, never a hub name.

The mapping is a rename plus reshapes: HF's Conv1D weights are [in, out] like flax kernels; the
attention kernels are split per head here ([C, 3, H, D] and [H, D, C]).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from gptjax.config import GPTConfig
from gptjax.nn.param_layout import stack_layers, unstack_layers

_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu": "gelu", "relu": "relu"}
# OpenAI-GPT's "gelu" is transformers' gelu_new, the tanh approximation (modeling_openai.ACT_FNS).
_OPENAI_ACTIVATIONS = {"gelu": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu"}


class ConversionError(ValueError):
    """The input cannot be converted; the message says what and why."""


# ---------------------------------------------------------------------------- configs
def config_from_hf(hf: Mapping[str, Any], **overrides) -> GPTConfig:
    """A GPTConfig from a transformers config dict (GPT-2 or OpenAI-GPT).

    Args:
      hf: the `config.json` contents (`model_type` 'gpt2' or 'openai-gpt').
      **overrides: GPTConfig fields to change.

    Returns:
      The GPTConfig.

    Raises:
      ConversionError: a model type or option gptjax does not implement.
    """
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in _GPT2_ACTIVATIONS:
            raise ConversionError(f"activation_function={act!r} is not supported; allowed: "
                                  f"{sorted(_GPT2_ACTIVATIONS)}")
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if hf.get(flag):
                raise ConversionError(f"{flag}=True is not supported (GPT-2 itself uses False)")
        if hf.get("scale_attn_weights") is False:
            raise ConversionError("scale_attn_weights=False is not supported")
        fields = dict(
            vocab_size=hf["vocab_size"], n_ctx=hf["n_positions"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], n_embd=hf["n_embd"], n_inner=hf.get("n_inner"),
            norm_position="pre", final_norm=True,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation=_GPT2_ACTIVATIONS[act], embd_pdrop=hf.get("embd_pdrop", 0.1),
            attn_pdrop=hf.get("attn_pdrop", 0.1), resid_pdrop=hf.get("resid_pdrop", 0.1),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02), scale_resid_init=True)
    elif model_type == "openai-gpt":
        act = hf.get("afn", "gelu")
        if act not in _OPENAI_ACTIVATIONS:
            raise ConversionError(f"afn={act!r} is not supported; allowed: "
                                  f"{sorted(_OPENAI_ACTIVATIONS)}")
        fields = dict(
            vocab_size=hf["vocab_size"], n_ctx=hf["n_positions"], n_layer=hf["n_layer"],
            n_head=hf["n_head"], n_embd=hf["n_embd"], norm_position="post", final_norm=False,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            activation=_OPENAI_ACTIVATIONS[act], embd_pdrop=hf.get("embd_pdrop", 0.1),
            attn_pdrop=hf.get("attn_pdrop", 0.1), resid_pdrop=hf.get("resid_pdrop", 0.1),
            tie_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("initializer_range", 0.02), scale_resid_init=False)
    else:
        raise ConversionError(f"model_type={model_type!r} is not supported; allowed: "
                              "'gpt2', 'openai-gpt'")
    fields.update(overrides)
    return GPTConfig(**fields)


def config_to_hf(config: GPTConfig) -> dict:
    """The transformers config dict (GPT-2 layout for pre-LN, OpenAI-GPT for post-LN).

    Args:
      config: the architecture.

    Returns:
      The `config.json` contents.

    Raises:
      ConversionError: the architecture has no transformers equivalent (banded layers, ...).
    """
    if config.attention_pattern != ("dense",) and set(config.attention_pattern) != {"dense"}:
        raise ConversionError("banded (local) attention layers have no transformers GPT-2 "
                              f"equivalent: attention_pattern={config.attention_pattern}")
    if config.head_dim is not None and config.head_dim * config.n_head != config.n_embd:
        raise ConversionError(f"head_dim={config.head_dim} x n_head={config.n_head} != "
                              f"n_embd={config.n_embd} has no transformers GPT-2 equivalent")
    if not config.use_bias:
        raise ConversionError("use_bias=False has no transformers GPT-2 equivalent")
    common = dict(vocab_size=config.vocab_size, n_positions=config.n_ctx, n_embd=config.n_embd,
                  n_layer=config.n_layer, n_head=config.n_head,
                  layer_norm_epsilon=config.layer_norm_epsilon, embd_pdrop=config.embd_pdrop,
                  attn_pdrop=config.attn_pdrop, resid_pdrop=config.resid_pdrop,
                  initializer_range=config.init_std,
                  tie_word_embeddings=config.tie_embeddings)
    if config.norm_position == "pre":
        if not config.final_norm:
            raise ConversionError("pre-LN without a final LayerNorm has no GPT-2 equivalent")
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[config.activation]
        return dict(common, model_type="gpt2", architectures=["GPT2LMHeadModel"],
                    n_inner=config.n_inner, activation_function=act)
    if config.final_norm or config.n_inner not in (None, 4 * config.n_embd):
        raise ConversionError("post-LN export supports OpenAI-GPT's layout only "
                              "(no final LayerNorm, 4x MLP)")
    if config.activation != "gelu_tanh":
        raise ConversionError(f"activation={config.activation!r}: OpenAI-GPT export needs gelu_tanh")
    return dict(common, model_type="openai-gpt", architectures=["OpenAIGPTLMHeadModel"], afn="gelu")


# ---------------------------------------------------------------------------- weights
def _strip_prefix(sd: Mapping[str, np.ndarray]) -> dict:
    """Drop the `transformer.` prefix of LM/double-heads models; keep the body's tensor names."""
    out = {}
    for k, v in sd.items():
        if k.startswith("transformer."):
            out[k[len("transformer."):]] = v
        else:
            out[k] = v
    return out


def params_from_state_dict(config: GPTConfig, sd: Mapping[str, np.ndarray]) -> dict:
    """gptjax parameters (per-layer layout) from a GPT-2 or OpenAI-GPT state dict of numpy arrays.

    Args:
      config: the architecture the weights belong to.
      sd: tensor name -> array, with or without the `transformer.` prefix.

    Returns:
      The parameter pytree (numpy fp32).
    """
    sd = _strip_prefix(sd)
    C, H, D, L = config.n_embd, config.n_head, config.d_head, config.n_layer
    openai = "tokens_embed.weight" in sd
    wte_key, wpe_key = (("tokens_embed.weight", "positions_embed.weight") if openai
                        else ("wte.weight", "wpe.weight"))
    used = set()

    def get(key):
        if key not in sd:
            raise ConversionError(f"weight {key!r} is missing from the checkpoint")
        used.add(key)
        return np.asarray(sd[key], np.float32)

    params = {"wte": {"embedding": get(wte_key)}, "wpe": {"embedding": get(wpe_key)}}
    for i in range(L):
        p = f"h.{i}."
        params[f"h_{i}"] = {
            "ln_1": {"scale": get(p + "ln_1.weight"), "bias": get(p + "ln_1.bias")},
            "ln_2": {"scale": get(p + "ln_2.weight"), "bias": get(p + "ln_2.bias")},
            "attn": {
                "c_attn": {"kernel": get(p + "attn.c_attn.weight").reshape(C, 3, H, D),
                           "bias": get(p + "attn.c_attn.bias").reshape(3, H, D)},
                "c_proj": {"kernel": get(p + "attn.c_proj.weight").reshape(H, D, C),
                           "bias": get(p + "attn.c_proj.bias")},
            },
            "mlp": {
                "c_fc": {"kernel": get(p + "mlp.c_fc.weight"), "bias": get(p + "mlp.c_fc.bias")},
                "c_proj": {"kernel": get(p + "mlp.c_proj.weight"),
                           "bias": get(p + "mlp.c_proj.bias")},
            },
        }
    if config.final_norm:
        params["ln_f"] = {"scale": get("ln_f.weight"), "bias": get("ln_f.bias")}
    if not config.tie_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    if params["wte"]["embedding"].shape != (config.vocab_size, C):
        raise ConversionError(f"wte has shape {params['wte']['embedding'].shape}, config expects "
                              f"{(config.vocab_size, C)}")
    return params


def params_to_state_dict(config: GPTConfig, params: Mapping[str, Any]) -> dict:
    """A GPT2LMHeadModel / OpenAIGPTLMHeadModel state dict (numpy, fp32) from gptjax parameters.

    Args:
      config: the architecture.
      params: parameters in the per-layer or the scan layout.

    Returns:
      Tensor name -> contiguous fp32 numpy array.
    """
    if "h" in params:
        params = unstack_layers(config, params)
    C = config.n_embd
    openai = config.norm_position == "post"
    f = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    pre = "transformer."
    sd = {}
    sd[pre + ("tokens_embed.weight" if openai else "wte.weight")] = f(params["wte"]["embedding"])
    sd[pre + ("positions_embed.weight" if openai else "wpe.weight")] = f(params["wpe"]["embedding"])
    for i in range(config.n_layer):
        p, h = f"{pre}h.{i}.", params[f"h_{i}"]
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = f(h["ln_1"]["scale"]), f(h["ln_1"]["bias"])
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = f(h["ln_2"]["scale"]), f(h["ln_2"]["bias"])
        sd[p + "attn.c_attn.weight"] = f(h["attn"]["c_attn"]["kernel"]).reshape(C, 3 * C)
        sd[p + "attn.c_attn.bias"] = f(h["attn"]["c_attn"]["bias"]).reshape(3 * C)
        sd[p + "attn.c_proj.weight"] = f(h["attn"]["c_proj"]["kernel"]).reshape(C, C)
        sd[p + "attn.c_proj.bias"] = f(h["attn"]["c_proj"]["bias"])
        sd[p + "mlp.c_fc.weight"] = f(h["mlp"]["c_fc"]["kernel"])
        sd[p + "mlp.c_fc.bias"] = f(h["mlp"]["c_fc"]["bias"])
        sd[p + "mlp.c_proj.weight"] = f(h["mlp"]["c_proj"]["kernel"])
        sd[p + "mlp.c_proj.bias"] = f(h["mlp"]["c_proj"]["bias"])
    if config.final_norm:
        sd[pre + "ln_f.weight"], sd[pre + "ln_f.bias"] = f(params["ln_f"]["scale"]), f(
            params["ln_f"]["bias"])
    # safetensors refuses shared storage, so a tied head is written once (transformers re-ties it).
    if not config.tie_embeddings:
        sd["lm_head.weight"] = f(params["lm_head"]).T.copy()
    return sd


# ---------------------------------------------------------------------------- entry points
def from_hf(path_or_model, **config_overrides):
    """Import a transformers GPT-2 / OpenAI-GPT model or a local checkpoint directory.

    Args:
      path_or_model: a transformers model object, or a local directory with `config.json` and
        `model.safetensors` / `pytorch_model.bin`, or an OpenAI GPT-2 TF checkpoint directory
        (`hparams.json` + `model.ckpt.*`).
      **config_overrides: GPTConfig fields to change (e.g. dtype, scan_layers, dropout).

    Returns:
      (config, params): a GPTConfig and the parameter pytree (numpy fp32, per-layer layout, or
      the scan layout when scan_layers is requested).
    """
    if isinstance(path_or_model, (str, os.PathLike)):
        path = os.fspath(path_or_model)
        if not os.path.isdir(path):
            raise ConversionError(f"{path!r} is not a directory; from_hf takes a local directory "
                                  "or a transformers model object (no hub downloads)")
        if os.path.exists(os.path.join(path, "hparams.json")) and not os.path.exists(
                os.path.join(path, "config.json")):
            return _from_openai_tf(path, **config_overrides)
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ConversionError(f"{path!r} has no config.json (nor hparams.json)")
        try:
            with open(cfg_path) as fh:
                hf_config = json.load(fh)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConversionError(f"{cfg_path} is not valid JSON ({_gist(e)})") from e
        if not isinstance(hf_config, dict):
            raise ConversionError(f"{cfg_path} does not hold a JSON object")
        config = config_from_hf(hf_config, **config_overrides)
        sd = _load_state_dict(path)
    else:
        model = path_or_model
        config = config_from_hf(model.config.to_dict(), **config_overrides)
        sd = {k: v.detach().cpu().float().numpy() for k, v in model.state_dict().items()}
    params = params_from_state_dict(config, sd)
    if config.scan_layers:
        params = stack_layers(config, params)
    return config, params


# torch.load(weights_only=True) had known ways around its restricted unpickler before 2.6
# (CVE-2025-32434), so an older torch never reads a weights file.
MIN_TORCH = (2, 6)


def _torch_for_weights(pt: str):
    """torch, when it can read `pt` safely; ConversionError otherwise."""
    try:
        import torch  # optional: only .bin checkpoints need torch
    except ImportError as e:
        raise ConversionError(f"{pt} is a PyTorch file and torch is not installed") from e
    version = tuple(int(x) for x in re.findall(r"\d+", torch.__version__)[:2])
    if version < MIN_TORCH:
        raise ConversionError(
            f"reading {pt} needs torch >= {'.'.join(map(str, MIN_TORCH))} (older versions' "
            f"weights_only loading can be bypassed by a crafted file); installed: "
            f"{torch.__version__}")
    return torch


def _load_state_dict(path: str) -> dict:
    """The tensors of `model.safetensors` (preferred) or `pytorch_model.bin`, as numpy.

    A file that is not what its name says (damaged, truncated, another format) is named in a
    one-line ConversionError instead of its reader's traceback.
    """
    return read_weight_files(path, "model.safetensors", "pytorch_model.bin")


def read_weight_files(directory: str, safetensors_name: str, torch_name: str,
                      load_safetensors: Any = load_file) -> dict:
    """The tensors of `directory/safetensors_name` (preferred, read by `load_safetensors`) or of
    `directory/torch_name` (PyTorch weights, fp32 numpy): a model's or a PEFT adapter's files.
    An unreadable file, or neither file, is a one-line ConversionError."""
    st = os.path.join(directory, safetensors_name)
    if os.path.exists(st):
        try:
            return load_safetensors(st)
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ... all mean unreadable
            raise ConversionError(f"{st} is not a readable safetensors file "
                                  f"({type(e).__name__}: {_gist(e)})") from e
    pt = os.path.join(directory, torch_name)
    if os.path.exists(pt):
        torch = _torch_for_weights(pt)
        try:
            sd = torch.load(pt, map_location="cpu", weights_only=True)
            return {k: v.float().numpy() for k, v in sd.items()}
        except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, ...
            raise ConversionError(f"{pt} is not a readable PyTorch weights file "
                                  f"({type(e).__name__}: {_gist(e)})") from e
    raise ConversionError(f"{directory!r} has neither {safetensors_name} nor {torch_name}")


def _gist(e: BaseException, limit: int = 200) -> str:
    """The first sentence of an error (torch's go on with advice that does not apply here)."""
    text = " ".join(str(e).split()).split(". ")[0] or "no message"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _from_openai_tf(path: str, **config_overrides):
    """OpenAI's original GPT-2 release: hparams.json + model.ckpt.* read with TensorFlow."""
    try:
        import tensorflow as tf  # noqa: F401  # optional: only OpenAI's TF checkpoints need it
    except ImportError as e:
        raise ConversionError(
            f"{path!r} is an OpenAI GPT-2 TensorFlow checkpoint; reading it needs TensorFlow "
            "(pip install tensorflow), which is not installed") from e
    with open(os.path.join(path, "hparams.json")) as fh:
        hp = json.load(fh)
    reader = tf.train.load_checkpoint(path)
    g = lambda name: reader.get_tensor(name)  # noqa: E731
    sd = {"wte.weight": g("model/wte"), "wpe.weight": g("model/wpe"),
          "ln_f.weight": g("model/ln_f/g"), "ln_f.bias": g("model/ln_f/b")}
    for i in range(hp["n_layer"]):
        t, p = f"model/h{i}/", f"h.{i}."
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = g(t + "ln_1/g"), g(t + "ln_1/b")
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = g(t + "ln_2/g"), g(t + "ln_2/b")
        # OpenAI's conv1d weights are [1, in, out].
        for ours, theirs in (("attn.c_attn", "attn/c_attn"), ("attn.c_proj", "attn/c_proj"),
                             ("mlp.c_fc", "mlp/c_fc"), ("mlp.c_proj", "mlp/c_proj")):
            sd[p + ours + ".weight"] = np.squeeze(g(t + theirs + "/w"), 0)
            sd[p + ours + ".bias"] = g(t + theirs + "/b")
    hf_cfg = dict(model_type="gpt2", vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"],
                  n_embd=hp["n_embd"], n_layer=hp["n_layer"], n_head=hp["n_head"])
    config = config_from_hf(hf_cfg, **config_overrides)
    return config, params_from_state_dict(config, sd)


def to_hf(config: GPTConfig, params, out_dir) -> str:
    """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads.

    Pre-LN configs are written as GPT-2, post-LN (GPT-1) ones as OpenAI-GPT. Weights go to
    `model.safetensors` (fp32) next to `config.json`; torch is not needed.

    Returns:
      out_dir.
    """
    hf_cfg = config_to_hf(config)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    sd = params_to_state_dict(config, params)
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(hf_cfg, fh, indent=2)
    return out_dir
