"""Fault injection for the reliability tests: environment variables, all off unless set.

tests/test_reliability.py runs train.py in a subprocess and needs faults at exact places that a
test cannot reach from outside (a NaN at a given step, a SIGKILL while a checkpoint is being
written). Each hook costs one dictionary lookup when its variable is unset.

  GPTJAX_FAULT_NAN_STEP=N         the batch of 0-based step N gets NaN loss weights, so that
                                  step's loss and gradients are non-finite.
  GPTJAX_FAULT_NAN_OPT_STATE=N   before 0-based step N, a few entries of every optimizer-state
                                  array become NaN (loss and gradients stay finite; the update
                                  does not).
  GPTJAX_FAULT_STEP_SLEEP_S=X     sleep X seconds after every train step (a test can then send a
                                  signal while the run is in the middle of training).
  GPTJAX_FAULT_KILL_IN_SAVE=N     SIGKILL this process right after the (async) save of the
                                  checkpoint of step N has started, before Orbax finalizes it.
"""

from __future__ import annotations

import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np


def _int(name: str):
    v = os.environ.get(name)
    return None if v in (None, "") else int(v)


def corrupt_batch(step: int, batch: dict) -> dict:
    """The batch of `step`, with NaN weights when GPTJAX_FAULT_NAN_STEP names this step."""
    if _int("GPTJAX_FAULT_NAN_STEP") != step:
        return batch
    weights = batch.get("weights", np.ones(batch["targets"].shape, np.float32))
    return dict(batch, weights=np.full_like(weights, np.nan, dtype=np.float32))


def corrupt_state(step: int, state):
    """`state`, with NaN in the first entries of each optimizer-state array when
    GPTJAX_FAULT_NAN_OPT_STATE names this step."""
    if _int("GPTJAX_FAULT_NAN_OPT_STATE") != step:
        return state

    def poison(x):
        if x.ndim == 0 or not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.at[(0,) * (x.ndim - 1) + (slice(0, 3),)].set(jnp.nan)

    return state.replace(opt_state=jax.tree_util.tree_map(poison, state.opt_state))


def after_step() -> None:
    """Sleep GPTJAX_FAULT_STEP_SLEEP_S seconds (unset: return at once)."""
    s = os.environ.get("GPTJAX_FAULT_STEP_SLEEP_S")
    if s:
        time.sleep(float(s))


def after_save_started(step: int, directory: str) -> None:
    """SIGKILL this process when GPTJAX_FAULT_KILL_IN_SAVE names `step` (a save in flight).

    Orbax creates the step's temporary directory on a background thread, so the kill waits
    (up to 10 s) until `<directory>/<step>.orbax-checkpoint-tmp` exists: a save in flight."""
    if _int("GPTJAX_FAULT_KILL_IN_SAVE") == step:
        tmp = os.path.join(directory, f"{step}.orbax-checkpoint-tmp")
        end = time.monotonic() + 10
        while not os.path.isdir(tmp) and time.monotonic() < end:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)
