"""The serving engine: prefill, insert and generate over a decode state with a paged KV cache.

The shape JetStream and vLLM's model runner settled on:
  * `prefill(ids)`: one prompt, left-padded to a prompt bucket, through the model into a dense
    cache of its own -> its keys/values and the logits of its first token (with `score`, also
    every prompt token's log-probability and top alternatives: `echo` with `logprobs`).
  * `insert(prefix, slot, ...)`: that prompt into a free decode slot: its keys/values scattered
    into the pages the slot is given, its first token drawn, the slot's key and settings set.
  * `generate()`: one decode step over every slot holding a row, each row attending over its own
    pages (gptjax.nn.kv_cache.PagedView: a flat list of the pages rows hold, in a few bucketed
    lengths), so a short row does not pay for a long one.

The decode state is one pytree (`empty_state`): the page pool per layer [n_pages, page, H, D],
each slot's block table (its pages), newest token, position, step, PRNG key, temperature and
top_p. Page 0 is never given to a row: free slots and a table's unused entries point at it, and
what is written there is never read. Pages are given at insert, as many as the row can use
(prompt + max_tokens - 1 positions), and returned when the slot is freed (`release`).

Every row samples from its own PRNG key folded with its own step, with its own temperature and
top_p (`sample_rows`), so a completion equals `gptjax.inference.sampling.generate` with the same
seed whatever else shares the step. The compiled shapes are fixed: a prefill, a scoring prefill
and an insert per prompt bucket, a step per page bucket; `warmup` compiles them all
(`compilations()` counts XLA compiles), so nothing compiles while serving.
"""

from __future__ import annotations

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
from gptjax.nn.kv_cache import PagedCache, PagedView, init_pages

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


def _drawn(logits_BxV, key_data_Bx2, t_B, temperature_B, top_p_B) -> tuple:
    """(token, its logprob, top logprobs, their ids) per row."""
    tok_B = sample_rows(key_data_Bx2, t_B, logits_BxV, temperature_B, top_p_B)
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32))
    chosen_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
    top_v_BxK, top_i_BxK = jax.lax.top_k(logp_BxV, MAX_LOGPROBS)
    return tok_B, chosen_B, top_v_BxK, top_i_BxK


def empty_state(config: GPTConfig, slots: int, n_pages: int, page_size: int) -> dict:
    """The decode state: a page pool and every slot free (tables pointing at page 0)."""
    pages_per_row = -(-config.n_ctx // page_size)
    z = functools.partial(jnp.zeros, (slots,))
    return {"pool": init_pages(config, n_pages, page_size),
            "table": jnp.zeros((slots, pages_per_row), jnp.int32),
            "tokens": z(jnp.int32), "pos": z(jnp.int32), "t": z(jnp.int32),
            "key": jnp.zeros((slots, 2), jnp.uint32), "temp": z(jnp.float32),
            "top_p": jnp.ones((slots,), jnp.float32)}


@functools.partial(jax.jit, static_argnames=("config", "score"))
def _prefill_core(params, tokens_1xP, length_1, *, config, score=False):
    """(last logits [1, V], keys/values, prompt scores or None) of one left-padded prompt.

    With `score` (a second program, compiled per bucket: a prompt not scored pays nothing),
    the head runs over every position and the scores are, per position j, the log-probability
    of token j + 1 and the top MAX_LOGPROBS log-probabilities with their ids ([P], [P, K],
    [P, K]; the last position's entry is unused): the echo of a prompt's log-probabilities."""
    P = tokens_1xP.shape[1]
    logits, cache = prefill(config, params, tokens_1xP, length_1, P, last_only=not score)
    if not score:
        return logits.astype(jnp.float32), cache["layers"], None
    logp_PxV = jax.nn.log_softmax(logits[0].astype(jnp.float32))
    next_P = jnp.roll(tokens_1xP[0], -1)
    chosen_P = jnp.take_along_axis(logp_PxV, next_P[:, None], axis=-1)[:, 0]
    top_v_PxK, top_i_PxK = jax.lax.top_k(logp_PxV, MAX_LOGPROBS)
    return logits[:, -1].astype(jnp.float32), cache["layers"], (chosen_P, top_v_PxK, top_i_PxK)


@functools.partial(jax.jit, donate_argnames=("state",))
def _insert_core(state, logits_1xV, layers, length, slot, table_M, key_data_2, temp, top_p):
    """A prefilled prompt into `slot`: keys/values of positions 0..length-1 (left-padded to P in
    `layers`, [.., H, D, P]) into the slot's pages, its first token drawn (step 0)."""
    M = table_M.shape[0]
    N, G = jax.tree_util.tree_leaves(state["pool"])[0].shape[-4:-2]
    P = jax.tree_util.tree_leaves(layers)[0].shape[-1]
    pos_P = jnp.arange(P, dtype=jnp.int32) - (P - length)
    dest_P = jnp.where(pos_P >= 0, table_M[jnp.clip(pos_P // G, 0, M - 1)] * G + pos_P % G, N * G)

    def put(pool, dense):
        flat = pool.reshape(pool.shape[:-4] + (N * G,) + pool.shape[-2:])
        kv = jnp.moveaxis(dense, -1, -3).astype(pool.dtype)  # [.., P, H, D]
        return flat.at[..., dest_P, :, :].set(kv, mode="drop").reshape(pool.shape)

    out = _drawn(logits_1xV, key_data_2[None], jnp.zeros((1,), jnp.int32), temp[None],
                 top_p[None])
    new = dict(state, pool=jax.tree_util.tree_map(put, state["pool"], layers),
               table=state["table"].at[slot].set(table_M),
               tokens=state["tokens"].at[slot].set(out[0][0]),
               pos=state["pos"].at[slot].set(length), t=state["t"].at[slot].set(1),
               key=state["key"].at[slot].set(key_data_2), temp=state["temp"].at[slot].set(temp),
               top_p=state["top_p"].at[slot].set(top_p))
    return out, new


@functools.partial(jax.jit, static_argnames=("config", "n_flat"), donate_argnames=("state",))
def _generate_core(params, state, active_B, *, config, n_flat):
    """One step over the active slots: each feeds its newest token at its position and draws the
    next; the attention reads a flat list of `n_flat` pages (the active rows' pages, padded)."""
    table_BxM, pos_B = state["table"], state["pos"]
    B, M = table_BxM.shape
    G = jax.tree_util.tree_leaves(state["pool"])[0].shape[-3]
    n_B = jnp.where(active_B, pos_B // G + 1, 0)
    ends_B = jnp.cumsum(n_B)
    i_P = jnp.arange(n_flat, dtype=jnp.int32)
    row_P = jnp.searchsorted(ends_B, i_P, side="right").astype(jnp.int32)  # B: padding
    rowc_P = jnp.minimum(row_P, B - 1)
    j_P = i_P - (ends_B - n_B)[rowc_P]
    page_P = jnp.where(row_P < B, table_BxM[rowc_P, jnp.clip(j_P, 0, M - 1)], 0)
    page_B = table_BxM[jnp.arange(B), jnp.clip(pos_B // G, 0, M - 1)]
    write_B = jnp.where(active_B, page_B * G + pos_B % G, -1)
    view = PagedView(write_B[:, None], page_P, row_P, j_P * G)
    logits_BxV, cache = decode_step(config, params, state["tokens"], jnp.where(active_B, pos_B, 0),
                                    PagedCache(state["pool"], view))
    out = _drawn(logits_BxV, state["key"], state["t"], state["temp"], state["top_p"])
    step_B = active_B.astype(jnp.int32)
    return out, dict(state, pool=cache.layers, tokens=jnp.where(active_B, out[0], state["tokens"]),
                     pos=pos_B + step_B, t=state["t"] + step_B)


# ---------------------------------------------------------------------------- shapes
def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def default_prompt_buckets(n_ctx: int) -> tuple:
    """16, 64, 256, 1024, 4096 below n_ctx, and n_ctx."""
    return tuple(sorted({b for b in (16, 64, 256, 1024, 4096) if b < n_ctx} | {n_ctx}))


# ---------------------------------------------------------------------------- the engine
class Engine:
    """A model over `slots` decode slots and a page pool: prefill, insert, generate, release.

    Host-side it keeps each slot's page list and how many tokens the device was asked for, so it
    knows, without reading the device, which slots a step advances and how many pages it reads.

    Args:
      config: the architecture.
      params: the parameters, or `prepare_for_decoding`'s result (e.g. another weight format).
      slots: decode slots (the most rows decoded together).
      page_size: positions per KV page.
      pages: pages in the pool, page 0 included (default: every slot can hold a full context,
        slots * ceil(n_ctx / page_size) + 1); fewer makes a request wait for pages to free up.
      prompt_buckets: prompt lengths prefills are padded to; the largest must be >= n_ctx - 1.
    """

    def __init__(self, config: GPTConfig, params: Any, *, slots: int = 8, page_size: int = 16,
                 pages: Optional[int] = None, prompt_buckets=None):
        self.config = config
        self.params = prepare_for_decoding(config, params)
        self.slots, self.page_size = int(slots), int(page_size)
        if self.slots < 1 or self.page_size < 1:
            raise ValueError(f"slots={slots}, page_size={page_size}: must be >= 1")
        self.pages_per_row = -(-config.n_ctx // self.page_size)
        self.n_pages = int(pages) if pages else self.slots * self.pages_per_row + 1
        if self.n_pages < self.pages_per_row + 1:
            raise ValueError(f"pages={pages}: need at least ceil(n_ctx / page_size) + 1 = "
                             f"{self.pages_per_row + 1} (a full context and the null page)")
        self.prompt_buckets = tuple(sorted({int(p) for p in (
            prompt_buckets or default_prompt_buckets(config.n_ctx))}))
        if self.prompt_buckets[0] < 1 or self.prompt_buckets[-1] < config.n_ctx - 1:
            raise ValueError(f"prompt_buckets={self.prompt_buckets}: give positive lengths, the "
                             f"largest >= n_ctx - 1 = {config.n_ctx - 1}")
        # A step reads the active rows' pages, padded to a power of two: from the slots (one
        # page each) to every page a step can hold.
        lo = _pow2_at_least(self.slots)
        hi = _pow2_at_least(min(self.n_pages - 1, self.slots * self.pages_per_row))
        self.page_buckets = tuple(1 << k for k in range(min(lo, hi).bit_length() - 1,
                                                        hi.bit_length()))
        self.reset()

    def reset(self) -> None:
        """Every slot free and every page back (also after a failed step: donated state is gone)."""
        self.state = empty_state(self.config, self.slots, self.n_pages, self.page_size)
        self.free_pages = list(range(self.n_pages - 1, 0, -1))
        self.slot_pages = [[] for _ in range(self.slots)]
        self.length = [0] * self.slots  # prompt length, tokens asked for, most tokens (per slot)
        self.asked = [0] * self.slots
        self.budget = [0] * self.slots

    # ------------------------------------------------------------------ host-side bookkeeping
    def prompt_bucket(self, length: int) -> int:
        return next(p for p in self.prompt_buckets if p >= length)

    def pages_for(self, length: int, max_tokens: int) -> int:
        """Pages a row uses: positions 0 .. length + max_tokens - 2 (the last token is not fed)."""
        return max(1, -(-(length + max_tokens - 1) // self.page_size))

    def can_insert(self, length: int, max_tokens: int) -> bool:
        return self.pages_for(length, max_tokens) <= len(self.free_pages)

    def free_slots(self) -> list:
        return [s for s in range(self.slots) if not self.slot_pages[s]]

    def active(self) -> np.ndarray:
        """Slots the next step advances: holding a row that may still draw a token."""
        return np.array([bool(self.slot_pages[s]) and self.asked[s] < self.budget[s]
                         for s in range(self.slots)])

    def release(self, slot: int) -> None:
        """Free a slot and its pages (the row finished, was cancelled or timed out)."""
        self.free_pages.extend(reversed(self.slot_pages[slot]))
        self.slot_pages[slot] = []
        self.budget[slot] = 0

    # ------------------------------------------------------------------ device calls
    def prefill(self, ids: list, score: bool = False) -> tuple:
        """(first-token logits [1, V], dense keys/values [.., H, D, P], prompt scores) of one
        prompt; the scores (with `score`, else None) are the prompt's log-probabilities as
        `_prefill_core` gives them (the detokenizer's `echo_prompt` reads them)."""
        P = self.prompt_bucket(len(ids))
        tokens = np.zeros((1, P), np.int32)
        tokens[0, P - len(ids):] = ids
        return _prefill_core(self.params, tokens, np.array([len(ids)], np.int32),
                             config=self.config, score=bool(score))

    def insert(self, prefix: tuple, slot: int, *, length: int, max_tokens: int,
               key_data: np.ndarray, temperature: float, top_p: float) -> tuple:
        """A prefilled prompt into a free slot, with pages for every position the row can use;
        returns the first token's outputs (device arrays: token, logprob, top logprobs, ids)."""
        n = self.pages_for(length, max_tokens)
        if self.slot_pages[slot] or n > len(self.free_pages):
            raise RuntimeError(f"slot {slot} is taken or {n} pages are not free")
        pages = [self.free_pages.pop() for _ in range(n)]
        self.slot_pages[slot] = pages
        self.length[slot], self.asked[slot], self.budget[slot] = length, 1, max_tokens
        table = np.zeros((self.pages_per_row,), np.int32)
        table[:n] = pages
        out, self.state = _insert_core(self.state, prefix[0], prefix[1], np.int32(length),
                                       np.int32(slot), table, np.asarray(key_data, np.uint32),
                                       np.float32(temperature), np.float32(top_p))
        return out

    def generate(self) -> Optional[tuple]:
        """One decode step over the active slots (None if there is none); returns (outputs per
        slot as device arrays, the active mask). The host reads them later (`read`)."""
        active = self.active()
        if not active.any():
            return None
        flat = sum((self.length[s] + self.asked[s] - 1) // self.page_size + 1
                   for s in np.flatnonzero(active))
        n_flat = next(b for b in self.page_buckets if b >= flat)
        out, self.state = _generate_core(self.params, self.state, active, config=self.config,
                                         n_flat=n_flat)
        for s in np.flatnonzero(active):
            self.asked[s] += 1
        return out, active

    @staticmethod
    def read(out) -> tuple:
        """Device outputs on the host (numpy)."""
        return jax.device_get(out)

    def warmup(self) -> float:
        """Compile every prefill, insert and step shape; returns seconds taken."""
        start = time.perf_counter()
        key = np.zeros((2,), np.uint32)
        prev = 0
        for P in self.prompt_buckets:
            L = min(P, self.config.n_ctx - 1)
            if L > prev:  # reachable by some prompt
                self.read(self.insert(self.prefill([0] * L), 0, length=L, max_tokens=2,
                                      key_data=key, temperature=1.0, top_p=0.9))
                self.release(0)
            if min(P, self.config.n_ctx) > prev:  # scored prompts (echo) may fill the context
                self.read(self.prefill([0] * min(P, self.config.n_ctx), score=True))
            prev = P
        self.reset()
        for n_flat in self.page_buckets:
            self.length[0], self.asked[0], self.budget[0] = 1, 0, 2
            self.slot_pages[0] = [1]
            jax.block_until_ready(_generate_core(self.params, self.state, self.active(),
                                                 config=self.config, n_flat=n_flat))
            self.reset()
        return time.perf_counter() - start

    def describe(self) -> dict:
        return {"slots": self.slots, "page_size": self.page_size, "pages": self.n_pages,
                "prompt_buckets": list(self.prompt_buckets),
                "page_buckets": list(self.page_buckets)}
