"""The loss-spike guard (`train.spike_guard`): the host side of a test the train step applies.

The step itself (gptjax.train.step, `spike_guard=True`) takes one more argument, a float32
`spike_limit`, and keeps its parameters and optimizer state (the per-element select of the
non-finite policy) when its finite loss is above it. The limit of 0-based step k comes from the
losses of the trained (not skipped) steps up to k-2, the last `train.spike_window` of them: the
loop fetches metrics one step late, so when step k is dispatched the loss of k-2 is on the host
and the guard costs no synchronisation. 'median' skips a loss above `spike_threshold` times the
window's median; 'zscore' one above mean + `spike_threshold` standard deviations (taken as at
least 1% of the mean, so a flat loss does not make every rise a spike). Until the window is full
the limit is +inf. A `data.mixture_schedule` weight change starts the window again (the new
mixture's loss is another level): until it is full again the limit is +inf.

Each spike is a line of `<workdir>/spikes.jsonl` (its 1-based step, loss, limit and data
position: the batcher's state and the batch's index, a batch being a pure function of both). A
run that starts in the directory skips every batch recorded there at or after its first step
(limit -inf), whatever its loss: after a crash or a rollback to an earlier checkpoint the batches
are skipped again, and a user may add lines to skip batches by hand. `spike_max` spikes within
`spike_window` steps stop the run (FloatingPointError: `error: ...`, exit 2); a recorded batch
skipped again does not count anew, so the same command after such a stop goes on past the
batches that stopped it. The window and the spikes counted are saved with each checkpoint, so a
resumed run decides as the uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Optional

import ml_collections
import numpy as np

SPIKES = "spikes.jsonl"
MODES = ("off", "median", "zscore")
META_KEY = "spike_guard"  # the checkpoint metadata's entry


def enabled(tc: ml_collections.ConfigDict) -> bool:
    """Whether `train.spike_guard` is on (the train step takes a `spike_limit` then)."""
    return tc.spike_guard != "off"


def read_records(workdir: str) -> list:
    """The records of `<workdir>/spikes.jsonl` ([] without one).

    Raises:
      ValueError: for a line that is not a JSON object with an integer `step` >= 1.
    """
    path = os.path.join(workdir, SPIKES)
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ok = isinstance(rec, dict) and type(rec.get("step")) is int and rec["step"] >= 1
            except json.JSONDecodeError:
                ok = False
            if not ok:
                raise ValueError(f"{path} line {i}: {line.strip()[:80]!r}; allowed: a JSON "
                                 "object with an integer 'step' >= 1 (the 1-based step to skip)")
            records.append(rec)
    return records


def _batches(data_state: dict) -> dict:
    """The part of a batcher's state that a recorded batch must match: all of it but a
    mixture's schedule, to which a resumed run may add phases after its first step (the batcher
    refuses other changes on resume)."""
    return {k: v for k, v in data_state.items() if k != "mixture_schedule"}


class NoGuard:
    """`train.spike_guard='off'`: the step takes no limit and nothing is recorded."""

    halt: Optional[str] = None

    def args(self, step: int) -> tuple:
        return ()

    def observe(self, step: int, m: dict) -> None:
        pass

    def meta(self) -> dict:
        return {}

    def log_fields(self, m: dict) -> dict:
        return {}


class SpikeGuard(NoGuard):
    """The running window, the recorded batches and the spike count of one run."""

    def __init__(self, mode: str, threshold: float, window: int, max_spikes: int, *,
                 workdir: str = "", data_state: Optional[dict] = None, start: int = 0,
                 saved: Optional[dict] = None, write: bool = True, resets: tuple = ()):
        """
        Args:
          mode: 'median' or 'zscore'.
          threshold: the multiple of the median, or the standard deviations above the mean.
          window: losses in the statistic, and the steps within which `max_spikes` stop the run.
          max_spikes: spikes within `window` steps that stop the run (0: never).
          workdir: where spikes.jsonl is ('' : nowhere, nothing recorded or read).
          data_state: the batcher's `state()` (records of other data are ignored).
          start: the run's first 0-based step.
          saved: what a checkpoint saved (`meta()`), when resuming.
          write: whether this process writes spikes.jsonl (process 0).
          resets: 0-based steps from which the window starts again (a data.mixture_schedule
            phase: a new mixture's loss is another level, not a spike).
        """
        self.mode, self.threshold, self.window, self.max_spikes = mode, threshold, window, \
            max_spikes
        self.path = os.path.join(workdir, SPIKES) if workdir else ""
        self.data_state, self.write = dict(data_state or {}), write
        self.resets = tuple(sorted(int(r) for r in resets))
        saved = saved or {}
        self.history = [(int(s), float(v)) for s, v in saved.get("window", [])]  # (step, loss)
        self.counted = [int(s) for s in saved.get("spikes", [])]  # 0-based steps of spikes
        self.halt = None
        self.found = 0  # spikes found by this process's run (warnings: the first 10, then 1%)
        self.recorded = self._recorded(start)  # 0-based steps skipped whatever their loss

    def _recorded(self, start: int) -> set:
        if not self.path:
            return set()
        steps, other = set(), 0
        for rec in read_records(os.path.dirname(self.path)):
            data = dict(rec.get("data") or {})
            data.pop("step", None)
            if data and self.data_state and _batches(data) != _batches(self.data_state):
                other += 1
            elif rec["step"] - 1 >= start:
                steps.add(rec["step"] - 1)
        if other and self.write:
            print(f"warning: {self.path}: {other} record(s) of other data (another batcher "
                  "state) ignored", file=sys.stderr, flush=True)
        if steps and self.write:
            print(f"skipping the {len(steps)} batch(es) {self.path} records at steps "
                  f"{sorted(s + 1 for s in steps)}", flush=True)
        return steps

    def limit(self, step: int) -> float:
        """The loss above which 0-based `step` is skipped (+inf until the window is full)."""
        if step in self.recorded:
            return -math.inf
        since = max([r for r in self.resets if r <= step], default=0)  # (its phase's losses)
        losses = [v for s, v in self.history if since <= s <= step - 2][-self.window:]
        if len(losses) < self.window:
            return math.inf
        x = np.asarray(losses, np.float64)
        if self.mode == "median":
            return float(self.threshold * np.median(x))
        mean = float(np.mean(x))
        return mean + self.threshold * max(float(np.std(x)), 0.01 * abs(mean))

    def args(self, step: int) -> tuple:
        """The train step's extra argument for `step`: (float32 limit,)."""
        return (np.float32(self.limit(step)),)

    def observe(self, step: int, m: dict) -> None:
        """Step `step`'s fetched metrics: a spike is recorded and counted (and may set `halt`);
        the loss of a trained step joins the window."""
        if not m["spike"]:
            if not m["skipped"]:
                self.history = (self.history + [(step, m["loss"])])[-(self.window + 2):]
            return
        if step in self.recorded:
            return  # skipped again: recorded and counted by the attempt that found it
        limit = float(np.float32(self.limit(step)))  # as the step compared it
        self.counted = [s for s in self.counted if s > step - self.window] + [step]
        self.found += 1
        if self.write and self.path:
            if self.found <= 10 or self.found % 100 == 0:  # (spike_max=0 may skip many)
                print(f"warning: step {step + 1}: loss {m['loss']:.4g} above the spike limit "
                      f"{limit:.4g} (train.spike_guard={self.mode!r}), update skipped; recorded "
                      f"in {self.path}", file=sys.stderr, flush=True)
            rec = dict(step=step + 1, loss=m["loss"], limit=limit, mode=self.mode,
                       data=dict(self.data_state, step=step))
            with open(self.path, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        if 0 < self.max_spikes <= len(self.counted) and self.halt is None:
            steps = ", ".join(str(s + 1) for s in self.counted)
            self.halt = (f"{len(self.counted)} loss spikes within {self.window} steps (steps "
                         f"{steps}; train.spike_max={self.max_spikes}): the run stopped; "
                         f"{self.path} records them and the same command skips them (a "
                         "loss that rose to stay halts again: resume with a higher "
                         "train.spike_threshold or train.spike_guard='off')")

    def meta(self) -> dict:
        """What a checkpoint saves (JSON): the window's losses and the spikes counted."""
        return {META_KEY: {"window": [[s, v] for s, v in self.history],
                           "spikes": list(self.counted)}}

    def log_fields(self, m: dict) -> dict:
        """metrics.jsonl's field: whether the step was skipped as a spike."""
        return {"spike": int(m["spike"])}


def make_guard(tc: ml_collections.ConfigDict, workdir: str, data_state: dict, start: int,
               saved: Optional[dict], write: bool, resets: tuple = ()) -> NoGuard:
    """The run's guard: a SpikeGuard when `train.spike_guard` is on, else a NoGuard; `resets`:
    the 0-based steps where its window starts again (a mixture's weight changes)."""
    if not enabled(tc):
        return NoGuard()
    return SpikeGuard(tc.spike_guard, tc.spike_threshold, tc.spike_window, tc.spike_max,
                      workdir=workdir, data_state=data_state, start=start, saved=saved,
                      write=write, resets=resets)
