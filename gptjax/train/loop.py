"""Pretraining: prepare and restore-or-init (gptjax.train.run), loop, finish: `train_and_evaluate`.

The experiment config (an ml_collections.ConfigDict, see gptjax/defaults.py and configs/) drives
everything; the model architecture itself is a GPTConfig built from `config.model`. The run's
mutable state while it trains (pending metrics, skipped steps, throughput window) lives in a
`Trainer`; what the run returns is a `TrainResult`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import jax
import ml_collections
from tqdm.auto import tqdm

from gptjax import defaults
from gptjax.config import GPTConfig
from gptjax.data.documents import document_mask
from gptjax.data.tokenizers import Tokenizer
from gptjax.plotting import plot_evals, plot_layer_stats, plot_metrics
from gptjax.runs import faults, goodput
from gptjax.runs.workdir import MetricsWriter, remove_empty_dirs, write_summary
from gptjax.train import elastic, layer_stats
from gptjax.train.evals import Evaluation, PeriodicEvals, check_evals
from gptjax.train.experiment import check_train_config
from gptjax.train.metrics import mfu, peak_flops
from gptjax.train.preemption import PreemptionGuard
from gptjax.train.run_data import train_size, val_metrics
from gptjax.train.run_mixture import mix_fields, mixture_phases
from gptjax.train.spikes import make_guard
from gptjax.train.run import Run, prepare, restore_or_init  # noqa: F401 (loop.prepare: public)
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


# ================================================================================ the loop
class Trainer:
    """The training loop and its mutable state: metrics fetched one step late, skipped steps,
    the throughput window, and whether the run halted or was preempted."""

    evals: Optional[PeriodicEvals] = None  # train.evals (train_and_evaluate sets them)

    def __init__(self, run: Run, start: int, carried: dict, progress: bool):
        self.run, self.start = run, start
        self.hooks = faults.active()  # the fault points: no-ops unless a test installs faults
        tc = run.config.train
        self.total_steps = tc.steps
        self.halt_mode = tc.nonfinite == "halt"
        self.max_skips = tc.max_consecutive_skips
        self.stats_every = tc.layer_stats_every  # per-layer statistics' steps (0 = none)
        self.stats_compiled = False  # the statistics step's first call compiles it
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
        self.logged_to = start  # the first step of the log line's window
        self.flops_per_token = run.model_cfg.flops_per_token(run.seq_len)
        self.peak, self.peak_source = peak_flops(run.model_cfg.dtype, quick=True)
        self.writer = MetricsWriter(run.workdir, enabled=run.is_main)
        self.spikes = make_guard(tc, run.workdir, run.batcher.state(), start, carried["spikes"],
                                 run.is_main, mixture_phases(run.config))  # train.spike_guard
        self.pbar = None
        if progress and run.is_main:
            self.pbar = tqdm(total=self.total_steps, initial=start, unit="step",
                             dynamic_ncols=True)

    def meta_for(self, step: int) -> dict:
        """The metadata saved with checkpoint `step` (checked on resume, see workdir)."""
        return {"model_config": self.run.model_cfg.to_dict(),
                "data": dict(self.run.batcher.state(), step=step),
                "tokenizer": self.run.tok_info, "skipped_steps": self.n_skipped,
                "train_loss": self.last_train_loss, **self.run.init_meta, **self.spikes.meta(),
                **elastic.layout_meta(self.run.setup, self.run.config.train.accum_steps)}

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
        m = dict(m)
        layers = m.pop("layers", None)  # a statistics step's (train.layer_stats_every)
        if layers is not None:
            self.writer.write(layer_stats.record(step + 1, layers))
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
            skipped=int(m["skipped"]), skipped_steps=self.n_skipped, **self.spikes.log_fields(m),
            **mix_fields(self.run.batcher, self.logged_to, step + 1)))  # a mixture's shares
        self.logged_to = step + 1
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
        stats = layer_stats.due(self.stats_every, step)
        train_step = run.setup.stats_step if stats else run.setup.train_step
        t = time.time()
        state, metrics = train_step(self.hooks.corrupt_state(step, state), batch, run.train_rng,
                                    *self.spikes.args(step))
        if stats and not self.stats_compiled:  # its compilation is not throughput
            self.stats_compiled = True
            self.t_last += time.time() - t
            if metrics["loss"].is_ready():  # it ran in the dispatch too (see hostmem): not timed
                self.done_mark += 1
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
        local_due = run.local is not None and run.local.due(done) and not stop
        if self.pending is not None and (stop or run.ckpt.should_save(done) or local_due):
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
                vm = val_metrics(run.setup, state.params, run.val_tokens, run.seq_len,
                                 tc.eval_batch_size, tc.eval_batches,
                                 document_mask(run.config.data, run.tokenizer))
            vl = vm["val_loss"]  # (and a mixture's val_loss/<corpus>)
            self.writer.write(dict(step=done, **vm, val_ppl=math.exp(min(vl, 50))))
            if self.pbar is not None:
                self.pbar.write(f"step {done}: val_loss {vl:.4f}")
        if self.evals is not None and self.evals.due(done):
            self.evals(state.params, done)  # on the live parameters: what the save below holds
        run.ckpt.save(done, state, self.meta_for(done))
        if local_due:
            self._save_local(state, done)
        return True

    def _save_local(self, state: TrainState, done: int) -> None:
        """The local tier's save after `done` steps (synchronous, on this host's disk), charged
        to the ledger's `local_checkpoint`; the ledger is written first (the steps a kill during
        the save throws away)."""
        run = self.run
        run.ledger.heartbeat(force=True, reached=done)
        with run.ledger.phase("local_checkpoint"):
            run.local.save(done, state, self.meta_for(done), run.setup.mesh)

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
        vm = val_metrics(run.setup, state.params, run.val_tokens, run.seq_len,
                         run.config.train.eval_batch_size, -1,
                         document_mask(run.config.data, run.tokenizer))
    val_loss = vm["val_loss"]
    trainer.writer.write(dict(step=final_step, **vm, val_ppl=math.exp(min(val_loss, 50)),
                              final=True))
    ckpt.close()
    trainer.writer.close()
    result = trainer.result(state, val_loss)
    if run.is_main:
        plot_path = os.path.join(run.workdir, "loss.png")
        with run.ledger.phase("log"):
            plot_metrics(run.metrics_path, plot_path)
            plot_evals(run.metrics_path, os.path.join(run.workdir, "evals.png"))  # train.evals
            if run.config.train.layer_stats_every:  # one line per layer, one panel per metric
                plot_layer_stats(run.metrics_path, os.path.join(run.workdir, "layers.png"))
            write_summary(run.workdir, result.summary())
        print(f"done: step {final_step}, val_loss {val_loss:.4f} (whole split), "
              f"wall {result.wall_time_s:.0f}s; plot {plot_path}", flush=True)
    return result


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, progress: bool = True,
                       started: Optional[float] = None,
                       after: Optional[Callable[[TrainResult], None]] = None,
                       evals: Sequence[Evaluation] = ()) -> TrainResult:
    """Pretrain a GPT as `config` says, in `workdir`; resumes from the latest checkpoint there.

    Args:
      config: a train.py experiment config (missing fields take gptjax.defaults' values).
      workdir: the run directory (created if needed).
      progress: show a progress bar (process 0).
      started, after: when this attempt began (default now; train.py: the process's start) and
        what it does last, with the result (train.py: the sample), for its goodput ledger.
      evals: the in-training evaluations, run every train.evals_every steps on the live
        parameters (gptjax.train.evals; train.py: gptjax.eval.in_training.build_evals(config)).

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
    check_evals(config, evals)
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
    trainer.evals = PeriodicEvals(evals, run, trainer.writer,
                                  None if trainer.pbar is None else trainer.pbar.write)
    trainer.evals.check()  # (a task's characters against the tokenizer: before the first step)
    with ledger.attempt(announce=run.is_main) as ended:
        state = trainer.loop(state)
        ledger.base("other")
        result = finish(trainer, state)
        if after is not None:
            with ledger.phase("eval"):
                after(result)
        ended("preempted" if result.preempted else "done", result.step)
    return result
