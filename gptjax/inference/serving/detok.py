"""Detokenization on its own thread: token ids in, text deltas, logprobs and stop strings out.

The scheduler thread hands each token it reads to `Detokenizer.put` and goes back to the device
loop; this thread turns tokens into events for the request's handler. Text is decoded
incrementally, as vLLM's detokenizer does: only the row's tail `new_ids[prefix_offset:]` is
decoded, against the text of `new_ids[prefix_offset:read_offset]` decoded the same way, and
what the tail adds is appended once it is complete (no trailing U+FFFD: a multi-byte character
split over tokens waits for its last byte). The cost per token is then constant, not the length
of the output so far. Text that may be the start of a stop string is held back until it is not;
a stop string ends the row (`Row.done`, which the scheduler reads to free its slot).
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Optional

from gptjax.inference.serving.requests import Row

# Tokens of context decoded before the new ones (vLLM uses 5): enough for a BPE tokenizer's
# merges at the boundary to decode as they do in the whole text.
CONTEXT_TOKENS = 5


def held_back(text: str, stops: tuple) -> int:
    """Length of the longest suffix of `text` that begins some stop string (not yet emitted)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def append_text(tok: Any, row: Row) -> None:
    """Append the text of `row.new_ids[row.read_offset:]` to `row.text`, decoding only the tail."""
    ids = row.new_ids
    before = tok.decode(ids[row.prefix_offset:row.read_offset])
    after = tok.decode(ids[row.prefix_offset:])
    if len(after) > len(before) and not after.endswith("\ufffd"):
        row.text += after[len(before):]
        row.prefix_offset = max(0, len(ids) - CONTEXT_TOKENS)
        row.read_offset = len(ids)


def flush_text(tok: Any, row: Row) -> None:
    """Append whatever the tail still holds, complete or not (the row ends here)."""
    if row.read_offset < len(row.new_ids):
        before = tok.decode(row.new_ids[row.prefix_offset:row.read_offset])
        row.text += tok.decode(row.new_ids[row.prefix_offset:])[len(before):]
        row.read_offset = len(row.new_ids)


def advance(tok: Any, eos_id: Optional[int], row: Row, token: int, logprob: float, top_v,
            top_i, finish: Optional[str]) -> tuple:
    """One token of a row: returns (text to emit, logprobs entry or None); sets
    `row.finish_reason` when the row ends here (`finish` from the scheduler, or a stop string)."""
    lp = None
    row.last_at = time.monotonic()
    if row.first_at is None:
        row.first_at = row.last_at
    if row.logprobs is not None:
        s = tok.decode([token])
        top = None
        if row.logprobs > 0:
            top = {}
            for v, i in zip(top_v[:row.logprobs], top_i[:row.logprobs]):
                top.setdefault(tok.decode([int(i)]), float(v))
        lp = {"tokens": [s], "token_logprobs": [logprob], "top_logprobs": [top]}
        row.token_strs.append(s)
        row.token_logprobs.append(logprob)
        row.top_logprobs.append(top)
    row.new_ids.append(token)
    if eos_id is not None and token == eos_id:
        row.finish_reason = "stop"
    else:
        start = max(0, row.emitted - max((len(s) for s in row.stops), default=0))
        append_text(tok, row)
        # A stop string can only end in text added now, so search from where it could begin.
        hits = [i for i in (row.text.find(s, start) for s in row.stops) if i >= 0]
        if hits:
            row.text = row.text[:min(hits)]
            row.finish_reason = "stop"
        elif finish is not None:
            flush_text(tok, row)  # the last token may end inside a character: decode it as is
            row.finish_reason = finish
    if row.finish_reason is not None:
        safe = len(row.text)
    else:
        safe = len(row.text) - held_back(row.text[row.emitted:], row.stops)
    delta = row.text[row.emitted:safe] if safe > row.emitted else ""
    row.emitted = max(row.emitted, safe)
    return delta, lp


class Detokenizer:
    """The detokenization thread: `put` tokens from the scheduler, events go to their jobs.

    Args:
      tokenizer: decodes ids to text.
      metrics: the server's ServerMetrics (host time and finished requests are reported there).
    """

    def __init__(self, tokenizer: Any, metrics: Any):
        self.tok = tokenizer
        self.eos_id = tokenizer.eos_id
        self.metrics = metrics
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: Optional[threading.Thread] = None

    def put(self, items: list) -> None:
        """Hand over one step's tokens: [(job, row, token, logprob, top_v, top_i, finish)]."""
        if items:
            self._q.put(items)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gptjax-detokenizer",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            items = self._q.get()
            if items is None:
                return
            t0 = time.thread_time()
            self.handle(items)
            self.metrics.add_host_time("detokenizer", time.thread_time() - t0, len(items))

    def handle(self, items: list) -> None:
        """Turn one step's tokens into events, one push per job."""
        events: dict = {}
        for job, row, token, logprob, top_v, top_i, finish in items:
            if row.finish_reason is not None or job.finished:
                continue  # e.g. a token decoded after a stop string ended the row
            delta, lp = advance(self.tok, self.eos_id, row, token, logprob, top_v, top_i, finish)
            evs = events.setdefault(id(job), (job, []))[1]
            if delta or lp is not None:
                evs.append(("delta", row.index, delta, lp))
            if row.finish_reason is not None:
                row.done = True
                evs.append(("finish", row.index, row.finish_reason))
        for job, evs in events.values():
            job.push(evs)
