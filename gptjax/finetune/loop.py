"""Finetuning (GPT-1 section 3.2): a pretrained decoder plus a linear head trained on a task.

`finetune(config, workdir)` trains with L3 = L2 + lambda * L1 (see gptjax.finetune.heads),
evaluates the dev split(s) after every epoch, keeps the best checkpoint and writes the test
predictions in the GLUE submission format. Its steps: `prepare` (data, decoder, run files) ->
`Trainer.fit` (epochs, dev metrics, best checkpoint) -> test predictions -> summary. The decoder
comes from gptjax.finetune.decoder (`config.init`). With `lora.rank > 0` the decoder is frozen
and only LoRA adapters, the task-token rows and the head train (gptjax.finetune.lora).

A work directory holds: config.json, model_config.json, finetune.json (task, head, special
tokens, a LoRA run's settings), tokenizer/, metrics.jsonl (train records every `log_every`
steps, dev metrics every epoch), checkpoints/ (the best epoch only; a LoRA run's holds its
frozen base too), predictions/ (e.g. SST-2.tsv), summary.json, loss.png.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from gptjax import defaults
from gptjax.checks import check_int
from gptjax.config import GPTConfig
from gptjax.data.tasks import TaskData, TaskSpec, get_task, load_task, write_predictions
from gptjax.finetune import heads
from gptjax.finetune import lora as ft_lora
from gptjax.finetune.batches import EncodedSplit, encode_examples, epoch_batches, make_batch
from gptjax.finetune.decoder import init_decoder
from gptjax.finetune.metrics import compute_metrics
from gptjax.finetune.saved import Finetuned, load_finetuned  # noqa: F401  (this module's API)
from gptjax.plotting import plot_metrics
from gptjax.runs.checkpoint import Checkpointer
from gptjax.train.optim import make_optimizer
from gptjax.train.step import TrainState
from gptjax.runs.workdir import METRICS, SUMMARY, MetricsWriter, write_run_config, write_summary


# ================================================================================ steps
def make_train_step(model_cfg: GPTConfig, head_cfg: heads.HeadConfig,
                    optimizer: optax.GradientTransformation, schedule, frozen: bool = False):
    """A pure step `(state, batch, rng) -> (state, metrics)`; dropout key fold_in(rng, step).

    Args:
      model_cfg: the decoder's architecture (task tokens included).
      head_cfg: the task head.
      optimizer: the optax transformation.
      schedule: step -> learning rate (logged as 'lr').
      frozen: a LoRA step `(state, base, batch, rng)`: state.params holds the trainable leaves
        (gptjax.finetune.lora), `base` the frozen decoder, neither differentiated nor returned.

    Returns:
      The step function (not jitted).
    """

    def loss_fn(params, base, batch, rng):
        params = params if base is None else dict(params, decoder=base)
        return heads.finetune_loss(model_cfg, params, batch, head_cfg, deterministic=False,
                                   rng=rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def lora_step(state: TrainState, base, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        (loss, aux), grads = grad_fn(state.params, base, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "task_loss": aux["task_loss"], "lm_loss": aux["lm_loss"],
                   "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        return lora_step(state, None, batch, rng)

    return lora_step if frozen else train_step


@functools.lru_cache(maxsize=8)
def _jitted_train_step(model_cfg: GPTConfig, head_cfg: heads.HeadConfig, optim_json: str,
                       total_steps: int, frozen: bool = False):
    """(optimizer, schedule, jitted step), cached by value: the runs of an analysis (and tests)
    that share architecture, head and schedule compile their step once. A LoRA step's frozen
    base is not donated."""
    oc = ml_collections.ConfigDict(json.loads(optim_json))
    optimizer, schedule = make_optimizer(oc, total_steps)
    step = jax.jit(make_train_step(model_cfg, head_cfg, optimizer, schedule, frozen),
                   donate_argnums=(0,))
    return optimizer, schedule, step


@functools.partial(jax.jit, static_argnums=(0, 1))
def _outputs(model_cfg: GPTConfig, head_cfg: heads.HeadConfig, params, tokens, lengths):
    # Only the head outputs are returned, so XLA drops the unused LM-logit matmul.
    return heads.forward(model_cfg, params, tokens, lengths, head_cfg, deterministic=True)[0]


def predict(model_cfg: GPTConfig, head_cfg: heads.HeadConfig, params, enc: EncodedSplit,
            batch_size: int = 64, bucket: int = 16,
            max_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Head outputs and predictions (class, candidate or regression value) for a whole split.

    Args:
      model_cfg, head_cfg, params: the finetuned model.
      enc: the split.
      batch_size, bucket, max_len: batching (see gptjax.finetune.batches.make_batch).

    Returns:
      (outputs [N, ...], predictions [N]).
    """
    outs = []
    for start in range(0, len(enc), batch_size):
        rows = np.arange(start, min(start + batch_size, len(enc)))
        b = make_batch(enc, rows, batch_size, bucket, max_len)
        out = np.asarray(_outputs(model_cfg, head_cfg, params, b["tokens"], b["lengths"]))
        outs.append(out[: len(rows)])
    outputs = np.concatenate(outs)
    preds = outputs if head_cfg.regression else outputs.argmax(-1)
    return outputs, preds


def split_metrics(spec: TaskSpec, enc: EncodedSplit, preds: np.ndarray) -> dict:
    """The task's metrics on a labelled split.

    Args:
      spec: the task.
      enc: the split.
      preds: a prediction per example.

    Returns:
      {metric name: value}.
    """
    if any(ex.label is None for ex in enc.examples):
        raise ValueError(f"{spec.name}: cannot score a split with unlabelled examples")
    return compute_metrics(spec.metrics, preds, enc.labels)


# ================================================================================ config
def schedule_optim_config(config: ml_collections.ConfigDict,
                          total_steps: int) -> ml_collections.ConfigDict:
    """The finetuning config's optimizer block with its schedule set for `total_steps`."""
    oc = copy.deepcopy(config.optim)
    with oc.unlocked():
        if oc.warmup_fraction >= 0:
            # GPT-1: "linear learning rate decay schedule with warmup over 0.2% of training".
            oc.warmup_steps = int(math.ceil(oc.warmup_fraction * total_steps))
        oc.decay_steps = total_steps
    return oc


def head_config_for(config: ml_collections.ConfigDict, spec: TaskSpec) -> heads.HeadConfig:
    """The task head of `spec` with the config's LM coefficient and dropout."""
    return heads.HeadConfig(task_type=spec.task_type, num_labels=spec.num_labels,
                            lm_coef=float(config.head.lm_coef), dropout=float(config.head.dropout))


def _finite(x: float) -> float:
    """NaN (e.g. Pearson of constant predictions) ranks below every number."""
    return x if math.isfinite(x) else -math.inf


def subset(examples: list, n: int, seed: int) -> list:
    """A fixed random subset of `n` examples, in their order (n <= 0 or too large: all).

    Args:
      examples: a split's examples.
      n: how many to keep.
      seed: the experiment seed (the subset depends on it alone).

    Returns:
      The kept examples.
    """
    if n <= 0 or n >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(examples))[:n])
    return [examples[i] for i in keep]


def load_task_from_config(config: ml_collections.ConfigDict, splits: Sequence[str]) -> TaskData:
    """The config's task: `task.name` from the tfds `task.data_dir` when set, else from the
    files at `task.path`; `task.subset` for RACE / MCTest.

    Args:
      config: a complete finetuning config (gptjax.defaults.finetune_config).
      splits: the splits to read.

    Returns:
      The task's data.
    """
    tc = config.task
    return load_task(tc.name, "" if tc.data_dir else tc.path, data_dir=tc.data_dir,
                     splits=splits, subset=tc.subset)


# ================================================================================ the run
@dataclasses.dataclass
class FinetuneRun:
    """What one finetuning run works on, built once by `prepare`."""

    config: ml_collections.ConfigDict
    workdir: str
    spec: TaskSpec
    data: TaskData
    model_cfg: GPTConfig
    head_cfg: heads.HeadConfig
    special: heads.SpecialTokens
    tokenizer: Any
    max_len: int
    train: EncodedSplit
    dev: dict                 # dev split name -> EncodedSplit
    rng: jax.Array            # the train steps' dropout key
    lora: Optional[dict] = None  # a LoRA run's settings (gptjax.finetune.lora.to_dict)

    @property
    def main_key(self) -> str:
        """The record key of the metric that picks the best epoch, e.g. 'dev_accuracy'."""
        return f"{self.spec.dev_splits[0]}_{self.spec.main_metric}"


def _load_splits(config: ml_collections.ConfigDict, spec: TaskSpec):
    """(data, train examples, {dev split: examples}), subsets as the config says."""
    wanted = [spec.train_split, *spec.dev_splits]
    if config.train.predict_test:
        wanted += list(spec.test_splits)
    data = load_task_from_config(config, wanted)
    print(data.report(), flush=True)
    train_ex = subset(data.splits[spec.train_split], config.task.train_examples, config.seed)
    dev_ex = {s: subset(data.splits[s], config.task.eval_examples, config.seed)
              for s in spec.dev_splits}
    return data, train_ex, dev_ex


def prepare(config: ml_collections.ConfigDict, workdir: str) -> tuple[FinetuneRun, dict]:
    """Everything before the first step: data, decoder and head, encoded splits, run files.

    Args:
      config: a complete finetuning config.
      workdir: a new run directory.

    Returns:
      (the run, its initial parameters {'decoder', 'head'}).
    """
    workdir = os.path.abspath(workdir)
    if os.path.exists(os.path.join(workdir, SUMMARY)) or os.path.isdir(
            os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir} already holds a finetuning run; use another --workdir")
    os.makedirs(workdir, exist_ok=True)
    spec = get_task(config.task.name)
    tc = config.train
    check_int("train.epochs", tc.epochs)
    check_int("train.batch_size", tc.batch_size)
    lora_cfg = ft_lora.lora_config(config.lora)
    data, train_ex, dev_ex = _load_splits(config, spec)

    k_dec, k_tok, k_head, k_train = jax.random.split(jax.random.key(config.seed), 4)
    texts = [t for ex in train_ex for t in (ex.text_a, ex.text_b, *ex.choices) if t]
    model_cfg, dec_params, tokenizer = init_decoder(config, k_dec, workdir, texts)
    model_cfg, dec_params, special = heads.add_special_tokens(model_cfg, dec_params, k_tok)
    head_cfg = head_config_for(config, spec)
    head = heads.init_head(k_head, head_cfg, model_cfg.n_embd)
    params = {"decoder": dec_params, "head": head}
    if lora_cfg is not None:  # the adapters' key: one the full run does not use
        weights = ft_lora.base_weights(config.lora)
        params = dict(ft_lora.init_trainable(model_cfg, lora_cfg, head,
                                             jax.random.fold_in(k_head, 1)),
                      decoder=ft_lora.frozen_base(model_cfg, dec_params, weights))
    max_len = min(config.task.max_len or model_cfg.n_ctx, model_cfg.n_ctx)

    try:  # e.g. a character-level model's alphabet lacks the task's characters
        train = encode_examples(train_ex, spec, tokenizer, special, max_len)
        dev = {s: encode_examples(ex, spec, tokenizer, special, max_len)
               for s, ex in dev_ex.items()}
    except ValueError as e:
        raise ValueError(f"task {spec.name!r}, decoder from {config.init.kind} "
                         f"{config.init.path or '(scratch)'}: {e}") from None
    run = FinetuneRun(config, workdir, spec, data, model_cfg, head_cfg, special, tokenizer,
                      max_len, train=train, dev=dev, rng=k_train,
                      lora=lora_cfg and ft_lora.to_dict(lora_cfg, weights))
    _write_run_files(run)
    return run, params


def _write_run_files(run: FinetuneRun) -> None:
    """What makes a run directory self-contained: load_finetuned needs nothing else."""
    run.tokenizer.save(os.path.join(run.workdir, "tokenizer"))
    write_run_config(run.workdir, run.config, run.model_cfg)
    with open(os.path.join(run.workdir, "finetune.json"), "w") as fh:
        json.dump({"task": run.spec.name, "head": dataclasses.asdict(run.head_cfg),
                   "special_tokens": run.special.to_dict(), "max_len": run.max_len,
                   "lora": run.lora}, fh,
                  indent=2)


class Trainer:
    """The loop of one finetuning run: its state and step, the best epoch so far, its writers."""

    def __init__(self, run: FinetuneRun, params: dict, progress: bool = True):
        """Compiles (or reuses) the train step and opens the log, checkpoints and progress bar.

        Args:
          run: what `prepare` built.
          params: the initial parameters (donated to the first step; a LoRA run's 'decoder' is
            its frozen base, kept apart from the state and never donated).
          progress: show a progress bar.
        """
        tc, mc = run.config.train, run.model_cfg
        self.run = run
        steps_per_epoch = int(math.ceil(len(run.train) / tc.batch_size))
        self.total_steps = tc.epochs * steps_per_epoch
        if tc.max_steps > 0:
            self.total_steps = min(self.total_steps, tc.max_steps)
        frozen = run.lora is not None
        self.base = params["decoder"] if frozen else None
        trainable = {k: v for k, v in params.items() if k != "decoder"} if frozen else params
        optimizer, _, step = _jitted_train_step(
            mc, run.head_cfg,
            schedule_optim_config(run.config, self.total_steps).to_json(sort_keys=True),
            self.total_steps, frozen)
        self.train_step = step if not frozen else (
            lambda state, batch, rng: step(state, self.base, batch, rng))
        self.state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                                opt_state=optimizer.init(trainable))
        print(f"finetune {run.spec.name} ({run.spec.task_type}): {len(run.train)} train "
              f"examples, {steps_per_epoch} steps/epoch, {self.total_steps} steps; decoder "
              f"{mc.n_layer} x {mc.n_embd}, vocab {mc.vocab_size} (+3 task tokens), max_len "
              f"{run.max_len}; init {run.config.init.kind}", flush=True)
        if frozen:
            print(ft_lora.describe(*ft_lora.from_dict(run.lora), self.base, trainable),
                  flush=True)
        self.writer = MetricsWriter(run.workdir)
        self.ckpt = Checkpointer(os.path.join(run.workdir, "checkpoints"), save_every=1, keep=1,
                                 async_save=False)
        self.pbar = tqdm(total=self.total_steps, unit="step", dynamic_ncols=True) \
            if progress else None
        self.step = 0
        self.best: dict | None = None
        self.best_params = None
        self.history: list = []

    @property
    def params(self) -> dict:
        """The model's parameters now: the state's, with a LoRA run's frozen base as 'decoder'."""
        if self.base is None:
            return self.state.params
        return dict(self.state.params, decoder=self.base)

    def fit(self) -> None:
        """Every epoch until the last step: train, score the dev splits, keep the best."""
        try:
            for epoch in range(self.run.config.train.epochs):
                if self.step >= self.total_steps:
                    break
                self._train_epoch(epoch)
                self._end_epoch(epoch)
        finally:
            if self.pbar is not None:
                self.pbar.close()
            self.ckpt.close()
            self.writer.close()

    def _train_epoch(self, epoch: int) -> None:
        run, tc = self.run, self.run.config.train
        log_every = max(1, tc.log_every)
        for batch in epoch_batches(run.train, tc.batch_size, run.config.seed, epoch,
                                   tc.length_bucket, run.max_len):
            if self.step >= self.total_steps:
                break
            self.state, m = self.train_step(self.state, batch, run.rng)
            self.step += 1
            if self.step % log_every == 0 or self.step == self.total_steps:
                self._log_train(m, epoch)
            if self.pbar is not None:
                self.pbar.update(1)

    def _log_train(self, m: dict, epoch: int) -> None:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(f"non-finite finetuning loss at step {self.step}; lower "
                                     f"optim.learning_rate ({self.run.config.optim.learning_rate})")
        self.writer.write(dict(step=self.step, epoch=epoch + 1, **m))
        if self.pbar is not None:
            self.pbar.set_postfix(epoch=epoch + 1, loss=f"{m['loss']:.4f}",
                                  task=f"{m['task_loss']:.4f}", refresh=False)

    def _end_epoch(self, epoch: int) -> None:
        run, tc = self.run, self.run.config.train
        rec = {"step": self.step, "epoch": epoch + 1}
        for s, enc in run.dev.items():
            _, preds = predict(run.model_cfg, run.head_cfg, self.params, enc,
                               tc.eval_batch_size, tc.length_bucket, run.max_len)
            rec.update({f"{s}_{k}": v for k, v in split_metrics(run.spec, enc, preds).items()})
        self.writer.write(rec)
        self.history.append(rec)
        msg = ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in ("step", "epoch"))
        (self.pbar.write if self.pbar is not None else print)(f"epoch {epoch + 1}: {msg}")
        key = run.main_key
        if self.best is None or _finite(rec[key]) > _finite(self.best[key]):
            self.best = rec
            self.best_params = jax.device_get(self.params)
            self.ckpt.save(self.step, {"params": self.params},
                           {"epoch": epoch + 1, "step": self.step, "metrics": rec}, force=True)


def _predict_test(run: FinetuneRun, params) -> list:
    """The test splits' predictions in the submission format; returns the files written."""
    spec, tc = run.spec, run.config.train
    if not tc.predict_test:
        return []
    os.makedirs(os.path.join(run.workdir, "predictions"), exist_ok=True)
    files = []
    for s in spec.test_splits:
        enc = encode_examples(run.data.splits[s], spec, run.tokenizer, run.special, run.max_len)
        _, preds = predict(run.model_cfg, run.head_cfg, params, enc, tc.eval_batch_size,
                           tc.length_bucket, run.max_len)
        files.append(write_predictions(
            os.path.join(run.workdir, "predictions", spec.submission_file(s)), spec,
            enc.examples, preds))
    return files


def _finish(run: FinetuneRun, trainer: Trainer, pred_files: list, t0: float) -> dict:
    """summary.json and loss.png; returns the summary."""
    best, key = trainer.best, run.main_key
    summary = {"task": run.spec.name, "main_metric": key, "best_epoch": best["epoch"],
               "best_step": best["step"], "best": best, "history": trainer.history,
               "train_examples": len(run.train), "steps": trainer.step,
               "predictions": pred_files, "init": run.config.init.kind, "lora": run.lora,
               "wall_time_s": time.time() - t0}
    write_summary(run.workdir, summary)
    plot_metrics(os.path.join(run.workdir, METRICS),
                 os.path.join(run.workdir, "loss.png"), title=f"finetune {run.spec.name}")
    print(f"done: best {key} {best[key]:.4f} at epoch {best['epoch']}; "
          f"wall {summary['wall_time_s']:.0f}s; {run.workdir}", flush=True)
    return summary


def finetune(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
    """Finetunes as `config` says (see gptjax/defaults.py (finetune_config)) into a new `workdir`.

    Args:
      config: a finetuning config; fields it lacks take finetune_config's defaults.
      workdir: a new run directory.
      progress: show a progress bar.

    Returns:
      The summary (also written to summary.json): best epoch and its dev metrics, per-epoch dev
      metrics, prediction files, wall time; plus 'params', 'model_config', 'head_config',
      'tokenizer' and 'special' of the best epoch for callers in Python.
    """
    t0 = time.time()
    config = defaults.complete(config, defaults.finetune_config(config.task.name))
    run, params = prepare(config, workdir)
    trainer = Trainer(run, params, progress)
    trainer.fit()
    summary = _finish(run, trainer, _predict_test(run, trainer.best_params), t0)
    return dict(summary, params=trainer.best_params, model_config=run.model_cfg,
                head_config=run.head_cfg, tokenizer=run.tokenizer, special=run.special)
