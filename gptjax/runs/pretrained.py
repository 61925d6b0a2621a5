"""Reading a run back: the checkpoint metadata check and the one loader of a pretrained decoder.

`load_pretrained` reads a decoder from a train.py work directory (its latest checkpoint, after
checking that the checkpoint's metadata matches the run's `model_config.json` and tokenizer) or
from a transformers / OpenAI model directory, for sampling, serving, evaluation and finetuning.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import jax

from gptjax.config import GPTConfig
from gptjax.data.tokenizers import from_hf_files, load_tokenizer, tokenizer_info
from gptjax.nn.convert import from_hf
from gptjax.nn.model import abstract_params
from gptjax.runs.checkpoint import Checkpointer, CheckpointError


def check_checkpoint_meta(step: int, meta: dict, *, model_cfg: GPTConfig, tokenizer: dict
                          ) -> None:
    """Raises CheckpointError when checkpoint `step` belongs to another run than this one.

    Args:
      step: the checkpoint's step.
      meta: its metadata (the `model_config`, `data` and `tokenizer` the trainer saves).
      model_cfg: this run's architecture.
      tokenizer: this run's tokenizer as {kind, vocab_size, fingerprint}.
    """
    saved, here = meta.get("model_config") or {}, model_cfg.to_dict()
    if saved != here:
        diff = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
        what = "; ".join(f"{k} {saved.get(k)!r} there, {here.get(k)!r} here" for k in diff[:3])
        raise CheckpointError(f"checkpoint step {step} is of another architecture than this "
                              f"config ({what}); use another --workdir")
    saved_tok = meta.get("tokenizer") or {}
    for k in ("kind", "vocab_size", "fingerprint"):  # older checkpoints lack the fingerprint
        if k in saved_tok and saved_tok[k] != tokenizer.get(k):
            raise CheckpointError(
                f"checkpoint step {step} was trained with another tokenizer (its {k} is "
                f"{saved_tok[k]!r}, this run's is {tokenizer.get(k)!r}); put the run's own "
                "tokenizer/ directory back or use another --workdir")


def load_pretrained(*, workdir: Optional[str] = None, hf_dir: Optional[str] = None,
                    tokenizer_path: Optional[str] = None, step: Optional[int] = None):
    """(GPTConfig, params, tokenizer) of a pretrained decoder: a gptjax run or an HF directory.

    The parameters come back as uncommitted single-device jax arrays, so the jitted functions
    of inference and finetuning compile once whether they are fed these arrays or their own
    outputs (arrays placed on the trainer's mesh would make each compile twice).

    Args:
      workdir: a train.py work directory (its latest checkpoint, or `step`, and its tokenizer).
      hf_dir: a local transformers GPT-2 / OpenAI-GPT directory (or OpenAI's TF checkpoint).
      tokenizer_path: with hf_dir, where its tokenizer is (default: hf_dir): a gptjax tokenizer
        directory (tokenizer.json, no vocab.json), or GPT-2's / OpenAI GPT's BPE files.
      step: a checkpoint step of `workdir`; None = the latest.

    Returns:
      (GPTConfig, params, tokenizer).

    Raises:
      ValueError: unless exactly one of workdir / hf_dir is given, or when the tokenizer has
        more ids than the model has embeddings.
      CheckpointError: when `workdir` is not a gptjax run, or its checkpoint does not match
        its model_config.json or tokenizer.
    """
    if (workdir is None) == (hf_dir is None):
        raise ValueError("give exactly one of --workdir (a gptjax run) or --hf_dir "
                         "(a transformers model directory)")
    if workdir is not None:
        return _load_workdir(workdir, step)
    return _load_hf(hf_dir, tokenizer_path or hf_dir)


def _load_workdir(workdir: str, step: Optional[int]):
    """A run's checkpoint: only the parameters are read (an Orbax partial restore: no optimizer
    state, no mesh), after checking that model_config.json and tokenizer/ are its own."""
    if not os.path.isdir(workdir):
        raise CheckpointError(f"work directory {workdir!r} does not exist")
    workdir = os.path.abspath(workdir)
    if not os.path.exists(os.path.join(workdir, "config.json")):
        raise CheckpointError(f"{workdir} is not a gptjax work directory (no config.json)")
    with open(os.path.join(workdir, "model_config.json")) as fh:
        model_cfg = GPTConfig.from_dict(json.load(fh))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    try:
        meta = ckpt.restore_meta(step)
        step = ckpt.latest_step() if step is None else step
        check_checkpoint_meta(step, meta, model_cfg=model_cfg,
                              tokenizer=tokenizer_info(tokenizer))
        params = ckpt.restore_params(abstract_params(model_cfg), step)
    finally:
        ckpt.close()
    return model_cfg, jax.device_put(params), tokenizer


def _load_hf(hf_dir: str, tok_path: str):
    """An imported transformers / OpenAI model and its tokenizer."""
    model_cfg, params = from_hf(hf_dir)
    if os.path.isfile(os.path.join(tok_path, "tokenizer.json")) and not os.path.isfile(
            os.path.join(tok_path, "vocab.json")):
        tokenizer = load_tokenizer(tok_path)  # a gptjax tokenizer saved with .save()
    else:
        tokenizer = from_hf_files(tok_path)  # GPT-2's byte BPE or GPT-1's BPE
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer in {tok_path!r} has {tokenizer.vocab_size} ids but the model "
                         f"in {hf_dir!r} only {model_cfg.vocab_size} embeddings")
    return model_cfg, jax.device_put(params), tokenizer
