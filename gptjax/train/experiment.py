"""An experiment config made into objects: its checks, GPTConfig, text source and tokenizer.

`check_train_config` runs before any data is read or anything compiles. Each problem is a
ConfigError whose one-line message names the value and what is allowed (the entry scripts print
it as `error: ...` and exit 2). Unknown keys and wrong types given as flags
are caught earlier, by `gptjax.cli.define_config_file` and `gptjax.cli.parse_flags`.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Optional

import jax
import ml_collections

from gptjax import sharding as shd
from gptjax.checks import check_choice, check_int
from gptjax.config import ConfigError, GPTConfig, check_scan_config
from gptjax.data import TextSource, get_source
from gptjax.data import mixture as mx
from gptjax.data.lm import MODES as SAMPLING
from gptjax.data.prompt_completion import DATASET as PC_DATASET
from gptjax.data.prompt_completion import LAYOUTS as PC_LAYOUTS
from gptjax.data.prompt_completion import PromptCompletionSource
from gptjax.data.prompt_completion import load_source as load_pc_source
from gptjax.data.tokenizers import KINDS as TOKENIZER_KINDS
from gptjax.data.tokenizers import Tokenizer, build_tokenizer, fingerprint, load_tokenizer
from gptjax.runs.checkpoint import CheckpointError
from gptjax.train.start import check_init_config, init_architecture, init_tokenizer
from gptjax.train.optim import SCHEDULES
from gptjax.train.spikes import MODES as SPIKE_MODES

NONFINITE = ("skip", "halt")


# The checks of gptjax.checks, raising ConfigError.
_int = functools.partial(check_int, error=ConfigError)
_choice = functools.partial(check_choice, error=ConfigError)


def _num(name: str, v: Any, lo: float, hi: float = math.inf, hi_open: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < lo or v > hi or (hi_open and v == hi):
        rng = f"[{lo}, {hi}{')' if hi_open else ']'}" if hi != math.inf else f">= {lo}"
        raise ConfigError(f"{name}={v!r}: must be a finite number {rng}")


def check_train_config(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raises ConfigError for the first impossible value of a train.py config.

    Checks types and ranges of the train/optim/data/tokenizer fields the trainer reads, the
    architecture (width divisible by heads, ...), the sequence length against the position
    table, the mesh against the device count and the batch against the data-parallel size.

    Args:
      config: the experiment config, complete (see gptjax/defaults.py `complete`).
      num_devices: devices the mesh must cover (default: `jax.device_count()`).
    """
    _int("seed", config.seed, 0)
    _check_train(config.train)
    _check_optim(config.optim)
    _check_data(config.data)
    if config.data.mixture or config.data.mixture_schedule:
        check_mixture(config)
    _choice("tokenizer.kind", config.tokenizer.kind, tuple(TOKENIZER_KINDS))

    if config.train.layer_stats_every and config.lora.rank:
        raise ConfigError(f"train.layer_stats_every={config.train.layer_stats_every} with "
                          f"lora.rank={config.lora.rank}: per-layer statistics cover full "
                          "training only; allowed with LoRA: 0")
    check_init_config(config)

    # The architecture (a pretrained model's, from its config file), with a stand-in vocabulary
    # when it comes from the tokenizer.
    model_cfg = init_architecture(config) or model_config_from(config, vocab_size=256)
    seq_len = config.data.seq_len or model_cfg.n_ctx
    if seq_len > model_cfg.n_ctx:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the position table "
                          f"(model.n_ctx={model_cfg.n_ctx}); allowed: 1..{model_cfg.n_ctx}")
    if config.data.get("document_mask", False) and model_cfg.attention_impl == "cudnn":
        raise ConfigError("data.document_mask=True with model.attention_impl='cudnn': cuDNN "
                          "cannot mask documents (no segment ids); allowed: 'xla', 'pallas', "
                          "'splash' or 'auto'")
    _check_batch_on_mesh(config, jax.device_count() if num_devices is None else num_devices)


def _check_train(tc: ml_collections.ConfigDict) -> None:
    _int("train.steps", tc.steps, 1)
    _num("train.epochs", tc.epochs, 0.0)
    _int("train.batch_size", tc.batch_size, 1)
    _int("train.accum_steps", tc.accum_steps, 1)
    if not isinstance(tc.elastic, bool):
        raise ConfigError(f"train.elastic={tc.elastic!r}; allowed: True or False")
    _int("train.log_every", tc.log_every, 1)
    _int("train.eval_every", tc.eval_every, 0)
    _int("train.eval_batches", tc.eval_batches, -1)
    _int("train.eval_batch_size", tc.eval_batch_size, 1)
    _int("train.evals_every", tc.evals_every, 0)
    _int("train.save_every", tc.save_every, 1)
    _int("train.keep_checkpoints", tc.keep_checkpoints, 1)
    if not isinstance(tc.local_dir, str) or "://" in tc.local_dir:
        raise ConfigError(f"train.local_dir={tc.local_dir!r}: must be a directory on this "
                          "host's disk ('' = no local checkpoint tier)")
    _int("train.local_save_every", tc.local_save_every, 1)
    _int("train.local_keep", tc.local_keep, 1)
    _choice("train.nonfinite", tc.nonfinite, NONFINITE)
    _choice("train.spike_guard", tc.spike_guard, SPIKE_MODES)
    _num("train.spike_threshold", tc.spike_threshold, 0.0)
    low = 1.0 if tc.spike_guard == "median" else 0.0  # a multiple of the median, or sigmas
    if tc.spike_guard != "off" and tc.spike_threshold <= low:
        raise ConfigError(f"train.spike_threshold={tc.spike_threshold!r} would skip ordinary "
                          f"steps (train.spike_guard={tc.spike_guard!r}); allowed: > {low:g}")
    _int("train.spike_window", tc.spike_window, 1)
    _int("train.spike_max", tc.spike_max, 0)
    _int("train.layer_stats_every", tc.layer_stats_every, 0)


def _check_optim(oc: ml_collections.ConfigDict) -> None:
    lr = oc.learning_rate
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not 0 < lr < math.inf:
        raise ConfigError(f"optim.learning_rate={lr!r}: must be a finite number > 0")
    _int("optim.warmup_steps", oc.warmup_steps, 0)
    _int("optim.decay_steps", oc.decay_steps, 0)
    _choice("optim.schedule", oc.schedule, SCHEDULES)
    _num("optim.min_lr", oc.min_lr, 0.0)
    _num("optim.b1", oc.b1, 0.0, 1.0, hi_open=True)
    _num("optim.b2", oc.b2, 0.0, 1.0, hi_open=True)
    _num("optim.eps", oc.eps, 0.0)
    _num("optim.weight_decay", oc.weight_decay, 0.0)
    _num("optim.grad_clip", oc.grad_clip, 0.0)


def _check_data(dc: ml_collections.ConfigDict) -> None:
    _int("data.seq_len", dc.seq_len, 0)
    _choice("data.sampling", dc.sampling, SAMPLING)
    if dc.dataset == "local_text" and not dc.path:
        raise ConfigError("data.path='': data.dataset='local_text' needs text files or a glob")
    if dc.dataset == PC_DATASET:
        if not dc.path:
            raise ConfigError("data.path='': data.dataset='prompt_completion' needs JSONL files "
                              "or a glob")
        _choice("data.pc_layout", dc.pc_layout, PC_LAYOUTS)
        if dc.pipeline != "single":
            raise ConfigError(f"data.pipeline={dc.pipeline!r}: data.dataset='prompt_completion' "
                              "reads its rows in every process; allowed: 'single'")
        for key in ("prompt_key", "completion_key"):
            if not isinstance(dc[key], str) or not dc[key]:
                raise ConfigError(f"data.{key}={dc[key]!r}; allowed: a non-empty JSON key")
        if dc.prompt_key == dc.completion_key:
            raise ConfigError(f"data.prompt_key and data.completion_key are both "
                              f"{dc.prompt_key!r}; allowed: two different keys")
    for key in ("document_mask", "position_restart"):
        if not isinstance(dc.get(key, False), bool):
            raise ConfigError(f"data.{key}={dc[key]!r}; allowed: True or False")
    if dc.validation_fraction is not None:
        _num("data.validation_fraction", dc.validation_fraction, 0.0, 1.0, hi_open=True)


def check_mixture(config: ml_collections.ConfigDict) -> None:
    """ConfigError for a `data.mixture` / `data.mixture_schedule` that cannot run."""
    try:
        corpora = mx.parse_mixture(tuple(config.data.mixture))
        mx.make_schedule(corpora, tuple(config.data.mixture_schedule), config.train.steps)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if config.train.epochs > 0:
        raise ConfigError("train.epochs counts passes over one corpus; with data.mixture set "
                          "train.steps instead")
    for c in corpora:
        if c.fields.get("dataset", config.data.dataset) == PC_DATASET:
            raise ConfigError(f"data.mixture corpus {c.name!r}: dataset={PC_DATASET!r} has its "
                              "own batches; allowed: text datasets (tfds, local_text, "
                              "python_stdlib)")


def _check_batch_on_mesh(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """The global batch must split evenly over the data-parallel devices and micro-batches."""
    tc = config.train
    shape = shd.resolve_mesh_shape(mesh_shape(config), num_devices)
    dp = shape["data"] * shape["fsdp"]
    if tc.batch_size % (dp * tc.accum_steps):
        raise ConfigError(f"train.batch_size={tc.batch_size} is not divisible by the "
                          f"data-parallel size {dp} (mesh data x fsdp) x train.accum_steps "
                          f"{tc.accum_steps}; allowed: multiples of {dp * tc.accum_steps}")


def resolve_steps(config: ml_collections.ConfigDict, train_tokens: int, seq_len: int) -> int:
    """Optimizer updates of the run: `train.steps`, or, when `train.epochs` > 0, that many passes
    over a training split of `train_tokens` tokens in batches of `batch_size` x `seq_len` tokens
    (GPT-1's "100 epochs"), rounded up."""
    tc = config.train
    if tc.epochs <= 0:
        return tc.steps
    return max(1, math.ceil(tc.epochs * train_tokens / (tc.batch_size * seq_len)))


# ================================================================================ builders
def mesh_shape(config: ml_collections.ConfigDict) -> dict:
    """{axis: size} of `config.mesh` for every mesh axis (one size may be -1: the rest)."""
    return {a: config.mesh[a] for a in shd.MESH_AXES}


def model_config_from(config: ml_collections.ConfigDict, vocab_size: Optional[int] = None
                      ) -> GPTConfig:
    """The GPTConfig of an experiment: `config.model.preset` plus every other field as override.

    A `vocab_size` <= 0 in the config means "the tokenizer's", rounded up to
    `config.model_vocab_multiple` (padding the table to a multiple of 64/128 makes the output
    matmul faster and lets the vocabulary axis shard evenly).

    Args:
      config: an experiment config (train.py's or finetune.py's).
      vocab_size: the tokenizer's vocabulary size, needed when config.model.vocab_size <= 0.
    """
    fields = {k: v for k, v in config.model.items() if k != "preset"}
    if fields.get("vocab_size", 0) <= 0:  # (a plain dict: a model may leave it to the preset)
        if vocab_size is None:
            raise ValueError("model.vocab_size <= 0 means 'from the tokenizer', but no tokenizer "
                             "vocabulary size was given")
        mult = int(config.model_vocab_multiple)
        fields["vocab_size"] = int(math.ceil(vocab_size / mult) * mult)
    if "attention_pattern" in fields:
        fields["attention_pattern"] = tuple(fields["attention_pattern"])
    mc = GPTConfig.preset(config.model.preset, **fields)
    check_scan_config(mc)
    return mc


def build_source(config: ml_collections.ConfigDict) -> TextSource | PromptCompletionSource:
    """The text dataset named by `config.data` (tfds name, local text files, or the default),
    or the rows of data.dataset='prompt_completion'."""
    dc = config.data
    if dc.dataset == PC_DATASET:  # JSONL rows (gptjax.data.prompt_completion)
        return load_pc_source(dc.path, dc.val_path, dc.validation_fraction, dc.prompt_key,
                              dc.completion_key)
    kwargs = {}
    if dc.dataset == "local_text":
        kwargs["paths"] = dc.path
        kwargs["encoding"] = dc.encoding
        if dc.validation_fraction is not None:
            kwargs["validation_fraction"] = dc.validation_fraction
    elif dc.dataset == "python_stdlib":
        if dc.max_train_bytes:
            kwargs["max_train_bytes"] = dc.max_train_bytes
    return get_source(dc.dataset, dc.data_dir or None, text_key=dc.text_key, **kwargs)


def run_tokenizer(config: ml_collections.ConfigDict, workdir: str, source: TextSource
                  ) -> Tokenizer:
    """The run's tokenizer: loaded from `workdir/tokenizer` if the run has one, else built (or,
    with init.kind 'hf'/'workdir', the pretrained model's: gptjax.train.start.init_tokenizer).

    A built one is saved there. A character tokenizer learns the character set of every split
    (as nanoGPT's prepare.py does), so no validation character is unknown; a SentencePiece one
    is trained on the train split.

    Args:
      config: the experiment config (its `tokenizer` fields).
      workdir: the run directory.
      source: the run's text dataset.
    """
    tok_dir = os.path.join(workdir, "tokenizer")
    if config.init.kind != "scratch":  # the pretrained model's, saved with the run
        tok = init_tokenizer(config)
        if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
            saved = load_tokenizer(tok_dir)
            if fingerprint(saved) != fingerprint(tok):
                raise CheckpointError(f"{workdir} holds another tokenizer than init.path="
                                      f"{config.init.path!r}'s; use another --workdir")
            return saved
        tok.save(tok_dir)
        return tok
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        return load_tokenizer(tok_dir)
    tc = config.tokenizer
    builds_from = TOKENIZER_KINDS[tc.kind].builds_from
    splits = {None: (), "train": ("train",), "all": source.splits}[builds_from]
    n = tc.get("train_docs", 0)
    if n < 0:
        raise ValueError(f"tokenizer.train_docs={n}; allowed: 0 (every document) or more")
    texts = [t for s in splits for t in (source.sample_texts(s, n) if n else source.texts(s))]
    os.makedirs(tok_dir, exist_ok=True)
    tok = build_tokenizer(tc.kind, texts=texts, directory=tok_dir, vocab_size=tc.vocab_size,
                          path=tc.path, user_defined_symbols=tuple(tc.user_defined_symbols))
    tok.save(tok_dir)
    return tok
