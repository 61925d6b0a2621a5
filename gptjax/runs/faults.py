"""Fault points of the training loop and the checkpointer: no-ops unless a test installs faults.

The loop and the `Checkpointer` call the methods of one `Hooks` object, `active()`; the default
does nothing. tests/test_reliability.py (and the integrity tests) run train.py in a subprocess
and need faults at exact places that a test cannot reach from outside (a NaN at a given step, a
SIGKILL while a checkpoint is being written); they set environment variables, which `active()`
reads once, the first time it is called, and only then installs `EnvFaults`:

  GPTJAX_FAULT_NAN_STEP=N         the batch of 0-based step N gets NaN loss weights, so that
                                  step's loss and gradients are non-finite.
  GPTJAX_FAULT_SPIKE_STEP=N[,M..]  the batches of these 0-based steps get every target replaced by
                                  the batch's rarest target token: a finite loss above its
                                  neighbours' once the model has learned token frequencies (a
                                  loss spike for train.spike_guard; ~10% above in the tests'
                                  12-step tiny run, more in a longer one).
  GPTJAX_FAULT_NAN_OPT_STATE=N   before 0-based step N, a few entries of every optimizer-state
                                  array become NaN (loss and gradients stay finite; the update
                                  does not).
  GPTJAX_FAULT_STEP_SLEEP_S=X     sleep X seconds after every train step (a test can then send a
                                  signal while the run is in the middle of training).
  GPTJAX_FAULT_KILL_IN_SAVE=N     SIGKILL this process right after the (async) save of the
                                  checkpoint of step N has started, before Orbax finalizes it.
  GPTJAX_FAULT_KILL_AFTER_LOCAL_SAVE=N  SIGKILL this process right after its local-tier save of
                                  the checkpoint of step N is complete (gptjax.runs.local_tier).
  GPTJAX_FAULT_DATA_SLEEP_S=X     every batch takes X seconds longer to arrive (a slow data source).
  GPTJAX_FAULT_SAVE_SLEEP_S=X     every checkpoint save blocks the loop X seconds longer.

An in-process test can `install()` a `Hooks` subclass of its own instead.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

PREFIX = "GPTJAX_FAULT_"


class Hooks:
    """The fault points, each a no-op: what a run without faults calls."""

    def corrupt_batch(self, step: int, batch: dict) -> dict:
        """The host batch of `step` as the step gets it."""
        return batch

    def corrupt_state(self, step: int, state):
        """The train state as step `step` gets it."""
        return state

    def before_batch(self, step: int) -> None:
        """Called as step `step` waits for its batch (inside the loop's data wait)."""

    def after_step(self) -> None:
        """Called after every train step."""

    def after_save_started(self, step: int, directory: str) -> None:
        """Called once the (async) save of `step` into `directory` has started."""

    def after_local_save(self, step: int, step_dir: str) -> None:
        """Called once the local-tier save of `step` into `step_dir` is complete."""


def _int(environ: Mapping[str, str], name: str) -> Optional[int]:
    v = environ.get(name)
    return None if v in (None, "") else int(v)


class EnvFaults(Hooks):
    """The faults that the GPTJAX_FAULT_* variables of `environ` name (read once, here)."""

    def __init__(self, environ: Mapping[str, str]):
        self.nan_step = _int(environ, PREFIX + "NAN_STEP")
        spikes = environ.get(PREFIX + "SPIKE_STEP") or ""
        self.spike_steps = {int(v) for v in spikes.split(",") if v.strip()}
        self.nan_opt_state = _int(environ, PREFIX + "NAN_OPT_STATE")
        self.kill_in_save = _int(environ, PREFIX + "KILL_IN_SAVE")
        self.kill_after_local_save = _int(environ, PREFIX + "KILL_AFTER_LOCAL_SAVE")
        self.step_sleep_s, self.data_sleep_s, self.save_sleep_s = (
            float(environ.get(PREFIX + k) or 0.0) for k in ("STEP_SLEEP_S", "DATA_SLEEP_S",
                                                            "SAVE_SLEEP_S"))

    def corrupt_batch(self, step: int, batch: dict) -> dict:
        """The batch of `step`, with NaN weights when GPTJAX_FAULT_NAN_STEP names this step, or
        its rarest target everywhere when GPTJAX_FAULT_SPIKE_STEP does."""
        if step in self.spike_steps:
            return spike_batch(batch)
        if self.nan_step != step:
            return batch
        weights = batch.get("weights", np.ones(batch["targets"].shape, np.float32))
        return dict(batch, weights=np.full_like(weights, np.nan, dtype=np.float32))

    def corrupt_state(self, step: int, state):
        """`state`, with NaN in the first entries of each optimizer-state array when
        GPTJAX_FAULT_NAN_OPT_STATE names this step."""
        if self.nan_opt_state != step:
            return state

        def poison(x):
            if x.ndim == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            return x.at[(0,) * (x.ndim - 1) + (slice(0, 3),)].set(jnp.nan)

        return state.replace(opt_state=jax.tree_util.tree_map(poison, state.opt_state))

    def before_batch(self, step: int) -> None:
        """Sleep GPTJAX_FAULT_DATA_SLEEP_S seconds (unset: return at once)."""
        if self.data_sleep_s:
            time.sleep(self.data_sleep_s)

    def after_step(self) -> None:
        """Sleep GPTJAX_FAULT_STEP_SLEEP_S seconds (unset: return at once)."""
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)

    def after_save_started(self, step: int, directory: str) -> None:
        """Sleep GPTJAX_FAULT_SAVE_SLEEP_S seconds (a slow, blocking save); then SIGKILL this
        process when GPTJAX_FAULT_KILL_IN_SAVE names `step` (a save in flight).

        Orbax creates the step's temporary directory on a background thread, so the kill waits
        (up to 10 s) until `<directory>/<step>.orbax-checkpoint-tmp` exists: a save in flight."""
        if self.save_sleep_s:
            time.sleep(self.save_sleep_s)
        if self.kill_in_save == step:
            tmp = os.path.join(directory, f"{step}.orbax-checkpoint-tmp")
            end = time.monotonic() + 10
            while not os.path.isdir(tmp) and time.monotonic() < end:
                time.sleep(0.001)
            os.kill(os.getpid(), signal.SIGKILL)

    def after_local_save(self, step: int, step_dir: str) -> None:
        """SIGKILL this process when GPTJAX_FAULT_KILL_AFTER_LOCAL_SAVE names `step`."""
        if self.kill_after_local_save == step:
            os.kill(os.getpid(), signal.SIGKILL)


def spike_batch(batch: dict) -> dict:
    """`batch` with every target replaced by its least frequent target token (the smallest id
    among ties): a model that has learned the token frequencies gives it a loss above the
    data's."""
    ids, counts = np.unique(batch["targets"], return_counts=True)
    rare = ids[np.argmin(counts)]
    return dict(batch, targets=np.full_like(batch["targets"], rare))


def from_env(environ: Mapping[str, str]) -> Hooks:
    """`EnvFaults(environ)` when a GPTJAX_FAULT_* variable is set (non-empty), else `Hooks()`."""
    if any(k.startswith(PREFIX) and v for k, v in environ.items()):
        return EnvFaults(environ)
    return Hooks()


_active: Optional[Hooks] = None


def active() -> Hooks:
    """The installed hooks; the first call installs `from_env(os.environ)` if none is."""
    global _active
    if _active is None:
        _active = from_env(os.environ)
    return _active


def install(hooks: Optional[Hooks]) -> None:
    """Makes `hooks` the active ones (None: read the environment again at the next `active()`)."""
    global _active
    _active = hooks
