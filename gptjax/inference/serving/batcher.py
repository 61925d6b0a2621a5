"""The batcher: a background thread that groups queued requests into waves for the engine.

Requests that arrive together (up to the largest batch bucket; after the first, it waits up to
`batch_window_s` for as many rows as the previous wave had) are decoded as one wave; a wave runs
until all its rows finish, then the next one starts (static batching: a long request holds its
wave's batch mates back; rows never join a running wave).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Optional

from gptjax.inference.serving.engine import Engine, Job

class QueueFull(Exception):
    """The server has `max_queue` requests waiting."""


class LoopThread:
    """start/stop of the daemon thread that runs `self._loop` (waves, or scheduler steps); the
    subclass sets `_cv` (a Condition), `_stop` and `_thread`, and its loop ends on `_stop`."""

    thread_name = "gptjax-loop"

    def start(self) -> None:
        """Start the thread."""
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current wave or step (waits up to 30 s)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)


class Batcher(LoopThread):
    """A background thread that groups queued jobs into waves and runs them on the engine.

    Args:
      engine: the Engine.
      max_queue: most requests waiting (not yet in a wave); more are refused with QueueFull.
      batch_window_s: after the first request of a wave arrives, the longest wait for as many
        rows as the previous wave had.
    """

    thread_name = "gptjax-batcher"

    def __init__(self, engine: Engine, max_queue: int = 64, batch_window_s: float = 0.05):
        self.engine = engine
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self._pending: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._last_rows = 1
        self._running = 0
        self.stats = collections.Counter()

    def submit(self, job: Job) -> None:
        """Queue a job for the next wave that fits it.

        Raises:
          QueueFull: `max_queue` live jobs are already waiting.
        """
        with self._cv:
            # Requests whose clients gave up (timeout, disconnect) no longer hold a place.
            if any(j.cancelled or j.finished for j in self._pending):
                self._pending = collections.deque(
                    j for j in self._pending if not (j.cancelled or j.finished))
            if len(self._pending) >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"{len(self._pending)} requests are waiting (--max_queue="
                                f"{self.max_queue}); retry later")
            self._pending.append(job)
            self.stats["accepted"] += 1
            self._cv.notify_all()

    def queued(self) -> int:
        """Jobs waiting for a wave whose clients are still there."""
        return sum(1 for j in list(self._pending) if not (j.cancelled or j.finished))

    def running(self) -> int:
        """Rows of the wave being decoded (including those that finished early)."""
        return self._running

    def _take_wave(self) -> list:
        """Jobs for the next wave: the oldest first, then whoever fits within the batch window."""
        plan = self.engine.plan
        with self._cv:
            while not self._pending and not self._stop:
                self._cv.wait(timeout=0.5)
            if self._stop:
                return []
            # Wait (up to the window) until as many rows are queued as the last wave had: clients
            # that were answered together tend to come back together, and a wave started with
            # the first of them would hold the rest back for a whole wave. A lone client waits
            # for nobody (its last wave had one row).
            target = min(plan.max_rows, max(1, self._last_rows))
            first_at = time.monotonic()
            while (sum(len(j.rows) for j in self._pending) < target
                   and time.monotonic() - first_at < self.batch_window_s and not self._stop):
                self._cv.wait(timeout=self.batch_window_s - (time.monotonic() - first_at))
            wave, rows, keep = [], [], collections.deque()
            now = time.monotonic()
            while self._pending:
                job = self._pending.popleft()
                if job.cancelled or job.finished:
                    continue
                if now > job.deadline:
                    job.finished = True
                    self.stats["timed_out"] += 1
                    job.push([("error", 503, "the request timed out in the queue (server busy); "
                               "retry or raise --request_timeout", "timeout")])
                    continue
                cand = rows + job.rows
                fits = len(cand) <= plan.max_rows and plan.shape_of(
                    [len(r.ids) for r in cand], [r.max_tokens for r in cand]) in plan.pairs
                if fits:
                    wave.append(job)
                    rows = cand
                else:
                    keep.append(job)
            self._pending.extendleft(reversed(keep))
            return wave

    def _loop(self) -> None:
        while not self._stop:
            wave = self._take_wave()
            if not wave:
                continue
            items = [(job, r) for job in wave for r in job.rows]
            self._last_rows = self._running = len(items)
            try:
                self.stats["tokens"] += self.engine.run_wave(items)
                self.stats["waves"] += 1
                self.stats["rows"] += len(items)
            except Exception as e:  # keep serving; fail this wave's requests
                self.stats["failed_waves"] += 1
                for job in wave:
                    job.finished = True
                    job.push([("error", 500, f"generation failed: {type(e).__name__}: {e}",
                               "internal_error")])
            self._running = 0

