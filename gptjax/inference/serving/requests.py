"""A request as the server holds it: `Job` (one HTTP request and its channel of events back to the
handler) and `Row` (one choice being generated: its prompt, sampling settings and progress)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Optional

import jax
import numpy as np


@dataclasses.dataclass
class Row:
    """One choice being generated.

    The scheduler thread owns `sent` and `done` (tokens handed to the detokenizer, and whether
    the row's slot may be freed); the detokenizer thread owns the rest of the progress (`new_ids`,
    `text`, offsets, logprobs, `finish_reason`, times) and sets `done` when a stop string ends it.
    """
    ids: list
    key_data: np.ndarray
    temperature: float
    top_p: float
    max_tokens: int
    logprobs: Optional[int]
    stops: tuple
    index: int
    echo: Optional[str] = None  # echo=true: the prompt text the choice starts with
    sent: int = 0
    done: bool = False
    new_ids: list = dataclasses.field(default_factory=list)
    text: str = ""  # generated text only (stop strings look at it, not at the echoed prompt)
    emitted: int = 0
    prefix_offset: int = 0  # incremental detokenization (vLLM): new_ids[prefix:read] is the
    read_offset: int = 0    # context of the next decode, new_ids[:read] is already in `text`
    finish_reason: Optional[str] = None
    token_strs: list = dataclasses.field(default_factory=list)
    token_logprobs: list = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)
    first_at: Optional[float] = None  # time.monotonic() of the first and the latest token
    last_at: Optional[float] = None

    @property
    def scores_prompt(self) -> bool:
        """echo with logprobs: the prompt's tokens are scored in its prefill."""
        return self.echo is not None and self.logprobs is not None

    @property
    def needs_slot(self) -> bool:
        """Whether the row decodes (max_tokens=0, echo only: its prefill is all it needs)."""
        return self.max_tokens > 0


def make_row(ids, *, seed: int, temperature: float, top_p: float, max_tokens: int,
             logprobs: Optional[int], stops: tuple, index: int, echo: Optional[str] = None) -> Row:
    """A Row for one choice; its PRNG key is jax.random.key(seed mod 2**32), as `generate`'s.

    Args:
      ids: the prompt's token ids.
      seed, temperature, top_p, max_tokens, logprobs, stops: the choice's request settings.
      index: the choice's index in the response.
      echo: the prompt text to start the choice with (echo=true), or None; with `logprobs` the
        prompt's tokens and their log-probabilities come first too (`scores_prompt`).

    Returns:
      The Row, with nothing generated yet.
    """
    key_data = np.asarray(jax.random.key_data(jax.random.key(seed % 2**32)), np.uint32)
    return Row(list(ids), key_data, float(temperature), float(top_p), int(max_tokens),
               logprobs, tuple(stops), index, echo)


class Job:
    """One HTTP request: its rows, and a thread-safe channel of events back to its handler.

    Events (tuples) delivered to `queue` on `loop`: ("delta", row_index, text, logprobs or None),
    ("finish", row_index, reason), ("error", status, message, code).
    """

    def __init__(self, rows: list, loop: asyncio.AbstractEventLoop, deadline: float):
        self.rows = rows
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.deadline = deadline
        self.arrived = time.monotonic()
        self.cancelled = False
        self.finished = False

    def push(self, events: list) -> None:
        if events and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._put_all, events)
            except RuntimeError:  # loop closed meanwhile
                pass

    def _put_all(self, events):
        for e in events:
            self.queue.put_nowait(e)

    def cancel(self) -> None:
        self.cancelled = True
