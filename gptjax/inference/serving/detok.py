"""Detokenization on its own thread: token ids in, text deltas, logprobs and stop strings out.

The scheduler thread hands each token it reads to `Detokenizer.put` and goes back to the device
loop; this thread turns tokens into events for the request's handler. Text is decoded
incrementally, as vLLM's detokenizer does: only the row's tail `new_ids[prefix_offset:]` is
decoded, against the text of `new_ids[prefix_offset:read_offset]` decoded the same way, and
what the tail adds is appended once it is complete (no trailing U+FFFD: a multi-byte character
split over tokens waits for its last byte). The cost per token is then constant, not the length
of the output so far. Text that may be the start of a stop string is held back until it is not;
a stop string ends the row (`Row.done`, which the scheduler reads to free its slot). An echo=true
row starts with its prompt's text (and, with logprobs, its tokens' log-probabilities).
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


def _top(tok: Any, top_v, top_i, k: int) -> Optional[dict]:
    """The k most likely tokens as {text: logprob} (None for logprobs=0, as OpenAI)."""
    if k <= 0:
        return None
    top: dict = {}
    for v, i in zip(top_v[:k], top_i[:k]):
        top.setdefault(tok.decode([int(i)]), float(v))
    return top


def echo_prompt(tok: Any, row: Row, scores, finish: Optional[str]) -> tuple:
    """The start of an echo=true choice: returns (the prompt's text, logprobs entry or None).

    With logprobs, the entry holds every prompt token with its log-probability given the tokens
    before it and the top alternatives there; the first token's are null (nothing predicts it),
    as in OpenAI's legacy completions. `scores` are `_prefill_core`'s, over the prompt's bucket
    (left-padded): position j scores token j + 1, so the prompt's tokens 1..L-1 are read at
    P - L .. P - 2. `finish` ends the row here (max_tokens=0).
    """
    row.first_at = row.last_at = time.monotonic()
    lp = None
    if row.logprobs is not None:
        chosen_P, top_v_PxK, top_i_PxK = scores
        P, L = len(chosen_P), len(row.ids)
        strs = [tok.decode([int(t)]) for t in row.ids]
        lps = [None] + [float(x) for x in chosen_P[P - L:P - 1]]
        tops = [None] + [_top(tok, top_v_PxK[j], top_i_PxK[j], row.logprobs)
                         for j in range(P - L, P - 1)]
        lp = {"tokens": strs, "token_logprobs": lps, "top_logprobs": tops}
        row.token_strs += strs
        row.token_logprobs += lps
        row.top_logprobs += tops
    if finish is not None:
        row.finish_reason = finish
    return row.echo, lp


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
        top = _top(tok, top_v, top_i, row.logprobs)
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
        """Hand over one step's tokens: [(job, row, token, logprob, top_v, top_i, finish)]; an
        echoed prompt comes as token None with its prompt scores (or None) in place of logprob."""
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
            if token is None:
                delta, lp = echo_prompt(self.tok, row, logprob, finish)
            else:
                delta, lp = advance(self.tok, self.eos_id, row, token, logprob, top_v, top_i,
                                    finish)
            evs = events.setdefault(id(job), (job, []))[1]
            if delta or lp is not None:
                evs.append(("delta", row.index, delta, lp))
            if row.finish_reason is not None:
                row.done = True
                evs.append(("finish", row.index, row.finish_reason))
        for job, evs in events.values():
            job.push(evs)
