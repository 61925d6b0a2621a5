"""LoRA for GPT-1's task heads: a frozen decoder, trained adapters, task-token rows and head.

With `config.lora.rank > 0` a finetuning run splits its parameters in two:
  - the frozen base: the pretrained decoder with GPT-1's three task-token rows appended (drawn
    as full finetuning draws them), stored as `lora.base_weights` says (fp32, or weight-only
    bf16/int8 through gptjax.nn.quant.quantize_params, QLoRA-style). It is an argument of the
    train step that is never differentiated, updated or donated: bitwise the same after training;
  - the trainable leaves: {'lora': the adapters (gptjax.nn.lora), 'tokens': the deltas of the
    three task-token rows (gptjax.finetune.heads.task_token_embeds: new random rows cannot stay
    frozen, and only these 3 x C numbers of the table move), 'head': the task head}. The
    optimizer state holds these only.
L3 = L2 + lambda * L1 is unchanged (gptjax.finetune.heads.finetune_loss reads both parts).

A LoRA run's checkpoint holds both parts, the base as stored (int8 stays int8), so
`load_finetuned` gives back the very model the run evaluated; `merged_params` folds adapters and
token deltas into plain fp32 decoder parameters (export, a model without adapters).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections

from gptjax.config import GPTConfig
from gptjax.finetune import heads
from gptjax.nn import lora as nn_lora
from gptjax.nn import quant
from gptjax.nn.model import abstract_params

FIELDS = ("rank", "alpha", "dropout", "targets", "base_weights")


def lora_config(block: ml_collections.ConfigDict) -> Optional[nn_lora.LoraConfig]:
    """The run's LoraConfig from its `lora` block, or None for rank 0 (full finetuning).

    Raises:
      ValueError: one line naming the first impossible field and what is allowed.
    """
    rank = block.rank
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
        raise ValueError(f"lora.rank={rank!r}: must be an integer >= 0 (0 = full finetuning)")
    base_weights(block)
    if rank == 0:
        return None
    targets = block.targets
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    cfg = nn_lora.LoraConfig(rank=rank, alpha=block.alpha, dropout=block.dropout,
                             targets=tuple(targets))
    cfg.modules()  # checks every field
    return cfg


def base_weights(block: ml_collections.ConfigDict) -> str:
    """`lora.base_weights`, checked: fp32, bf16 or int8."""
    w = block.base_weights
    if w not in quant.WEIGHT_FORMATS:
        raise ValueError(f"lora.base_weights={w!r}: must be one of "
                         f"{', '.join(quant.WEIGHT_FORMATS)}")
    return w


def to_dict(cfg: nn_lora.LoraConfig, weights: str) -> dict:
    """What finetune.json records of a LoRA run (load_finetuned rebuilds the trees from it)."""
    return {"rank": cfg.rank, "alpha": float(cfg.alpha), "dropout": float(cfg.dropout),
            "targets": list(cfg.modules()), "base_weights": weights}


def from_dict(d: dict) -> tuple[nn_lora.LoraConfig, str]:
    """(LoraConfig, base weights) from `to_dict`'s output."""
    return (nn_lora.LoraConfig(rank=d["rank"], alpha=d["alpha"], dropout=d["dropout"],
                               targets=tuple(d["targets"])), d["base_weights"])


def frozen_base(model_cfg: GPTConfig, decoder: Any, weights: str) -> Any:
    """The decoder (task-token rows included) as the run stores it: fp32, bf16 or int8."""
    return decoder if weights == "fp32" else quant.quantize_params(model_cfg, decoder, weights)


def init_trainable(model_cfg: GPTConfig, cfg: nn_lora.LoraConfig, head: dict,
                   rng: jax.Array) -> dict:
    """The trainable leaves: new adapters (B = 0), zero task-token deltas, and `head`."""
    return {heads.LORA: nn_lora.init_lora(model_cfg, cfg, rng),
            heads.TOKENS: heads.init_task_tokens(model_cfg), "head": head}


def abstract_parts(model_cfg: GPTConfig, head_cfg: heads.HeadConfig, cfg: nn_lora.LoraConfig,
                   weights: str) -> tuple[Any, dict]:
    """(frozen base, trainable leaves) as jax.ShapeDtypeStruct trees, allocating nothing."""
    def build():
        base = frozen_base(model_cfg, jax.tree.map(jnp.zeros_like, abstract_params(model_cfg)),
                           weights)
        head = heads.init_head(jax.random.key(0), head_cfg, model_cfg.n_embd)
        return base, init_trainable(model_cfg, cfg, head, jax.random.key(0))
    return jax.eval_shape(build)


def merged_params(model_cfg: GPTConfig, params: dict) -> dict:
    """A LoRA run's {'decoder', 'lora', 'tokens', 'head'} as plain {'decoder', 'head'}: fp32
    decoder parameters W + (alpha / r) A B, the task-token rows moved by their deltas; the same
    model without adapters (gptjax.finetune.heads.forward of either gives the same outputs)."""
    if heads.LORA not in params:
        return params
    dec = nn_lora.merge(model_cfg, params["decoder"], params[heads.LORA])
    deltas, v0 = params[heads.TOKENS], model_cfg.vocab_size - 3
    dec["wte"] = {"embedding": dec["wte"]["embedding"].astype(jnp.float32).at[v0:].add(
        deltas["wte"])}
    if not model_cfg.tie_embeddings:
        dec["lm_head"] = dec["lm_head"].astype(jnp.float32).at[:, v0:].add(deltas["lm_head"])
    return {"decoder": dec, "head": params["head"]}


def count(tree: Any) -> int:
    """Numbers in a parameter tree (a WeightOnly kernel counts its values, not its scales)."""
    leaves = jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, quant.WeightOnly))
    return sum(int(x.values.size) if isinstance(x, quant.WeightOnly) else int(x.size)
               for x in leaves)


def describe(cfg: nn_lora.LoraConfig, weights: str, base: Any, trainable: dict) -> str:
    """One line: what a LoRA run trains and what it keeps frozen."""
    return (f"LoRA rank {cfg.rank} (alpha {cfg.alpha:g}, dropout {cfg.dropout:g}) on "
            f"{', '.join(cfg.modules())}: {count(trainable):,} trainable (adapters "
            f"{count(trainable[heads.LORA]):,}, task-token rows {count(trainable[heads.TOKENS]):,},"
            f" head {count(trainable['head']):,}); frozen {weights} decoder {count(base):,}")
