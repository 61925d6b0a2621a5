"""Pretraining: prepare -> restore-or-init -> loop -> finish, as `train_and_evaluate`.

The experiment config (an ml_collections.ConfigDict, see gptjax/defaults.py and configs/) drives
everything; the model architecture itself is a GPTConfig built from `config.model`. The run's
mutable state while it trains (pending metrics, skipped steps, throughput window) lives in a
`Trainer`; what the run returns is a `TrainResult`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from gptjax import defaults
from gptjax.config import GPTConfig
from gptjax.data.batcher import Batcher
from gptjax.data.tokenizers import Tokenizer, tokenizer_info
from gptjax.plotting import plot_metrics
from gptjax.runs import faults, goodput
from gptjax.runs.checkpoint import Checkpointer, CheckpointError
from gptjax.nn.param_layout import convert_layout
from gptjax.runs.pretrained import execution_change, saved_execution
from gptjax.runs.workdir import (
    METRICS,
    MetricsWriter,
    config_changes,
    last_logged_loss,
    remove_empty_dirs,
    truncate_log,
    write_run_config,
    write_summary,
)
from gptjax.train.experiment import check_train_config, model_config_from, resolve_steps
from gptjax.train.lora_setup import LoraSetup, load_base, make_setup, new_state
from gptjax.train.metrics import mfu, peak_flops
from gptjax.train.preemption import PreemptionGuard
from gptjax.train.run_data import evaluate, load_data, make_batcher, train_size
from gptjax.train.setup import Setup
from gptjax.train.spikes import META_KEY as SPIKES_META, make_guard
from gptjax.train.start import check_run_meta, init_architecture
from gptjax.train.step import TrainState


@dataclasses.dataclass
class TrainResult:
    """What `train_and_evaluate` returns: the run's summary, plus its live objects.

    Attributes:
      step: the final step.
      train_loss: the training loss of the last step.
      val_loss: the whole-split validation loss (None when the run was preempted).
      skipped_steps: steps whose update was skipped (non-finite loss or gradients).
      wall_time_s: the run's wall time.
      params: the model's parameter count.
      peak_flops, peak_source: the peak FLOP/s MFU is computed against, and where it came from.
      preempted: the signal that stopped the run (SIGTERM/SIGINT), or None.
      state: the final TrainState.
      tokenizer: the run's tokenizer.
      model_config: the run's GPTConfig.
    """

    step: int
    train_loss: float
    val_loss: Optional[float]
    skipped_steps: int
    wall_time_s: float
    params: int
    peak_flops: float
    peak_source: str
    preempted: Optional[str] = None
    state: Optional[TrainState] = dataclasses.field(default=None, repr=False)
    tokenizer: Optional[Tokenizer] = dataclasses.field(default=None, repr=False)
    model_config: Optional[GPTConfig] = dataclasses.field(default=None, repr=False)
    merge: Optional[Callable] = dataclasses.field(default=None, repr=False)

    def model_params(self):
        """The state's parameters (a LoRA run's: its base with the adapters merged)."""
        return self.state.params if self.merge is None else self.merge(self.state.params)

    def summary(self) -> dict:
        """The JSON summary (summary.json): every field but the live objects and `preempted`."""
        return dict(step=self.step, train_loss=self.train_loss, val_loss=self.val_loss,
                    skipped_steps=self.skipped_steps, wall_time_s=self.wall_time_s,
                    params=self.params, peak_flops=self.peak_flops, peak_source=self.peak_source)


@dataclasses.dataclass
class Run:
    """What `prepare` builds for a run: its data, tokenizer, architecture, mesh and checkpoints."""

    config: ml_collections.ConfigDict
    workdir: str
    t_start: float
    tokenizer: Tokenizer
    train_tokens: Optional[np.ndarray]  # None with data.pipeline='sharded' (per-process shards)
    val_tokens: np.ndarray
    model_cfg: GPTConfig
    seq_len: int
    setup: Setup
    batcher: Batcher
    ckpt: Checkpointer
    init_rng: jax.Array
    train_rng: jax.Array
    init_meta: dict  # what checkpoints record of a LoRA run: its `lora` settings and `base`
    ledger: goodput.Ledger = dataclasses.field(default_factory=goodput.Ledger)  # where time went

    @property
    def is_main(self) -> bool:
        """Whether this is process 0, the one that writes the run directory's files."""
        return jax.process_index() == 0

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, METRICS)

    @functools.cached_property
    def tok_info(self) -> dict:
        """The tokenizer's kind, size and fingerprint, as checkpoints record them."""
        return tokenizer_info(self.tokenizer)


# ================================================================================ prepare
def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Data, tokenizer, architecture, mesh, batcher and checkpointer of a complete config."""
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    dc = config.data
    source, tokenizer, train_tokens, val_tokens = load_data(config, workdir)
    pretrained = init_architecture(config)  # (init.kind hf/workdir: its tokenizer is the run's)
    if pretrained is None and config.tokenizer.kind != tokenizer.kind:
        raise CheckpointError(f"tokenizer.kind={config.tokenizer.kind!r} but {workdir} holds a "
                              f"{tokenizer.kind!r} tokenizer; use another --workdir")
    model_cfg = pretrained or model_config_from(config, tokenizer.vocab_size)
    seq_len = dc.seq_len or model_cfg.n_ctx
    if len(val_tokens) < seq_len + 1:  # found now, not at the first evaluation
        raise ValueError(f"the {dc.val_split!r} split has {len(val_tokens)} tokens, shorter than "
                         f"one sequence (data.seq_len {seq_len} + 1); allowed: more validation "
                         "text (data.validation_fraction) or a shorter data.seq_len")
    tc = config.train
    if train_tokens is not None:
        tc.steps = resolve_steps(config, len(train_tokens), seq_len)  # train.epochs, if set
    batcher = make_batcher(config, source, tokenizer, train_tokens, seq_len)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tc.save_every,
                        keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    # (init, train, sample): gptjax.sweep splits each model's key the same way.
    init_rng, train_rng, _ = jax.random.split(jax.random.key(config.seed), 3)
    setup = make_setup(config, model_cfg, tc.steps)
    return Run(config, workdir, t_start, tokenizer, train_tokens, val_tokens, model_cfg, seq_len,
               setup, batcher, ckpt, init_rng, train_rng, load_base(config, setup, ckpt))


def _saved_layout_setup(run: Run, meta: dict) -> Setup:
    """The run's Setup, or one for the parameter layout checkpoint `meta` was saved in (its
    `scan_layers`; the rest of the execution does not change the state's tree)."""
    saved_scan = saved_execution(meta, run.model_cfg)["scan_layers"]
    if saved_scan == run.model_cfg.scan_layers:
        return run.setup
    if isinstance(run.setup, LoraSetup):  # (its base is in the run's layout)
        raise CheckpointError(f"a LoRA run resumes in its layout: scan_layers={saved_scan}")
    return Setup(run.config, run.model_cfg.with_execution(scan_layers=saved_scan),
                 run.config.train.steps)



def restore_or_init(run: Run) -> tuple[TrainState, dict]:
    """The latest intact checkpoint of the run (and the data position it saved), or a new state.

    A checkpoint of this architecture resumes under this config's execution, whatever it was
    saved with (one line names the change); one saved with the other `scan_layers` is read in
    its layout, then its parameters and optimizer moments are moved to this run's.

    Returns:
      (state, what the loop carries over: `skipped_steps` so far and the last `train_loss`).
    """
    with run.setup.mesh:
        resumed = run.ckpt.restore_latest(
            lambda meta: _saved_layout_setup(run, meta).abstract_sharded_state(),
            functools.partial(check_run_meta, model_cfg=run.model_cfg, tokenizer=run.tok_info,
                              init_meta=run.init_meta))
    carried = {"skipped_steps": 0, "train_loss": float("nan"), "spikes": None}
    if resumed is not None:
        latest, state, meta = resumed
        if saved_execution(meta, run.model_cfg)["scan_layers"] != run.model_cfg.scan_layers:
            with run.setup.mesh:
                state = jax.device_put(convert_layout(run.model_cfg, state,
                                                      run.model_cfg.scan_layers),
                                       run.setup.state_shardings)
        run.batcher.restore(meta["data"])
        truncate_log(run.metrics_path, latest)
        # (JSON metadata; older runs lack these, their log has the loss)
        carried["skipped_steps"] = int(meta.get("skipped_steps", 0))
        loss = meta.get("train_loss", last_logged_loss(run.metrics_path, latest))
        carried["train_loss"] = float("nan") if loss is None else float(loss)
        carried["spikes"] = meta.get(SPIKES_META)  # the spike guard's window and count
        changes = config_changes(run.workdir, run.config)
        execution = execution_change(meta, run.model_cfg)
        if run.is_main:
            if changes:
                print(f"warning: this config differs from the one {run.workdir} was run with: "
                      f"{changes}", file=sys.stderr, flush=True)
            if execution:
                print(f"resuming step {latest} with another execution: {execution}", flush=True)
            print(f"resumed from step {latest} ({run.ckpt.directory})", flush=True)
    else:
        state = new_state(run.config, run.setup, run.init_rng)  # init.kind's weights
        truncate_log(run.metrics_path, 0)  # no checkpoint: a new run
    if run.is_main:  # only now: a run refused above must not overwrite the work directory's files
        write_run_config(run.workdir, run.config, run.model_cfg)
    return state, carried


# ================================================================================ the loop
class Trainer:
    """The training loop and its mutable state: metrics fetched one step late, skipped steps,
    the throughput window, and whether the run halted or was preempted."""

    def __init__(self, run: Run, start: int, carried: dict, progress: bool):
        self.run, self.start = run, start
        self.hooks = faults.active()  # the fault points: no-ops unless a test installs faults
        tc = run.config.train
        self.total_steps = tc.steps
        self.halt_mode = tc.nonfinite == "halt"
        self.max_skips = tc.max_consecutive_skips
        self.n_skipped = carried["skipped_steps"]  # steps whose update was skipped, over the run
        self.last_train_loss = carried["train_loss"]
        self.consecutive = 0  # skipped steps in a row
        self.halted: Optional[int] = None  # the first non-finite step of a 'halt' run
        self.stalled: Optional[int] = None  # the step whose skip made max_skips in a row
        self.halt_what = ""  # what was non-finite at `halted` / `stalled`
        self.preempted: Optional[str] = None
        self.pending = None  # (step, device metrics) fetched one step late: dispatch runs ahead
        # The throughput window: since t_last, when `done_mark` steps had completed.
        self.t_last, self.done_mark, self.last_tps = time.time(), start, float("nan")
        self.tokens_per_step = tc.batch_size * run.seq_len
        self.data_wait_s, self.data_waits = 0.0, 0  # since the last log line
        self.flops_per_token = run.model_cfg.flops_per_token(run.seq_len)
        self.peak, self.peak_source = peak_flops(run.model_cfg.dtype, quick=True)
        self.writer = MetricsWriter(run.workdir, enabled=run.is_main)
        self.spikes = make_guard(tc, run.workdir, run.batcher.state(), start, carried["spikes"],
                                 run.is_main)  # train.spike_guard (gptjax.train.spikes)
        self.pbar = None
        if progress and run.is_main:
            self.pbar = tqdm(total=self.total_steps, initial=start, unit="step",
                             dynamic_ncols=True)

    def meta_for(self, step: int) -> dict:
        """The metadata saved with checkpoint `step` (checked on resume, see workdir)."""
        return {"model_config": self.run.model_cfg.to_dict(),
                "data": dict(self.run.batcher.state(), step=step),
                "tokenizer": self.run.tok_info, "skipped_steps": self.n_skipped,
                "train_loss": self.last_train_loss, **self.run.init_meta, **self.spikes.meta()}

    @property
    def stopped(self) -> bool:
        """Whether a non-finite step ('halt'), too many skipped steps in a row or too many loss
        spikes stop the run."""
        return (self.halted is not None or self.stalled is not None
                or self.spikes.halt is not None)

    def handle(self, step: int, m: dict, completed: Optional[int] = None) -> None:
        """Fetch step `step`'s metrics: count a skipped update, log every `log_every` steps.

        Args:
          step: the 0-based step.
          m: its device metrics.
          completed: how many steps have completed by now (default step + 1); with
            synchronous dispatch the step dispatched after `step` has completed too.
        """
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        self.last_train_loss = m["loss"]
        self.spikes.observe(step, m)
        self.consecutive = self.consecutive + 1 if m["skipped"] else 0
        if m["skipped"]:  # a non-finite loss, gradient norm or update
            self.n_skipped += 1
            what = ("loss or gradients" if not (math.isfinite(m["loss"]) and math.isfinite(
                m["grad_norm"])) else "update (the optimizer state holds non-finite or huge "
                "values)")
            if self.stopped:
                pass  # (a step dispatched before the run stopped)
            elif self.halt_mode:
                self.halted, self.halt_what = step, what
            elif 0 < self.max_skips <= self.consecutive:
                self.stalled, self.halt_what = step, what
            elif self.run.is_main and (self.n_skipped <= 10 or self.n_skipped % 100 == 0):
                print(f"warning: step {step + 1}: non-finite {what}, update skipped "
                      f"({self.n_skipped} skipped so far)", file=sys.stderr, flush=True)
        if (step + 1) % self.run.config.train.log_every == 0 or step + 1 == self.total_steps:
            self._log_train(step, m, step + 1 if completed is None else completed)

    def _log_train(self, step: int, m: dict, completed: int) -> None:
        dt, n = time.time() - self.t_last, completed - self.done_mark
        # n == 0: the steps logged now were timed in the window before (synchronous dispatch
        # completes a step before its predecessor's metrics are read); keep that window's rate.
        tps = n * self.tokens_per_step / max(dt, 1e-9) if n > 0 else self.last_tps
        self.writer.write(dict(
            step=step + 1, loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"],
            data_wait_ms=1e3 * self.data_wait_s / max(self.data_waits, 1),
            tokens_per_sec=tps, mfu=mfu(tps, self.flops_per_token, jax.device_count(), self.peak),
            skipped=int(m["skipped"]), skipped_steps=self.n_skipped, **self.spikes.log_fields(m)))
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
        self.t_last, self.done_mark, self.last_tps = time.time(), completed, tps
        self.data_wait_s, self.data_waits = 0.0, 0

    def _flush(self) -> None:
        if self.pending is not None:
            self.handle(*self.pending)
            self.pending = None

    def loop(self, state: TrainState) -> TrainState:
        """Train from `self.start` to the last step, or until a halt or a preemption."""
        run, guard = self.run, PreemptionGuard()
        try:
            with run.setup.mesh, guard:
                for step in range(self.start, self.total_steps):
                    state = self._train_step(state, step)
                    if self.stopped:
                        break
                    if self.pbar is not None:
                        self.pbar.update(1)
                    if not self._after_step(state, step + 1, guard):
                        break
                self._flush()
        finally:
            run.batcher.close()  # the prefetch thread
            run.ckpt.wait()  # whatever stopped the loop, a save in flight completes
            if self.pbar is not None:
                self.pbar.close()
        return state

    def _train_step(self, state: TrainState, step: int) -> TrainState:
        """Dispatch step `step`, then fetch the previous step's metrics (dispatch runs ahead)."""
        run = self.run
        t = time.perf_counter()
        with run.ledger.waiting_for_data(step):
            self.hooks.before_batch(step)
            host_batch = run.batcher.batch(step)
        self.data_wait_s += time.perf_counter() - t  # the step's wait for its data
        self.data_waits += 1
        batch = run.setup.put_batch(self.hooks.corrupt_batch(step, host_batch))
        state, metrics = run.setup.train_step(self.hooks.corrupt_state(step, state), batch,
                                              run.train_rng, *self.spikes.args(step))
        if self.pending is not None:
            # Step `step` has completed too if dispatch ran it on this thread (see hostmem).
            completed = step + 1 if metrics["loss"].is_ready() else step
            self.handle(*self.pending, completed=completed)
            if step - 1 == self.start:
                # Do not count compilation in the first throughput window.
                self.t_last, self.done_mark = time.time(), completed
        self.pending = (step, metrics)
        return state

    def _after_step(self, state: TrainState, done: int, guard: PreemptionGuard) -> bool:
        """Preemption, periodic evaluation and checkpoint after `done` steps; False stops."""
        run, tc = self.run, self.run.config.train
        self.hooks.after_step()
        stop = guard.should_stop(done)  # SIGTERM/SIGINT: the same step on every host
        if self.pending is not None and (stop or run.ckpt.should_save(done)):
            # Metrics of a step about to be saved, now: a 'halt' run never saves a non-finite
            # update, and the saved skip count is exact.
            self._flush()
            if self.stopped:
                return False
        if stop:
            run.ckpt.save(done, state, self.meta_for(done), force=True)
            self.preempted = guard.signal_name
            return False
        if tc.eval_every > 0 and done % tc.eval_every == 0 and done != self.total_steps:
            with run.ledger.phase("eval"):
                vl = evaluate(run.setup, state.params, run.val_tokens, run.seq_len,
                              tc.eval_batch_size, tc.eval_batches)
            self.writer.write(dict(step=done, val_loss=vl, val_ppl=math.exp(min(vl, 50))))
            if self.pbar is not None:
                self.pbar.write(f"step {done}: val_loss {vl:.4f}")
        run.ckpt.save(done, state, self.meta_for(done))
        return True

    def result(self, state: TrainState, val_loss: Optional[float]) -> TrainResult:
        """The TrainResult of the run that ended with `state` (and `val_loss`, if evaluated)."""
        run = self.run
        return TrainResult(
            step=int(jax.device_get(state.step)), train_loss=self.last_train_loss,
            val_loss=val_loss, skipped_steps=self.n_skipped,
            wall_time_s=time.time() - run.t_start, params=run.model_cfg.num_params(),
            peak_flops=self.peak, peak_source=self.peak_source, preempted=self.preempted,
            state=state, tokenizer=run.tokenizer, model_config=run.model_cfg,
            merge=getattr(run.setup, "merged", None))


# ================================================================================ finish
def finish(trainer: Trainer, state: TrainState) -> TrainResult:
    """Stop a halted run with its error, or save, evaluate on the whole split and summarise."""
    run = trainer.run
    ckpt = run.ckpt
    if trainer.stopped:
        ckpt.close()
        trainer.writer.close()
        good = ckpt.latest_step()
        good = (f"the last good checkpoint is step {good}" if good is not None
                else "no checkpoint was written before it")
        if trainer.spikes.halt is not None:
            raise FloatingPointError(f"{trainer.spikes.halt}; {good}")
        if trainer.halted is not None:
            raise FloatingPointError(f"non-finite {trainer.halt_what} at step "
                                     f"{trainer.halted + 1} (train.nonfinite='halt'); {good}")
        first = trainer.stalled + 2 - trainer.max_skips
        raise FloatingPointError(
            f"steps {first}-{trainer.stalled + 1} were all skipped (non-finite "
            f"{trainer.halt_what}), train.max_consecutive_skips={trainer.max_skips} in a row: "
            f"the run stopped; {good}")
    if trainer.preempted is not None:
        ckpt.close()
        trainer.writer.close()
        result = trainer.result(state, None)
        if run.is_main:
            print(f"{trainer.preempted}: stopped after step {result.step} and saved its "
                  f"checkpoint in {ckpt.directory}; run the same command to resume", flush=True)
        return result
    final_step = int(jax.device_get(state.step))
    if final_step not in ckpt.all_steps():
        ckpt.save(final_step, state, trainer.meta_for(final_step), force=True)
    with run.ledger.phase("eval"):
        val_loss = evaluate(run.setup, state.params, run.val_tokens, run.seq_len,
                            run.config.train.eval_batch_size, -1)
    trainer.writer.write(dict(step=final_step, val_loss=val_loss,
                              val_ppl=math.exp(min(val_loss, 50)), final=True))
    ckpt.close()
    trainer.writer.close()
    result = trainer.result(state, val_loss)
    if run.is_main:
        plot_path = os.path.join(run.workdir, "loss.png")
        with run.ledger.phase("log"):
            plot_metrics(run.metrics_path, plot_path)
            write_summary(run.workdir, result.summary())
        print(f"done: step {final_step}, val_loss {val_loss:.4f} (whole split), "
              f"wall {result.wall_time_s:.0f}s; plot {plot_path}", flush=True)
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
                       started: Optional[float] = None,
                       after: Optional[Callable[[TrainResult], None]] = None) -> TrainResult:
    """Pretrain a GPT as `config` says, in `workdir`; resumes from the latest checkpoint there.

    Args:
      config: a train.py experiment config (missing fields take gptjax.defaults' values).
      workdir: the run directory (created if needed).
      progress: show a progress bar (process 0).
      started, after: when this attempt began (default now; train.py: the process's start) and
        what it does last, with the result (train.py: the sample), for its goodput ledger.

    Returns:
      A TrainResult (`.summary()` is what summary.json holds).

    Raises:
      ConfigError: for an impossible config value, before any data is read.
      CheckpointError: when the work directory holds another run.
      FloatingPointError: at a non-finite step under train.nonfinite='halt', after
        train.max_consecutive_skips skipped steps in a row, or after train.spike_max loss spikes
        within train.spike_window steps.
    """
    ledger = goodput.Ledger(started)  # the attempt's wall time, in buckets (goodput.json)
    config = defaults.complete(config, defaults.base_config())
    check_train_config(config)  # one-line errors before any data is read or anything compiles
    created = not os.path.exists(workdir)
    try:
        run = prepare(config, workdir)
        with ledger.phase("init"):
            state, carried = restore_or_init(run)
    except BaseException:
        if created and jax.process_index() == 0:
            remove_empty_dirs(os.path.abspath(workdir))
        raise
    start = int(jax.device_get(state.step))
    run.ledger = ledger.open(run.workdir, start, restored=start > 0)
    mc = run.model_cfg
    if run.is_main:
        print(f"gptjax: {mc.num_params() / 1e6:.2f}M parameters, {mc.n_layer} layers x "
              f"{mc.n_embd}, vocab {mc.vocab_size}, context {run.seq_len}; "
              f"{train_size(run.batcher, run.train_tokens)} train / {len(run.val_tokens):,} "
              f"val tokens; mesh "
              f"{dict(run.setup.mesh.shape)}; steps {start}->{config.train.steps}", flush=True)
    trainer = Trainer(run, start, carried, progress)
    run.ckpt, trainer.writer = ledger.watch(run.ckpt, trainer.writer)
    with ledger.attempt(announce=run.is_main) as ended:
        state = trainer.loop(state)
        ledger.base("other")
        result = finish(trainer, state)
        if after is not None:
            with ledger.phase("eval"):
                after(result)
        ended("preempted" if result.preempted else "done", result.step)
    return result
