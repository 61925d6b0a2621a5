"""Training batches built ahead on a thread: a batcher's `batch(step)` for the next steps.

Batches are a pure function of the step (gptjax.data.lm, gptjax.data.sharded), so building them
ahead changes nothing but when: `Prefetcher.batch(step)` returns exactly `batcher.batch(step)`.
A step other than the next one (the first call, a resume) restarts the thread there. The time a
caller waits is counted (`wait_s`), so the loop can report whether data ever starves the step.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from gptjax.data.batcher import Batcher


class Prefetcher:
    """A `Batcher` that builds the wrapped batcher's batches ahead; `state()` and `restore()`
    are the wrapped batcher's.

    Args:
      batcher: the batcher to wrap (`.batcher`).
      depth: batches built ahead (>= 1).
    """

    def __init__(self, batcher: Batcher, depth: int = 2):
        if depth < 1:
            raise ValueError(f"data.prefetch={depth}: allowed: 0 (no thread) or more")
        self.batcher, self.depth = batcher, int(depth)
        self.wait_s = 0.0  # seconds callers waited in batch(), summed
        self._next, self._queue, self._stop, self._thread = None, None, None, None

    def state(self) -> dict[str, Any]:
        """The wrapped batcher's `state()`."""
        return self.batcher.state()

    def restore(self, state: dict[str, Any]) -> None:
        """The wrapped batcher's `restore(state)`."""
        self.batcher.restore(state)

    def _start(self, step: int) -> None:
        self._stop_thread()
        self._queue, self._stop = queue.Queue(self.depth), threading.Event()
        q, stop = self._queue, self._stop

        def work(s):
            while not stop.is_set():
                try:
                    item = (s, self.batcher.batch(s), None)
                except Exception as e:  # noqa: BLE001 - handed to the caller of batch()
                    item = (s, None, e)
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if item[2] is not None:
                    return
                s += 1

        self._thread = threading.Thread(target=work, args=(step,), name="gptjax-prefetch",
                                        daemon=True)
        self._thread.start()
        self._next = step

    def batch(self, step: int) -> dict:
        """`batcher.batch(step)`, usually already built."""
        t = time.perf_counter()
        if step != self._next:
            self._start(step)
        s, b, err = self._queue.get()
        self.wait_s += time.perf_counter() - t
        self._next = s + 1
        if err is not None:
            self._next = None
            raise err
        return b

    def close(self) -> None:
        """Stop the thread (a later batch() starts it again), then close the wrapped batcher."""
        self._stop_thread()
        self.batcher.close()

    def _stop_thread(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._thread.join(timeout=10)
        self._next = self._queue = self._stop = self._thread = None
