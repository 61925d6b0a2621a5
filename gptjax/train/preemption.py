"""SIGTERM/SIGINT during training: stop at a step boundary every process agrees on, then save.

Single process: a signal handler sets a flag, and the loop stops after the step in flight.
Several processes: `jax.distributed.initialize` starts JAX's preemption sync manager, which
catches SIGTERM itself, tells the coordination service, and makes
`multihost_utils.reached_preemption_sync_point(step)` return True on every process at the same
step (one past the largest step any process had reached). We then leave SIGTERM to it and turn a
SIGINT into a SIGTERM, so Ctrl-C on one host stops all of them at the same step. Every process
must call `should_stop(step)` at every step, which the train loop does.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

import jax
# JAX's preemption sync manager is only reachable through this private module (present in every
# jax version gptjax supports, 0.10.x and 0.11.x).
from jax._src import distributed
from jax.experimental import multihost_utils


def _sync_manager():
    """JAX's preemption sync manager when this is a multi-process run that started one."""
    if jax.process_count() == 1:
        return None
    return getattr(distributed.global_state, "preemption_sync_manager", None)


class PreemptionGuard:
    """A context manager: inside it, SIGTERM and SIGINT ask the train loop to stop and save.

    A second signal of the same kind while the first is being handled stops at once (the
    default action), in case saving hangs. Handlers are installed only from the main thread
    and the previous ones are put back on exit.
    """

    def __init__(self):
        self.signal_name: Optional[str] = None
        self._previous: dict = {}
        self._multi = _sync_manager() is not None
        self._announced = False

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is threading.main_thread():
            # With several processes JAX's sync manager owns SIGTERM; taking it would break it.
            sigs = (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT)
            for s in sigs:
                self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            # Second signal: stop now (SIGINT raises KeyboardInterrupt; SIGTERM terminates).
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signal_name = name
        print(f"\n{name}: finishing the current step and saving a checkpoint "
              f"(send {name} again to stop at once)", file=sys.stderr, flush=True)
        if self._multi and signum == signal.SIGINT:
            os.kill(os.getpid(), signal.SIGTERM)  # a preemption notice every process hears

    def should_stop(self, step: int) -> bool:
        """Whether to save and stop after `step` (the same answer on every process)."""
        if self._multi:
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop and self.signal_name is None:
                self.signal_name = "SIGTERM"  # the notice came to another process or via JAX
            return stop
        return self.signal_name is not None
