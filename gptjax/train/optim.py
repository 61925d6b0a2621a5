"""The optimizer from config: AdamW with a decay mask, warmup + cosine/linear decay, clipping.

Weight decay applies to matmul weights and (by default) the token/position embeddings, never to
biases or LayerNorm gains. The mask is by parameter name rather than by ndim, because under
`scan_layers` a bias is stacked into a 2-D array. Decaying the embeddings follows GPT-1 ("w = 0.01
on all non bias or gain weights") and nanoGPT (every tensor with ndim >= 2); set
`decay_embeddings=False` to exempt them as some recipes do.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from gptjax.checks import check_choice

SCHEDULES = ("cosine", "linear", "constant")


def lr_schedule(*, learning_rate: float, warmup_steps: int, decay_steps: int,
                schedule: str = "cosine", min_lr: float = 0.0) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then decay to `min_lr` at `decay_steps`.

    Args:
      learning_rate: peak learning rate, reached at the end of warmup.
      warmup_steps: optimizer updates of linear warmup.
      decay_steps: the update at which the decay reaches `min_lr` (nanoGPT's lr_decay_iters);
        after it the rate stays at `min_lr`.
      schedule: 'cosine' (GPT-1/2/3 pretraining), 'linear' (GPT-1 finetuning) or 'constant'.
      min_lr: the floor.
    """
    check_choice("schedule", schedule, SCHEDULES)
    if warmup_steps < 0 or decay_steps < warmup_steps:
        raise ValueError(f"warmup_steps={warmup_steps}, decay_steps={decay_steps}: need "
                         "0 <= warmup_steps <= decay_steps")
    warmup = optax.linear_schedule(0.0, learning_rate, max(warmup_steps, 1))
    n = max(decay_steps - warmup_steps, 1)
    if schedule == "cosine":
        decay = optax.cosine_decay_schedule(learning_rate, n, alpha=min_lr / learning_rate
                                            if learning_rate else 0.0)
    elif schedule == "linear":
        decay = optax.linear_schedule(learning_rate, min_lr, n)
    else:
        decay = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return decay
    return optax.join_schedules([warmup, decay], [warmup_steps])


def decay_mask(params: Any, decay_embeddings: bool = True) -> Any:
    """True where weight decay applies: kernels and lm_head, embeddings if asked; not biases/LN."""

    def decide(path, _):
        names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
        leaf = names[-1]
        if leaf == "bias" or any(str(n).startswith("ln_") for n in names):
            return False
        if leaf == "embedding":
            return decay_embeddings
        return True

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(opt_cfg, total_steps: int) -> tuple[optax.GradientTransformation,
                                                        optax.Schedule]:
    """AdamW + global-norm clipping from an optimizer ConfigDict.

    Expected fields: learning_rate, warmup_steps, decay_steps (<= 0 means total_steps), schedule,
    min_lr, b1, b2, eps, weight_decay, grad_clip (<= 0 disables), decay_embeddings.

    Returns:
      (optimizer, schedule); the schedule is returned so the trainer can log the learning rate.
    """
    decay_steps = opt_cfg.decay_steps if opt_cfg.decay_steps > 0 else total_steps
    sched = lr_schedule(learning_rate=opt_cfg.learning_rate, warmup_steps=opt_cfg.warmup_steps,
                        decay_steps=decay_steps, schedule=opt_cfg.schedule,
                        min_lr=opt_cfg.min_lr)
    parts = []
    if opt_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
    decay_emb = opt_cfg.decay_embeddings
    parts.append(optax.adamw(sched, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                             weight_decay=opt_cfg.weight_decay,
                             mask=lambda p: decay_mask(p, decay_emb)))
    return optax.chain(*parts), sched
