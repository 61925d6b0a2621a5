"""The continuous-batching scheduler: a thread that keeps the engine's decode slots full.

Each turn of its loop: admit requests from the FIFO queue into free slots (prefill and insert, at
most `max_prefill_tokens` padded prompt tokens per turn, at least one request, so running rows keep
streaming while a burst arrives; a long request in a long slot, a short one in a short slot, where
one is free: `SlotEngine.pick_slot`), move each slot group's ring to the cache bucket its rows need
so far (`need_now`), dispatch one decode step over all slots, then read the previous step's tokens
(the device runs step k+1 while the host streams step k), emit them and free the slots of rows that
finished, were cancelled (client gone) or passed their deadline. A freed slot is taken by a waiting
request before the next step is dispatched.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Optional

import numpy as np

from gptjax.inference.serving.batcher import LoopThread, QueueFull
from gptjax.inference.serving.engine import Job
from gptjax.inference.serving.slots import SlotEngine, need, need_now

_TIMEOUT_MSG = "the request timed out before it finished (server busy); retry or raise " \
               "--request_timeout"


class ContinuousBatcher(LoopThread):
    """Continuous batching over a SlotEngine, with the same interface as `Batcher`.

    Args:
      engine: the SlotEngine.
      max_queue: most requests waiting for a slot; more are refused with QueueFull.
      max_prefill_tokens: padded prompt tokens prefilled per step at most (at least one request).
    """

    thread_name = "gptjax-scheduler"

    def __init__(self, engine: SlotEngine, max_queue: int = 64, max_prefill_tokens: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self._pending: collections.deque = collections.deque()  # (job, row), first come first
        self._slots: list = [None] * engine.slots  # (job, row) or None
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.stats = collections.Counter()
        self.steps = 0  # decode steps dispatched
        # (event, slot, steps dispatched before it, row index): what tests and debugging read.
        self.trace: collections.deque = collections.deque(maxlen=4096)

    # ------------------------------------------------------------------ the Batcher interface
    def submit(self, job: Job) -> None:
        """Queue a job's rows for free slots.

        Raises:
          QueueFull: `max_queue` live jobs are already waiting.
        """
        with self._cv:
            self._prune()
            waiting = self.queued()
            if waiting >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull(f"{waiting} requests are waiting (--max_queue={self.max_queue}); "
                                "retry later")
            self._pending.extend((job, r) for r in job.rows)
            self.stats["accepted"] += 1
            self._cv.notify_all()

    def queued(self) -> int:
        """Jobs with rows waiting for a slot whose clients are still there."""
        return len({id(j) for j, _ in list(self._pending) if not (j.cancelled or j.finished)})

    def running(self) -> int:
        """Slots holding a row."""
        return sum(s is not None for s in self._slots)

    def _prune(self) -> None:
        if any(j.cancelled or j.finished for j, _ in self._pending):
            self._pending = collections.deque(
                (j, r) for j, r in self._pending if not (j.cancelled or j.finished))

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        prev = None
        while not self._stop:
            try:
                self._admit()
                nxt = self._dispatch() if self.running() else None
                if prev is not None:
                    self._process(*prev)
                prev = nxt
            except Exception as e:  # keep serving; fail the running requests
                prev = None
                self._fail_all(e)
            if prev is None:
                with self._cv:
                    if not self._pending and not self._stop:
                        self._cv.wait(timeout=0.5)

    def _take(self, free: int) -> list:
        """Rows to admit now: first come first served, within the prefill cap."""
        taken, tokens, now = [], 0, time.monotonic()
        with self._cv:
            while self._pending and len(taken) < free:
                job, row = self._pending[0]
                if job.cancelled or job.finished:
                    self._pending.popleft()
                    continue
                if now > job.deadline:
                    self._pending.popleft()
                    self._expire(job)
                    continue
                P = self.engine.plan.prompt_bucket(len(row.ids))
                if taken and tokens + P > self.max_prefill_tokens:
                    break
                self._pending.popleft()
                taken.append((job, row))
                tokens += P
        return taken

    def _admit(self) -> None:
        free = [i for i, s in enumerate(self._slots) if s is None]
        taken = self._take(len(free)) if free else []
        placed, open_ = [], set(free)
        for job, row in taken:  # short and long rows in their own slot groups where they can
            slot = self.engine.pick_slot(need(row), open_)
            open_.discard(slot)
            placed.append(((job, row), slot))
        needs = {i: need_now(s[1]) for i, s in enumerate(self._slots) if s is not None}
        needs.update((slot, need_now(row)) for (_, row), slot in placed)
        self.engine.fit(needs)
        prefilled: dict = {}  # choices of one prompt (n > 1) share its prefill
        for (job, row), slot in placed:
            key = tuple(row.ids)
            if key not in prefilled:
                prefilled[key] = self.engine.prefill(row.ids)
            self.engine.insert(prefilled[key], row, slot)
            self._slots[slot] = (job, row)
            self.trace.append(("insert", slot, self.steps, row.index))
            self.stats["rows"] += 1

    def _dispatch(self) -> tuple:
        active = np.array([s is not None for s in self._slots])
        out = self.engine.generate(active)
        self.steps += 1
        self.stats["steps"] += 1
        return out, list(self._slots)

    def _free(self, slot: int, why: str) -> None:
        self._slots[slot] = None
        self.trace.append((why, slot, self.steps, -1))

    def _expire(self, job: Job) -> None:
        if not job.finished:
            job.finished = True
            self.stats["timed_out"] += 1
            job.push([("error", 503, _TIMEOUT_MSG, "timeout")])

    def _process(self, out, snapshot: list) -> None:
        """Read one step's tokens: emit them per job, free the slots of rows that are done."""
        tok_B, lp_B, top_v, top_i = self.engine.read(out)
        now = time.monotonic()
        events: dict = {}
        for b, item in enumerate(snapshot[:len(tok_B)]):  # the step's row bucket
            if item is None or self._slots[b] is not item:
                continue  # the row left its slot after this step was dispatched
            job, row = item
            if job.cancelled or job.finished or now > job.deadline:
                if not (job.cancelled or job.finished):
                    self._expire(job)
                self._free(b, "cancel" if job.cancelled else "timeout")
                continue
            self.stats["tokens"] += 1
            delta, lp = self.engine._advance(row, int(tok_B[b]), float(lp_B[b]), top_v[b],
                                             top_i[b])
            evs = events.setdefault(id(job), (job, []))[1]
            if delta or lp is not None:
                evs.append(("delta", row.index, delta, lp))
            if row.finish_reason is not None:
                evs.append(("finish", row.index, row.finish_reason))
                self._free(b, "finish")
        for job, evs in events.values():
            job.push(evs)

    def _fail_all(self, e: Exception) -> None:
        self.stats["failed_steps"] += 1
        jobs = {id(s[0]): s[0] for s in self._slots if s is not None}
        self._slots = [None] * len(self._slots)
        self.engine.reset()  # the donated state may be gone
        for job in jobs.values():
            job.finished = True
            job.push([("error", 500, f"generation failed: {type(e).__name__}: {e}",
                       "internal_error")])
