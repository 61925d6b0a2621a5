"""Checks of an experiment config before any data is read or anything compiles.

Each problem is a ConfigError whose one-line message names the value and what is allowed (the
entry scripts print it as `error: ...` and exit 2). Unknown keys and wrong types given as flags
are caught earlier, by `gptjax.cli.define_config_file` and `gptjax.cli.parse_flags`.
"""

from __future__ import annotations

import math
from typing import Any

import ml_collections

from gptjax.config import ConfigError
from gptjax.data.lm import MODES as SAMPLING
from gptjax.train.optim import SCHEDULES

TOKENIZER_KINDS = ("char", "sentencepiece", "gpt2_bpe")
NONFINITE = ("skip", "halt")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int(name: str, v: Any, lo: int) -> None:
    if not _is_int(v) or v < lo:
        what = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        raise ConfigError(f"{name}={v!r}: must be {what}")


def _num(name: str, v: Any, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < lo or v > hi or (hi_open and v == hi):
        rng = f"[{lo}, {hi}{')' if hi_open else ']'}" if hi != math.inf else f">= {lo}"
        raise ConfigError(f"{name}={v!r}: must be a finite number {rng}")


def _choice(name: str, v: Any, allowed) -> None:
    if v not in allowed:
        raise ConfigError(f"{name}={v!r}: allowed values are {list(allowed)}")


def check_train_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first impossible value of a train.py config.

    Checks types and ranges of the train/optim/data/tokenizer fields the trainer reads, the
    architecture (width divisible by heads, ...), the sequence length against the position
    table, the mesh against the device count and the batch against the data-parallel size.

    Args:
      config: the experiment config (see gptjax/defaults.py).
      num_devices: devices the mesh must cover (default: `jax.device_count()`).
    """
    from gptjax import sharding as shd
    from gptjax.train.loop import model_config_from

    _int("seed", config.get("seed", 0), 0)
    tc = config.train
    _int("train.steps", tc.steps, 1)
    _int("train.batch_size", tc.batch_size, 1)
    accum = tc.get("accum_steps", 1)
    _int("train.accum_steps", accum, 1)
    _int("train.log_every", tc.get("log_every", 1), 1)
    _int("train.eval_every", tc.get("eval_every", 0), 0)
    _int("train.eval_batches", tc.get("eval_batches", -1), -1)
    _int("train.eval_batch_size", tc.get("eval_batch_size", 1), 1)
    _int("train.save_every", tc.get("save_every", 1), 1)
    _int("train.keep_checkpoints", tc.get("keep_checkpoints", 1), 1)
    _choice("train.nonfinite", tc.get("nonfinite", "skip"), NONFINITE)

    oc = config.optim
    lr = oc.learning_rate
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < math.inf:
        raise ConfigError(f"optim.learning_rate={lr!r}: must be a finite number > 0")
    _int("optim.warmup_steps", oc.warmup_steps, 0)
    _int("optim.decay_steps", oc.get("decay_steps", 0), 0)
    _choice("optim.schedule", oc.get("schedule", "cosine"), SCHEDULES)
    _num("optim.min_lr", oc.get("min_lr", 0.0), 0.0)
    _num("optim.b1", oc.b1, 0.0, 1.0, hi_open=True)
    _num("optim.b2", oc.b2, 0.0, 1.0, hi_open=True)
    _num("optim.eps", oc.eps, 0.0)
    _num("optim.weight_decay", oc.weight_decay, 0.0)
    _num("optim.grad_clip", oc.grad_clip, 0.0)

    dc = config.data
    _int("data.seq_len", dc.get("seq_len", 0), 0)
    _choice("data.sampling", dc.get("sampling", "packed"), SAMPLING)
    if dc.get("dataset") == "local_text" and not dc.get("path"):
        raise ConfigError("data.path='': data.dataset='local_text' needs text files or a glob")
    vf = dc.get("validation_fraction")
    if vf is not None:
        _num("data.validation_fraction", vf, 0.0, 1.0, hi_open=True)
    _choice("tokenizer.kind", config.tokenizer.kind, TOKENIZER_KINDS)

    # The architecture, with a stand-in vocabulary when it comes from the tokenizer.
    model_cfg = model_config_from(config, vocab_size=256)
    seq_len = dc.get("seq_len", 0) or model_cfg.n_ctx
    if seq_len > model_cfg.n_ctx:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the position table "
                          f"(model.n_ctx={model_cfg.n_ctx}); allowed: 1..{model_cfg.n_ctx}")

    mesh_cfg = config.get("mesh", ml_collections.ConfigDict())
    if num_devices is None:
        import jax
        num_devices = jax.device_count()
    shape = shd.resolve_mesh_shape(
        {a: mesh_cfg.get(a, 1 if a != "data" else -1) for a in shd.MESH_AXES}, num_devices)
    dp = shape["data"] * shape["fsdp"]
    if tc.batch_size % (dp * accum):
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the "
                          f"data-parallel size {dp} (mesh data x fsdp) x train.accum_steps "
                          f"{accum}; allowed: multiples of {dp * accum}")
