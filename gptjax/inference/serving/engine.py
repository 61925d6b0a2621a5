"""The serving engine: the compiled shapes, and decode waves of rows on the host.

  * `sample_rows` and the jitted `_prefill_core` / `_pad_cache` / `_step_core`: the per-step
    device work. Every row has its own PRNG key, temperature and top_p, so a row's output does
    not depend on which other rows share its batch: row r's token t is drawn exactly as
    `gptjax.inference.sampling.generate([prompt_r], rng=key_r)` draws it (key fold_in(key_r, t),
    the same warping), so a completion equals `generate` with the same seed.
  * `ShapePlan`: the fixed set of compiled shapes. Batches are padded to a batch bucket B,
    prompts left-padded to a prompt bucket P, and the cache has S = next power of two
    >= P + max_tokens slots. `Engine.warmup` compiles every (B, P) prefill and (B, S) decode
    step a request can reach; the batcher never forms a batch outside that set, so no request
    compiles after warm-up (`compilations()` counts XLA compiles; /health reports them).
  * `Engine`: model, tokenizer and plan; `run_wave` decodes one batch of rows step by step on the
    host (one device round trip per token, the next step dispatched before the last one is read),
    which is what makes streaming, stop strings, cancellation and timeouts per row possible.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import threading
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.inference.decoding import decode_step, prefill, prepare_for_decoding
from gptjax.inference.sampling import warp_logits
from gptjax.nn.model import init_cache

Array = jax.Array

MAX_LOGPROBS = 5  # OpenAI's limit on top alternatives per token; always computed (cheap)

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
    """Start counting XLA compilations (idempotent: the listener is registered once)."""
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
      t: the step, a scalar or one per row [B] (the key is folded with it, as in
        `sampling.sample_loop`; rows of a continuous batch are at different steps).
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
    t_B = jnp.broadcast_to(jnp.asarray(t, jnp.int32), greedy_B.shape)

    def draw(key, logits_V, t):
        return jax.random.categorical(jax.random.fold_in(key, t), logits_V[None], axis=-1)[0]

    sampled_B = jax.vmap(draw)(keys_B, warped_BxV, t_B)
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
    first_at: Optional[float] = None  # time.monotonic() of the first and the latest token
    last_at: Optional[float] = None


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


def _held_back(text: str, stops: tuple) -> int:
    """Length of the longest suffix of `text` that begins some stop string (not yet emitted)."""
    n = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), n, -1):
            if text.endswith(s[:k]):
                n = k
                break
    return n


def _pack_rows(rows: list, B: int, P: int) -> tuple:
    """A wave's rows as device inputs: prompts left-padded to P, per-row keys and settings, padded
    to B rows (padding rows decode greedily)."""
    tokens = np.zeros((B, P), np.int32)
    lengths = np.ones((B,), np.int32)
    key_data = np.zeros((B, 2), np.uint32)
    temps = np.zeros((B,), np.float32)
    top_ps = np.ones((B,), np.float32)
    for b, r in enumerate(rows):
        tokens[b, P - len(r.ids):] = r.ids
        lengths[b] = len(r.ids)
        key_data[b] = r.key_data
        temps[b] = r.temperature
        top_ps[b] = r.top_p
    return tokens, lengths, key_data, temps, top_ps


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
        """A Row for one choice; its PRNG key is jax.random.key(seed mod 2**32), as `generate`'s.

        Args:
          ids: the prompt's token ids.
          seed, temperature, top_p, max_tokens, logprobs, stops: the choice's request settings.
          index: the choice's index in the response.

        Returns:
          The Row, with nothing generated yet.
        """
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
        P, S = plan.shape_of([len(r.ids) for r in rows], [r.max_tokens for r in rows])
        tokens, lengths, key_data, temps, top_ps = _pack_rows(rows, plan.batch_bucket(n), P)
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

