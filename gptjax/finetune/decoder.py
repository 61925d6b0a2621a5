"""The decoder a finetuning run starts from: pretrained (all or the first n blocks) or fresh.

`config.init.kind` names the source: 'workdir' (a train.py work directory), 'hf' (a transformers
/ OpenAI directory), both loaded by gptjax.runs.pretrained.load_pretrained, or 'scratch' (random
init with a tokenizer built from the task's training texts). `init.transfer_layers` keeps only
the first n pretrained blocks, the rest freshly initialised (GPT-1 Figure 2, left).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import ml_collections

from gptjax.config import GPTConfig
from gptjax.data.tokenizers import build_tokenizer
from gptjax.nn.model import init_params
from gptjax.nn.param_layout import stack_layers, unstack_layers
from gptjax.train.experiment import model_config_from
from gptjax.runs.pretrained import load_pretrained

INIT_KINDS = ("workdir", "hf", "scratch")


def pretrained_decoder(init: ml_collections.ConfigDict, step: Optional[int] = None):
    """(GPTConfig, params, tokenizer) of the pretrained decoder named by `config.init`.

    Args:
      init: kind 'workdir' (a train.py work directory at `path`, its latest checkpoint or
        `step`) or 'hf' (a transformers / OpenAI GPT-2 directory at `path`; the tokenizer is the
        GPT-2 or OpenAI GPT BPE files in `tokenizer_path` or `path`, or a saved gptjax tokenizer
        directory); `execution` ('' or e.g. 'attention_impl=xla,remat=full') runs the decoder
        with other execution fields than it was pretrained with.
      step: a pretraining checkpoint step (workdir only); None = the latest.

    Returns:
      (GPTConfig, params as single-device arrays, tokenizer).
    """
    if not init.path:
        raise ValueError(f"init.kind={init.kind!r} needs init.path (a train.py work directory "
                         "or a Hugging Face / OpenAI model directory)")
    execution = init.execution or None
    if init.kind == "workdir":
        return load_pretrained(workdir=init.path, step=step, execution=execution)
    if init.kind != "hf":
        raise ValueError(f"init.kind={init.kind!r}: load_pretrained takes 'workdir' or 'hf'")
    return load_pretrained(hf_dir=init.path, tokenizer_path=init.tokenizer_path or None,
                           execution=execution)


def transfer_layers(config: GPTConfig, pretrained: dict, fresh: dict, n_layers: int,
                    embeddings: bool = True) -> dict:
    """Pretrained parameters for the embeddings and the first `n_layers` blocks, fresh elsewhere.

    Args:
      config: the (shared) architecture of both parameter trees.
      pretrained: pretrained decoder parameters.
      fresh: randomly initialised parameters of the same architecture.
      n_layers: blocks to transfer, 0..n_layer (-1 = all).
      embeddings: also transfer the non-block parameters (wte, wpe, ln_f, an untied lm_head).
        GPT-1's Figure 2 always transfers the embeddings; 0 layers means embeddings only.

    Returns:
      The mixed parameters, in the layout of `config` (scan or per-layer).
    """
    L = config.n_layer
    n = L if n_layers < 0 else n_layers
    if not 0 <= n <= L:
        raise ValueError(f"transfer_layers={n_layers}: allowed values are -1 (all) or 0..{L}")
    pre = unstack_layers(config, pretrained) if "h" in pretrained else dict(pretrained)
    new = unstack_layers(config, fresh) if "h" in fresh else dict(fresh)
    out = {}
    for name in new:
        if name.startswith("h_"):
            out[name] = pre[name] if int(name[2:]) < n else new[name]
        else:
            out[name] = pre[name] if embeddings else new[name]
    return stack_layers(config, out) if config.scan_layers else out


def init_decoder(config: ml_collections.ConfigDict, rng: jax.Array, workdir: str = "",
                 texts: Sequence[str] = ()):
    """The decoder to finetune, before the task tokens are added.

    Args:
      config: the finetuning config, complete (`init`, `model`, `tokenizer`, `model_dropout`).
      rng: key for fresh parameters (scratch init, untransferred layers).
      workdir: where a scratch SentencePiece tokenizer is trained.
      texts: the task's training texts (scratch char / SentencePiece tokenizers).

    Returns:
      (GPTConfig with the finetuning dropout, params, tokenizer).
    """
    init = config.init
    if init.kind not in INIT_KINDS:
        raise ValueError(f"init.kind={init.kind!r}: allowed values are {list(INIT_KINDS)}")
    if init.kind == "scratch":
        tc = config.tokenizer
        # unknown='skip': dev/test may hold characters the train split never shows.
        tokenizer = build_tokenizer(tc.kind, texts=texts, vocab_size=tc.vocab_size, path=tc.path,
                                    directory=os.path.join(workdir, "tokenizer"), unknown="skip")
        model_cfg = model_config_from(config, tokenizer.vocab_size)
        params = init_params(model_cfg, rng)
    else:
        model_cfg, params, tokenizer = pretrained_decoder(init)
        n, emb = init.transfer_layers, init.transfer_embeddings
        if n not in (-1, model_cfg.n_layer) or not emb:
            fresh = init_params(model_cfg, rng)
            params = transfer_layers(model_cfg, jax.device_get(params), fresh, n, emb)
    p = config.model_dropout
    if p >= 0:
        model_cfg = model_cfg.replace(embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)
    return model_cfg, params, tokenizer
