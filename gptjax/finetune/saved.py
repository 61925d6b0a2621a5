"""A finetuning run loaded back from its work directory: `load_finetuned(workdir)`.

A full finetuning run's checkpoint holds {'decoder', 'head'}; a LoRA run's (finetune.json
says 'lora') holds the frozen decoder as stored (fp32, bf16 or int8) beside its adapters,
task-token deltas and head (gptjax.finetune.lora). Either way the loaded `params` feed
gptjax.finetune.loop.predict and give the predictions the run made at its best epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax

from gptjax.config import GPTConfig
from gptjax.data.tasks import TaskSpec, get_task
from gptjax.data.tokenizers import load_tokenizer
from gptjax.finetune import heads
from gptjax.finetune import lora as ft_lora
from gptjax.nn.model import abstract_params
from gptjax.runs.checkpoint import Checkpointer, CheckpointError


@dataclasses.dataclass
class Finetuned:
    """A finetuned model loaded back from its work directory."""

    model_config: GPTConfig
    head_config: heads.HeadConfig
    params: dict
    tokenizer: Any
    special: heads.SpecialTokens
    spec: TaskSpec
    max_len: int
    meta: dict


def abstract_run_params(model_cfg: GPTConfig, head_cfg: heads.HeadConfig,
                        lora: dict | None) -> dict:
    """The shapes of a run's checkpointed parameters: {'decoder', 'head'}, or a LoRA run's
    {'decoder' (as stored), 'lora', 'tokens', 'head'} (`lora`: finetune.json's record)."""
    if lora:
        cfg, weights = ft_lora.from_dict(lora)
        base, trainable = ft_lora.abstract_parts(model_cfg, head_cfg, cfg, weights)
        return dict(trainable, decoder=base)
    return {"decoder": abstract_params(model_cfg),
            "head": jax.eval_shape(lambda: heads.init_head(jax.random.key(0), head_cfg,
                                                           model_cfg.n_embd))}


def load_finetuned(workdir: str) -> Finetuned:
    """The best checkpoint of a `finetune` work directory, with what it needs to predict.

    Args:
      workdir: a directory `finetune` wrote.

    Returns:
      The Finetuned model (a LoRA run's params as it trained them: frozen base and adapters;
      gptjax.finetune.lora.merged_params gives plain decoder parameters).

    Raises:
      CheckpointError: `workdir` is not a finetuning run.
    """
    workdir = os.path.abspath(workdir)
    info_path = os.path.join(workdir, "finetune.json")
    if not os.path.isfile(info_path):
        raise CheckpointError(f"{workdir} is not a finetuning work directory (no finetune.json)")
    with open(info_path) as fh:
        info = json.load(fh)
    with open(os.path.join(workdir, "model_config.json")) as fh:
        model_cfg = GPTConfig.from_dict(json.load(fh))
    head_cfg = heads.HeadConfig(**info["head"])
    abstract = {"params": abstract_run_params(model_cfg, head_cfg, info.get("lora"))}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
    try:
        state, meta = ckpt.restore(abstract)
    finally:
        ckpt.close()
    return Finetuned(model_cfg, head_cfg, state["params"],
                     load_tokenizer(os.path.join(workdir, "tokenizer")),
                     heads.SpecialTokens(**info["special_tokens"]), get_task(info["task"]),
                     info["max_len"], meta)
