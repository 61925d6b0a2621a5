"""The scheduler: one thread that keeps the engine's decode slots full.

Each turn: free the slots of rows that ended (finished, stopped by a stop string on the
detokenizer's thread, cancelled because the client left, or past their deadline); admit waiting
requests first come first served into free slots while pages are free (prefill and insert, at
most `max_prefill_tokens` padded prompt tokens per turn and at least one request, so running
rows keep streaming while a burst arrives); dispatch one decode step over all slots; then read
the previous turn's tokens (the device runs step k+1 while the host reads step k) and hand them
to the detokenizer thread, which turns them into text and events. A request whose rows do not
fit the queue (`max_queue` waiting) is refused with QueueFull (HTTP 429 with Retry-After).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any, Optional

import numpy as np

from gptjax.inference.serving.detok import Detokenizer
from gptjax.inference.serving.engine import Engine
from gptjax.inference.serving.requests import Job

TIMEOUT_MSG = ("the request timed out before it finished (server busy); retry or raise "
               "--request_timeout")


class QueueFull(Exception):
    """The server has `max_queue` requests waiting."""


class Scheduler:
    """The device loop's thread over an Engine, with a Detokenizer thread for the output.

    Args:
      engine: the Engine.
      tokenizer: for the detokenizer (and its end-of-text id).
      metrics: the server's ServerMetrics: every counter is reported there.
      max_queue: most requests waiting for a slot; more are refused with QueueFull.
      max_prefill_tokens: padded prompt tokens prefilled per turn at most (at least one request).
    """

    def __init__(self, engine: Engine, tokenizer: Any, metrics: Any, *, max_queue: int = 64,
                 max_prefill_tokens: int = 256):
        self.engine = engine
        self.metrics = metrics
        self.eos_id = tokenizer.eos_id
        self.detok = Detokenizer(tokenizer, metrics)
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self._pending: collections.deque = collections.deque()  # (job, row), first come first
        self._slots: list = [None] * engine.slots  # (job, row) or None
        self._prompt_only: dict = {}  # id(row) -> job: prompt-only rows prefilled, not yet read
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.steps = 0  # decode steps dispatched
        # (event, slot, steps dispatched before it, row index): what tests and debugging read.
        self.trace: collections.deque = collections.deque(maxlen=4096)
        metrics.watch(queued=self.queued, running=self.running, slots=engine.slots)

    # ------------------------------------------------------------------ requests in
    def submit(self, job: Job) -> None:
        """Queue a job's rows for free slots.

        Raises:
          QueueFull: `max_queue` live jobs are already waiting.
        """
        with self._cv:
            self._prune()
            waiting = self.queued()
            if waiting >= self.max_queue:
                self.metrics.count("rejected_queue_full")
                raise QueueFull(f"{waiting} requests are waiting (--max_queue={self.max_queue}); "
                                "retry later")
            self._pending.extend((job, r) for r in job.rows)
            self.metrics.count("accepted")
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

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        """Start the scheduler and detokenizer threads."""
        self.detok.start()
        self._thread = threading.Thread(target=self._loop, name="gptjax-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop after the current turn (waits up to 30 s), then the detokenizer."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.detok.stop()

    def _loop(self) -> None:
        prev = None
        while not self._stop:
            try:
                self._sweep()
                inserted = self._admit()
                nxt = self._dispatch(inserted)
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

    # ------------------------------------------------------------------ one turn
    def _free(self, slot: int, why: str) -> None:
        self._slots[slot] = None
        self.engine.release(slot)
        self.trace.append((why, slot, self.steps, -1))

    def _expire(self, job: Job) -> None:
        if not job.finished:
            job.finished = True
            self.metrics.count("timed_out")
            job.push([("error", 503, TIMEOUT_MSG, "timeout")])

    def _sweep(self) -> None:
        """Free the slots of rows that ended, were cancelled or passed their deadline."""
        now = time.monotonic()
        for b, item in enumerate(self._slots):
            if item is None:
                continue
            job, row = item
            if row.done:
                self._free(b, "finish")
            elif job.cancelled or job.finished or now > job.deadline:
                if not (job.cancelled or job.finished):
                    self._expire(job)
                self._free(b, "cancel" if job.cancelled else "timeout")

    def _take(self) -> list:
        """Rows to admit now: first come first served, within free slots, pages and the cap.

        A prompt-only row (echo with max_tokens=0) needs neither a slot nor pages: its prefill
        is its whole answer."""
        eng = self.engine
        free, pages = len(eng.free_slots()), len(eng.free_pages)
        taken, tokens, now = [], 0, time.monotonic()
        with self._cv:
            while self._pending:
                job, row = self._pending[0]
                if job.cancelled or job.finished:
                    self._pending.popleft()
                    continue
                if now > job.deadline:
                    self._pending.popleft()
                    self._expire(job)
                    continue
                P = eng.prompt_bucket(len(row.ids))
                slot = int(row.needs_slot)
                need = eng.pages_for(len(row.ids), row.max_tokens) if slot else 0
                if (taken and tokens + P > self.max_prefill_tokens) or need > pages or slot > free:
                    break  # the head waits (FIFO): nothing overtakes it
                self._pending.popleft()
                taken.append((job, row))
                tokens, pages, free = tokens + P, pages - need, free - slot
        return taken

    def _admit(self) -> list:
        """Prefill and insert the rows taken; returns [(slot or None, item, first-token outputs
        or None, prompt scores or None)] (slot None: a prompt-only row, not inserted)."""
        inserted, prefixes = [], {}  # choices of one prompt (n > 1) share its prefill
        for job, row in self._take():
            key = (tuple(row.ids), row.scores_prompt)
            if key not in prefixes:
                prefixes[key] = self.engine.prefill(row.ids, score=row.scores_prompt)
                self.metrics.count("prefill_tokens", self.engine.prompt_bucket(len(row.ids)))
            prefix = prefixes[key]
            item, slot, out = (job, row), None, None
            if row.needs_slot:
                slot = self.engine.free_slots()[0]
                out = self.engine.insert(prefix, slot, length=len(row.ids),
                                         max_tokens=row.max_tokens, key_data=row.key_data,
                                         temperature=row.temperature, top_p=row.top_p)
                self._slots[slot] = item
                self.trace.append(("insert", slot, self.steps, row.index))
            else:
                self._prompt_only[id(row)] = job
            self.metrics.count("rows")
            inserted.append((slot, item, out, prefix[2]))
        return inserted

    def _dispatch(self, inserted: list) -> Optional[tuple]:
        step = self.engine.generate()
        if step is not None:
            self.steps += 1
            self.metrics.count("steps")
        if step is None and not inserted:
            return None
        return inserted, step, list(self._slots)

    def _process(self, inserted: list, step: Optional[tuple], snapshot: list) -> None:
        """Read one turn's outputs (echoed prompts' scores and inserts' first tokens, then the
        step's tokens) and hand them over."""
        firsts, outs = self.engine.read(([(o, sc) for _, _, o, sc in inserted],
                                         None if step is None else step[0]))
        t0 = time.thread_time()
        items = []
        for (slot, item, _, _), (out, scores) in zip(inserted, firsts):
            if slot is None:
                self._prompt_only.pop(id(item[1]), None)
            if item[1].echo is not None:
                self._emit_echo(items, slot, item, scores)
            if slot is not None:
                self._emit(items, slot, item, [x[0] for x in out])
        if step is not None:
            for b in np.flatnonzero(step[1]):
                if snapshot[b] is not None:
                    self._emit(items, b, snapshot[b], [x[b] for x in outs])
        self.detok.put(items)
        self.metrics.add_host_time("scheduler", time.thread_time() - t0, len(items))

    def _emit_echo(self, items: list, slot: Optional[int], item: tuple, scores) -> None:
        """An echo=true row's prompt (with its scores); a prompt-only row ends with it."""
        job, row = item
        if (slot is not None and self._slots[slot] is not item) or row.done or job.cancelled \
                or job.finished:
            return
        finish = None if row.needs_slot else "length"
        if finish is not None:
            row.done = True
        items.append((job, row, None, scores, None, None, finish))

    def _emit(self, items: list, slot: int, item: tuple, out: list) -> None:
        job, row = item
        if self._slots[slot] is not item or row.done or job.cancelled or job.finished:
            return  # the row left its slot, or ended, after this step was dispatched
        row.sent += 1
        self.metrics.count("tokens")
        token = int(out[0])
        finish = None
        if self.eos_id is not None and token == self.eos_id:
            finish = "stop"
        elif row.sent >= row.max_tokens:
            finish = "length"
        if finish is not None:
            row.done = True  # the slot is freed at the next turn's sweep
        items.append((job, row, token, float(out[1]), out[2], out[3], finish))

    def _fail_all(self, e: Exception) -> None:
        self.metrics.count("failed_steps")
        jobs = {id(s[0]): s[0] for s in self._slots if s is not None}
        jobs.update((id(j), j) for j in self._prompt_only.values())
        self._slots = [None] * len(self._slots)
        self._prompt_only = {}
        self.engine.reset()  # the donated state may be gone
        for job in jobs.values():
            job.finished = True
            job.push([("error", 500, f"generation failed: {type(e).__name__}: {e}",
                       "internal_error")])
