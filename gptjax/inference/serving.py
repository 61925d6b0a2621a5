"""Serving: an OpenAI-style completions API (FastAPI + uvicorn) over a batched KV-cache decoder.

Layers, bottom up:
  * `sample_rows` and the jitted `_prefill_core` / `_pad_cache` / `_step_core`: the per-step
    device work. Every row has its own PRNG key, temperature and top_p, so a row's output does
    not depend on which other rows share its batch: row r's token t is drawn exactly as
    `gptjax.inference.sampling.generate([prompt_r], rng=key_r)` draws it (key fold_in(key_r, t), the
    same warping), so a completion equals `generate` with the same seed.
  * `ShapePlan`: the fixed set of compiled shapes. Batches are padded to a batch bucket B,
    prompts left-padded to a prompt bucket P, and the cache has S = next power of two
    >= P + max_tokens slots. `Engine.warmup` compiles every (B, P) prefill and (B, S) decode
    step a request can reach; the batcher never forms a batch outside that set, so no request
    compiles after warm-up (`compilations()` counts XLA compiles; /health reports them).
  * `Engine`: model, tokenizer and plan; `run_wave` decodes one batch of rows step by step on the
    host (one device round trip per token, the next step dispatched before the last one is read),
    which is what makes streaming, stop strings, cancellation and timeouts per row possible.
  * `Batcher`: a background thread with a bounded queue. Requests that arrive together (up to
    the largest batch bucket; after the first, it waits up to `batch_window_s` for as many rows
    as the previous wave had) are decoded as one wave; a
    wave runs until all its rows finish, then the next one starts (static batching: a long
    request holds its wave's batch mates back; rows never join a running wave).
  * `make_app`: the HTTP API: POST /v1/completions (prompt str or list, max_tokens, temperature,
    top_p, n, stop, seed, stream, logprobs), GET /v1/models, GET /health; errors are OpenAI-style
    bodies {"error": {"message", "type", "param", "code"}}.
  * `serve`: load a model (a train.py workdir or an imported HF directory), warm up, run uvicorn.

Seeds: choice i of each prompt uses seed + i (mod 2**32), i.e. it equals
`generate([prompt], rng=jax.random.key(seed + i))`; with no seed a random one is drawn.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import json
import math
import secrets
import threading
import time
import uuid
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptjax.config import GPTConfig
from gptjax.nn.model import init_cache
from gptjax.inference.sampling import decode_step, prefill, prepare_for_decoding, warp_logits

Array = jax.Array

MAX_LOGPROBS = 5  # OpenAI's limit on top alternatives per token; always computed (cheap)
MAX_STOP = 4

# ---------------------------------------------------------------------------- compile counter
_compile_count = [0]
_listener_lock = threading.Lock()
_listener_on = [False]


def _on_event(name: str, *args, **kwargs) -> None:
    if name == "/jax/core/compile/backend_compile_duration":
        _compile_count[0] += 1


def compilations() -> int:
    """XLA compilations in this process since `start_compile_counter` (every jit/eager compile)."""
    return _compile_count[0]


def start_compile_counter() -> None:
    with _listener_lock:
        if not _listener_on[0]:
            jax.monitoring.register_event_duration_secs_listener(_on_event)
            _listener_on[0] = True


# ---------------------------------------------------------------------------- device work
def sample_rows(key_data_Bx2: Array, t: Array, logits_BxV: Array, temperature_B: Array,
                top_p_B: Array) -> Array:
    """One token per row, each row with its own key, temperature (0 = greedy) and top_p.

    Row b draws as `sampling.sample_logits(fold_in(key_b, t), logits_b[None], ...)` does for a
    batch of one, so the draw does not depend on the other rows.

    Args:
      key_data_Bx2: uint32 raw PRNG key data per row (`jax.random.key_data` of the default impl).
      t: the step (the key is folded with it, as in `sampling.sample_loop`).
      logits_BxV: raw logits.
      temperature_B: >= 0; 0 means argmax.
      top_p_B: in (0, 1]; 1 means no nucleus filtering.

    Returns:
      int32 [B] tokens.
    """
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = temperature_B <= 0.0
    temp_Bx1 = jnp.where(greedy_B, 1.0, temperature_B)[:, None].astype(jnp.float32)
    scaled_BxV = warp_logits(logits_BxV, temperature=temp_Bx1)
    nucleus_BxV = warp_logits(logits_BxV, temperature=temp_Bx1,
                              top_p=top_p_B[:, None].astype(jnp.float32))
    # top_p == 1 leaves the logits untouched, as generate does (a cumulative sum can round to
    # slightly above 1 and would otherwise drop the least likely tokens).
    warped_BxV = jnp.where((top_p_B < 1.0)[:, None], nucleus_BxV, scaled_BxV)
    keys_B = jax.random.wrap_key_data(key_data_Bx2)

    def draw(key, logits_V):
        return jax.random.categorical(jax.random.fold_in(key, t), logits_V[None], axis=-1)[0]

    sampled_B = jax.vmap(draw)(keys_B, warped_BxV)
    return jnp.where(greedy_B, jnp.argmax(logits_BxV, axis=-1), sampled_B).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config",))
def _prefill_core(params, tokens_BxP, lengths_B, *, config):
    logits_BxPxV, cache = prefill(config, params, tokens_BxP, lengths_B, tokens_BxP.shape[1])
    return logits_BxPxV[:, -1].astype(jnp.float32), cache


@functools.lru_cache(maxsize=None)
def _slot_axis(config: GPTConfig) -> int:
    """The slot axis of the model's cached keys/values, read off `init_cache` (layout-agnostic)."""
    a = jax.tree_util.tree_leaves(jax.eval_shape(lambda: init_cache(config, 1, 2)["layers"]))[0]
    b = jax.tree_util.tree_leaves(jax.eval_shape(lambda: init_cache(config, 1, 3)["layers"]))[0]
    return next(i for i, (x, y) in enumerate(zip(a.shape, b.shape)) if x != y)


@functools.partial(jax.jit, static_argnames=("config", "slots"))
def _pad_cache(cache, *, config, slots):
    """Grow a prefilled cache to `slots` slots: empty slots hold zeros and position -1."""
    axis = _slot_axis(config)

    def pad(x):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, slots - x.shape[axis])
        return jnp.pad(x, widths)
    S = cache["pos"].shape[1]
    return {"layers": jax.tree_util.tree_map(pad, cache["layers"]),
            "pos": jnp.pad(cache["pos"], ((0, 0), (0, slots - S)), constant_values=-1),
            "index": cache["index"]}


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("cache",))
def _step_core(params, cache, logits_BxV, key_data_Bx2, t, temperature_B, top_p_B, lengths_B, *,
               config):
    tok_B = sample_rows(key_data_Bx2, t, logits_BxV, temperature_B, top_p_B)
    logp_BxV = jax.nn.log_softmax(logits_BxV)
    chosen_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
    top_v_BxK, top_i_BxK = jax.lax.top_k(logp_BxV, MAX_LOGPROBS)
    logits_BxV, cache = decode_step(config, params, tok_B, lengths_B + t, cache)
    return (tok_B, chosen_B, top_v_BxK, top_i_BxK), logits_BxV.astype(jnp.float32), cache


# ---------------------------------------------------------------------------- shapes
def _pow2_at_least(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _default_prompt_buckets(n_ctx: int) -> tuple:
    return tuple(sorted({b for b in (16, 64, 256, 1024, 4096) if b < n_ctx} | {n_ctx}))


class ShapePlan:
    """The compiled shapes: batch buckets, prompt buckets, and the cache sizes they reach.

    Args:
      n_ctx: the model's context; every request has prompt + max_tokens <= n_ctx.
      batch_sizes: batch buckets (rows of a wave are padded up to one); the largest is the most
        rows a wave holds.
      prompt_buckets: prompt-length buckets; the largest must be >= n_ctx - 1.
    """

    def __init__(self, n_ctx: int, batch_sizes=(1, 2, 4, 8), prompt_buckets=None):
        self.n_ctx = n_ctx
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
        self.prompt_buckets = tuple(sorted({int(p) for p in (
            prompt_buckets or _default_prompt_buckets(n_ctx))}))
        if not self.batch_sizes or self.batch_sizes[0] < 1:
            raise ValueError(f"batch_sizes={batch_sizes}: give positive batch sizes")
        if not self.prompt_buckets or self.prompt_buckets[0] < 1:
            raise ValueError(f"prompt_buckets={prompt_buckets}: give positive prompt lengths")
        if self.prompt_buckets[-1] < n_ctx - 1:
            raise ValueError(f"prompt_buckets={self.prompt_buckets}: the largest must be >= "
                             f"n_ctx - 1 = {n_ctx - 1} so that every prompt that fits has a bucket")
        # (P, S) pairs a single request can reach: prompt length in (previous bucket, P], and
        # 1 <= max_tokens <= n_ctx - length. A batch only forms within this set.
        self.pairs = set()
        prev = 0
        for P in self.prompt_buckets:
            shortest = prev + 1
            if shortest < n_ctx:
                for mt in range(1, n_ctx - shortest + 1):
                    self.pairs.add((P, self.slots(P, mt)))
            prev = P
        self.slot_sizes = tuple(sorted({S for _, S in self.pairs}))

    @property
    def max_rows(self) -> int:
        return self.batch_sizes[-1]

    def batch_bucket(self, rows: int) -> int:
        return next(b for b in self.batch_sizes if b >= rows)

    def prompt_bucket(self, length: int) -> int:
        return next(p for p in self.prompt_buckets if p >= length)

    @staticmethod
    def slots(P: int, max_tokens: int) -> int:
        return _pow2_at_least(P + max_tokens)

    def shape_of(self, lengths, max_tokens) -> tuple:
        """(P, S) for rows with these prompt lengths and max_tokens."""
        P = self.prompt_bucket(max(lengths))
        return P, self.slots(P, max(max_tokens))

    def describe(self) -> dict:
        return {"batch_sizes": list(self.batch_sizes), "prompt_buckets": list(self.prompt_buckets),
                "cache_slots": list(self.slot_sizes)}


# ---------------------------------------------------------------------------- rows and jobs
@dataclasses.dataclass
class Row:
    """One choice being generated: a prompt, its sampling settings and its progress."""
    ids: list
    key_data: np.ndarray
    temperature: float
    top_p: float
    max_tokens: int
    logprobs: Optional[int]
    stops: tuple
    index: int
    new_ids: list = dataclasses.field(default_factory=list)
    emitted: int = 0
    text: str = ""
    finish_reason: Optional[str] = None
    token_strs: list = dataclasses.field(default_factory=list)
    token_logprobs: list = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)


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


def _held_back(text: str, stops: tuple) -> int:
    """Length of the longest suffix of `text` that begins some stop string (not yet emitted)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


# ---------------------------------------------------------------------------- engine
class Engine:
    """A model, its tokenizer and the compiled shapes; decodes waves of rows."""

    def __init__(self, config: GPTConfig, params: Any, tokenizer: Any, plan: ShapePlan):
        self.config = config
        self.params = prepare_for_decoding(config, params)  # once, for every wave
        self.tokenizer = tokenizer
        self.plan = plan
        self.eos_id = tokenizer.eos_id

    def warmup(self) -> float:
        """Compile every shape the plan allows, and run one real wave; returns seconds taken."""
        start = time.perf_counter()
        cfg, plan = self.config, self.plan
        for B in plan.batch_sizes:
            caches = {}
            for P in plan.prompt_buckets:
                logits, cache = _prefill_core(self.params, np.zeros((B, P), np.int32),
                                              np.ones((B,), np.int32), config=cfg)
                for (P2, S) in sorted(plan.pairs):
                    if P2 == P:
                        caches[S] = (logits, _pad_cache(cache, config=cfg, slots=S))
            for S, (logits, cache) in sorted(caches.items()):
                out = _step_core(self.params, cache, logits, np.zeros((B, 2), np.uint32),
                                 np.int32(0), np.ones((B,), np.float32),
                                 np.full((B,), 0.9, np.float32), np.ones((B,), np.int32),
                                 config=cfg)
                jax.block_until_ready(out)
        # The host-side path once: key derivation, a wave of one row, decoding.
        row = self.make_row([0], seed=0, temperature=1.0, top_p=1.0, max_tokens=2, logprobs=5,
                            stops=("x",), index=0)
        self.run_wave([(None, row)])
        return time.perf_counter() - start

    def make_row(self, ids, *, seed, temperature, top_p, max_tokens, logprobs, stops,
                 index) -> Row:
        key_data = np.asarray(jax.random.key_data(jax.random.key(seed % 2**32)), np.uint32)
        return Row(list(ids), key_data, float(temperature), float(top_p), int(max_tokens),
                   logprobs, tuple(stops), index)

    def run_wave(self, items: list) -> int:
        """Decode (job, row) pairs together until every row finishes; returns tokens decoded.

        Rows of cancelled or expired jobs stop early; finished rows keep their batch slot (fixed
        shapes) until the wave ends.
        """
        cfg, plan = self.config, self.plan
        n = len(items)
        rows = [r for _, r in items]
        B = plan.batch_bucket(n)
        P, S = plan.shape_of([len(r.ids) for r in rows], [r.max_tokens for r in rows])
        tokens = np.zeros((B, P), np.int32)
        lengths = np.ones((B,), np.int32)
        key_data = np.zeros((B, 2), np.uint32)
        temps = np.zeros((B,), np.float32)  # padding rows decode greedily
        top_ps = np.ones((B,), np.float32)
        for b, r in enumerate(rows):
            tokens[b, P - len(r.ids):] = r.ids
            lengths[b] = len(r.ids)
            key_data[b] = r.key_data
            temps[b] = r.temperature
            top_ps[b] = r.top_p
        logits, cache = _prefill_core(self.params, tokens, lengths, config=cfg)
        cache = _pad_cache(cache, config=cfg, slots=S)

        def step(t, logits, cache):
            return _step_core(self.params, cache, logits, key_data, np.int32(t), temps, top_ps,
                              lengths, config=cfg)

        active = set(range(n))
        decoded = 0
        t, steps = 0, S - P
        pending = step(0, logits, cache)
        while True:
            # Dispatch step t+1 before reading step t: the device works while the host streams.
            nxt = step(t + 1, pending[1], pending[2]) if t + 1 < steps else None
            tok_B, lp_B, top_v, top_i = jax.device_get(pending[0])
            now = time.monotonic()
            events: dict = collections.defaultdict(list)
            for b in sorted(active):
                job, row = items[b]
                if job is not None and (job.cancelled or job.finished):
                    active.discard(b)
                    continue
                if job is not None and now > job.deadline:
                    job.finished = True
                    job.push([("error", 503, "the request timed out before it finished "
                               "(server busy); retry or raise --request_timeout", "timeout")])
                    active.discard(b)
                    continue
                decoded += 1
                delta, lp = self._advance(row, int(tok_B[b]), float(lp_B[b]), top_v[b], top_i[b])
                if delta or lp is not None:
                    events[b].append(("delta", row.index, delta, lp))
                if row.finish_reason is not None:
                    events[b].append(("finish", row.index, row.finish_reason))
                    active.discard(b)
            by_job: dict = {}
            for b, evs in events.items():
                job = items[b][0]
                if job is not None:
                    by_job.setdefault(id(job), (job, []))[1].extend(evs)
            for job, evs in by_job.values():
                job.push(evs)
            t += 1
            if not active or nxt is None:
                break
            pending = nxt
        return decoded

    def _advance(self, row: Row, token: int, logprob: float, top_v, top_i):
        """Append one token to a row: returns (new text to emit, logprobs entry or None)."""
        tok = self.tokenizer
        lp = None
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
        text = row.text
        if self.eos_id is not None and token == self.eos_id:
            row.finish_reason = "stop"
            row.new_ids.append(token)
        else:
            row.new_ids.append(token)
            text = tok.decode(row.new_ids)
            cut = min((i for i in (text.find(s) for s in row.stops) if i >= 0), default=-1)
            if cut >= 0:
                text = text[:cut]
                row.finish_reason = "stop"
            elif len(row.new_ids) >= row.max_tokens:
                row.finish_reason = "length"
        row.text = text
        if row.finish_reason is not None:
            safe = len(text)
        else:
            # Hold back a partial UTF-8 character and anything that may become a stop string.
            stripped = text.rstrip("\ufffd")
            safe = len(stripped) - _held_back(stripped, row.stops)
        delta = text[row.emitted:safe] if safe > row.emitted else ""
        row.emitted = max(row.emitted, safe)
        return delta, lp


# ---------------------------------------------------------------------------- batcher
class QueueFull(Exception):
    """The server has `max_queue` requests waiting."""


class Batcher:
    """A background thread that groups queued jobs into waves and runs them on the engine.

    Args:
      engine: the Engine.
      max_queue: most requests waiting (not yet in a wave); more are refused with QueueFull.
      batch_window_s: after the first request of a wave arrives, the longest wait for as many
        rows as the previous wave had.
    """

    def __init__(self, engine: Engine, max_queue: int = 64, batch_window_s: float = 0.05):
        self.engine = engine
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self._pending: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self._last_rows = 1
        self.stats = collections.Counter()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="gptjax-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
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
        return sum(1 for j in list(self._pending) if not (j.cancelled or j.finished))

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
            self._last_rows = len(items)
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


# ---------------------------------------------------------------------------- HTTP API
def _error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None,
                code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                503: "server_error"}


class RequestError(Exception):
    """An error answered with an HTTP status and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


class CompletionRequest(BaseModel):
    """POST /v1/completions: the OpenAI fields gptjax implements; any other field is refused."""
    model_config = ConfigDict(extra="forbid")
    model: Optional[str] = None
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int = Field(16, ge=1, strict=True)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, strict=True)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, lt=2**32, strict=True)
    stream: bool = Field(False, strict=True)
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS, strict=True)
    user: Optional[str] = None


def _build_rows(req, engine: Engine) -> tuple:
    """(rows, prompt token count) for a validated request, or RequestError."""
    cfg, tok, plan = engine.config, engine.tokenizer, engine.plan
    prompts = req.prompt
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts
                                    and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise RequestError(400, "prompt is an empty list: give a string or a list of strings",
                           "prompt")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise RequestError(400, f"stop={stops!r}: give up to {MAX_STOP} non-empty strings",
                           "stop")
    if len(prompts) * req.n > plan.max_rows:
        raise RequestError(400, f"{len(prompts)} prompt(s) x n={req.n} = {len(prompts) * req.n} "
                           f"choices: at most {plan.max_rows} per request (the largest batch)",
                           "n")
    id_lists = []
    for j, p in enumerate(prompts):
        if isinstance(p, str):
            try:
                ids = tok.encode(p)
            except ValueError as e:
                raise RequestError(400, f"prompt[{j}]: {e}", "prompt") from None
            if not ids:
                if tok.eos_id is None:
                    raise RequestError(400, f"prompt[{j}] is empty and this tokenizer has no "
                                       "end-of-text token to start from", "prompt")
                ids = [tok.eos_id]
        else:
            ids = list(p)
            if not ids:
                raise RequestError(400, f"prompt[{j}] is an empty token list", "prompt")
            bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
            if bad:
                raise RequestError(400, f"prompt[{j}] holds token id {bad[0]}: ids must be in "
                                   f"[0, {cfg.vocab_size})", "prompt")
        if len(ids) + req.max_tokens > cfg.n_ctx:
            raise RequestError(
                400, f"This model's maximum context length is {cfg.n_ctx} tokens, however you "
                f"requested {len(ids) + req.max_tokens} tokens ({len(ids)} in prompt[{j}]; "
                f"{req.max_tokens} for the completion). Shorten the prompt or lower max_tokens.",
                "prompt" if len(ids) >= cfg.n_ctx else "max_tokens", "context_length_exceeded")
        id_lists.append(ids)
    seed = req.seed if req.seed is not None else secrets.randbits(32)
    rows = []
    for j, ids in enumerate(id_lists):
        for i in range(req.n):
            rows.append(engine.make_row(ids, seed=seed + i, temperature=req.temperature,
                                        top_p=req.top_p, max_tokens=req.max_tokens,
                                        logprobs=req.logprobs, stops=tuple(stops),
                                        index=j * req.n + i))
    return rows, sum(len(x) for x in id_lists)


def _logprobs_body(token_strs, token_logprobs, top_logprobs, start_offset: int = 0) -> dict:
    offsets, off = [], start_offset
    for s in token_strs:
        offsets.append(off)
        off += len(s)
    return {"tokens": token_strs, "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs, "text_offset": offsets}


def make_app(engine: Engine, batcher: Batcher, *, model_name: str = "gptjax",
             request_timeout_s: float = 60.0):
    """The FastAPI application (the batcher is started/stopped by the caller)."""
    app = FastAPI(title="gptjax", version="0.1.0")
    created = int(time.time())

    def error_response(status, message, param=None, code=None):
        return JSONResponse(_error_body(message, _ERROR_TYPES.get(status, "invalid_request_error"),
                                        param, code), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        errs = exc.errors()
        e = errs[0] if errs else {"msg": "invalid request", "loc": ()}
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        if e.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {e.get('msg')} "
                                  f"(at character {loc[-1] if loc else '?'})", None, "json_invalid")
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        if e.get("type") == "extra_forbidden":
            msg = (f"unknown field {where!r}: allowed fields are "
                   f"{', '.join(sorted(CompletionRequest.model_fields))}")
        elif e.get("type") == "missing":
            msg = f"missing required field {where!r}"
        else:
            got = e.get("input")
            got = json.dumps(got)[:80] if got is not None else "null"
            msg = f"{where}={got}: {e.get('msg')}"
        return error_response(400, msg, param, e.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestError)
    async def _request_error(request, exc):
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "queued": batcher.queued(),
                "compilations_after_warmup": compilations() - app.state.compiles_at_start,
                "stats": dict(batcher.stats), "shapes": engine.plan.describe()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": created, "owned_by": "gptjax"}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        if req.model is not None and req.model != model_name:
            raise RequestError(404, f"model={req.model!r} does not exist: this server serves "
                               f"{model_name!r} (GET /v1/models)", "model", "model_not_found")
        rows, prompt_tokens = _build_rows(req, engine)
        loop = asyncio.get_running_loop()
        job = Job(rows, loop, time.monotonic() + request_timeout_s)
        try:
            batcher.submit(job)
        except QueueFull as e:
            raise RequestError(429, f"server overloaded: {e}", None, "queue_full") from None
        cid = f"cmpl-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        base = {"id": cid, "object": "text_completion", "created": now, "model": model_name}
        if req.stream:
            return StreamingResponse(_stream(job, base, request), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            await _collect(job)
        except RequestError:
            job.cancel()
            raise
        finally:
            job.cancel()
        choices = []
        for r in rows:
            lp = None
            if r.logprobs is not None:
                lp = _logprobs_body(r.token_strs, r.token_logprobs, r.top_logprobs)
            choices.append({"text": r.text, "index": r.index, "logprobs": lp,
                            "finish_reason": r.finish_reason})
        completion = sum(len(r.new_ids) for r in rows)
        return dict(base, choices=choices, usage={
            "prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion})

    async def _next_event(job):
        remaining = job.deadline - time.monotonic()
        try:
            return await asyncio.wait_for(job.queue.get(), timeout=max(remaining, 0.0) + 1.0)
        except asyncio.TimeoutError:
            batcher.stats["timed_out"] += 1
            raise RequestError(503, "the request timed out (server busy); retry or raise "
                               "--request_timeout", None, "timeout") from None

    async def _collect(job):
        left = len(job.rows)
        while left:
            ev = await _next_event(job)
            if ev[0] == "finish":
                left -= 1
            elif ev[0] == "error":
                raise RequestError(ev[1], ev[2], None, ev[3])
        batcher.stats["completed"] += 1

    async def _stream(job, base, request):
        left = len(job.rows)
        offsets = collections.Counter()
        try:
            while left:
                try:
                    ev = await _next_event(job)
                except RequestError as e:
                    ev = ("error", e.status, e.message, e.code)
                if ev[0] == "error":
                    body = _error_body(ev[2], _ERROR_TYPES.get(ev[1], "server_error"), None, ev[3])
                    yield f"data: {json.dumps(body)}\n\n"
                    return
                if ev[0] == "delta":
                    _, idx, text, lp = ev
                    lp_body = None
                    if lp is not None:
                        lp_body = _logprobs_body(lp["tokens"], lp["token_logprobs"],
                                                 lp["top_logprobs"], offsets[idx])
                        offsets[idx] += sum(len(s) for s in lp["tokens"])
                    choice = {"text": text, "index": idx, "logprobs": lp_body,
                              "finish_reason": None}
                else:
                    left -= 1
                    choice = {"text": "", "index": ev[1], "logprobs": None,
                              "finish_reason": ev[2]}
                yield f"data: {json.dumps(dict(base, choices=[choice]))}\n\n"
            batcher.stats["completed"] += 1
            yield "data: [DONE]\n\n"
        finally:
            # Client gone (the response task is cancelled) or done: free the rows' batch slots.
            if left:
                batcher.stats["cancelled"] += 1
            job.cancel()

    app.state.compiles_at_start = compilations()
    return app


# ---------------------------------------------------------------------------- entry point
def build_server(config, params, tokenizer, *, batch_sizes=(1, 2, 4, 8), prompt_buckets=None,
                 max_queue: int = 64, batch_window_s: float = 0.05,
                 request_timeout_s: float = 60.0, model_name: str = "gptjax", warmup=True,
                 start=True, log=print):
    """Engine + warmed-up compiled shapes + batcher + app. Returns (app, batcher, engine)."""
    start_compile_counter()
    plan = ShapePlan(config.n_ctx, batch_sizes, prompt_buckets)
    engine = Engine(config, params, tokenizer, plan)
    if warmup:
        log(f"warming up {len(plan.batch_sizes) * (len(plan.prompt_buckets) + len(plan.slot_sizes))}"
            f" compiled shapes {plan.describe()} ...")
        log(f"warm-up done in {engine.warmup():.1f} s")
    batcher = Batcher(engine, max_queue=max_queue, batch_window_s=batch_window_s)
    app = make_app(engine, batcher, model_name=model_name, request_timeout_s=request_timeout_s)
    if start:
        batcher.start()
    return app, batcher, engine


def _int_list(flag: str, text: str) -> Optional[tuple]:
    if text in (None, ""):
        return None
    try:
        vals = tuple(int(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"--{flag}={text!r}: give comma-separated positive integers") from None
    if any(v < 1 for v in vals):
        raise ValueError(f"--{flag}={text!r}: give comma-separated positive integers")
    return vals


def serve(*, workdir=None, hf_dir=None, tokenizer_path=None, step=None, host="127.0.0.1",
          port=8000, batch_sizes="1,2,4,8", prompt_buckets="", max_queue=64,
          batch_window_ms=50.0, request_timeout=60.0, model_name=None) -> None:
    """Load a model, warm up every compiled shape, and serve the API with uvicorn until stopped."""
    import os

    import uvicorn

    from gptjax.inference.textgen import load_model

    if not 0 <= port <= 65535:
        raise ValueError(f"--port={port}: must be in [0, 65535]")
    if max_queue < 1:
        raise ValueError(f"--max_queue={max_queue}: must be >= 1")
    if not batch_window_ms >= 0 or not math.isfinite(batch_window_ms):
        raise ValueError(f"--batch_window_ms={batch_window_ms}: must be >= 0")
    if not request_timeout > 0:
        raise ValueError(f"--request_timeout={request_timeout}: must be > 0 seconds")
    bs = _int_list("batch_sizes", batch_sizes)
    if bs is None:
        raise ValueError("--batch_sizes is empty: give e.g. 1,2,4,8")
    pb = _int_list("prompt_buckets", prompt_buckets)
    config, params, tok = load_model(workdir, hf_dir, tokenizer_path, step)
    name = model_name or os.path.basename(os.path.normpath(workdir or hf_dir))
    app, batcher, _ = build_server(config, params, tok, batch_sizes=bs, prompt_buckets=pb,
                                   max_queue=max_queue, batch_window_s=batch_window_ms / 1000,
                                   request_timeout_s=request_timeout, model_name=name)
    print(f"serving {name!r} on http://{host}:{port}/v1/completions", flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        batcher.stop()
