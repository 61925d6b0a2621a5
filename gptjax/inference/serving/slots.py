"""Continuous batching on the device: a fixed set of decode slots over one ring-buffer KV cache.

The engine has JetStream's shape: `prefill` (one prompt, left-padded to a prompt bucket -> its
cache rows and the logits of its first token), `insert` (those rows into a free slot of the decode
state), `generate` (one decode step over every slot), plus `resize` (the cache to another length
bucket). Every shape is fixed by (slots, prompt bucket P, cache bucket S), all compiled by
`SlotEngine.warmup`, so nothing compiles while serving.

The cache is a ring of S slots per row. gptjax's attention masks keys by the position stored with
each slot, not by the slot's place, so a row's keys may sit anywhere in its row of the cache. Step
g writes slot g mod S of every row (the one shared write index the model's cache has); a request
inserted before step g gets its L prompt keys/values in slots g-L .. g-1 (mod S) of its row and its
own position counter, and its steps write g, g+1, ...: it needs L + max_tokens <= S slots and never
overwrites itself. Inserting sets the whole row (empty slots get position -1), so whatever a freed
row left behind is never attended to. `resize` rolls the ring so the write index is 0 and keeps
the S' most recent slots (or pads in front with empty ones): a running row's keys are its most
recent slots, so it stays valid under any S' >= its need so far (`need_now`), and a ring grows
with its rows instead of starting at the length their last tokens need.

Every row of a ring attends over all of it, so the slots form groups with a state and a ring each
(`SlotEngine.groups`): the short slots, and one group per long slot, taken by requests needing more
than the smallest ring, so short rows keep decoding over a short ring while a long request runs. A
step is one model call for the short group and the first long slot holding a row (a grouped cache,
gptjax.nn.model.group_caches: the weights read once, each group attending over its own ring), and
one call for each other long slot holding a row (`SlotEngine.calls`). The step updates the donated cache in place (the
model writes one slot per row); a step over a group's first slot alone copies that row's cache out
and writes back only the slot it wrote (`_put_rows`).

Each row samples from its own PRNG key folded with its own step counter, with its own temperature
and top_p (`engine.sample_rows`), so a completion equals `sampling.generate` with the same seed
whatever else shares the batch.
"""

from __future__ import annotations

import collections
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gptjax.config import GPTConfig
from gptjax.inference.decoding import decode_step
from gptjax.inference.serving.engine import (
    MAX_LOGPROBS,
    Engine,
    ShapePlan,
    _prefill_core,
    sample_rows,
)
from gptjax.nn.model import group_caches, init_cache, ungroup_caches

Array = jax.Array


@functools.lru_cache(maxsize=None)
def _axes(config: GPTConfig) -> tuple:
    """(batch axis, slot axis) of the cached keys/values, read off `init_cache` (layout-agnostic);
    the batch axis holds rows*n_head entries, one per (row, head)."""
    def shape(b, s):
        return jax.tree_util.tree_leaves(jax.eval_shape(lambda: init_cache(config, b, s)["layers"]))[0].shape
    a, b, c = shape(1, 2), shape(2, 2), shape(1, 3)
    return (next(i for i, (x, y) in enumerate(zip(a, b)) if x != y),
            next(i for i, (x, y) in enumerate(zip(a, c)) if x != y))


def empty_state(config: GPTConfig, slots: int, cache_len: int) -> dict:
    """A decode state with every slot free: the cache, each slot's next-token logits, position,
    step, PRNG key data, temperature and top_p."""
    return {"cache": init_cache(config, slots, cache_len),
            "logits": jnp.zeros((slots, config.vocab_size), jnp.float32),
            "pos": jnp.zeros((slots,), jnp.int32), "t": jnp.zeros((slots,), jnp.int32),
            "key": jnp.zeros((slots, 2), jnp.uint32), "temp": jnp.zeros((slots,), jnp.float32),
            "top_p": jnp.ones((slots,), jnp.float32)}


def _rows(state, config, rows):
    """The first `rows` slots of a decode state (or where to write them back)."""
    bax, _ = _axes(config)
    H = config.n_head

    def head(x, axis, n):
        return jax.lax.slice_in_dim(x, 0, n, axis=axis)
    cache = state["cache"]
    return dict({k: head(v, 0, rows) for k, v in state.items() if k != "cache"}, cache={
        "layers": jax.tree_util.tree_map(lambda x: head(x, bax, rows * H), cache["layers"]),
        "pos": head(cache["pos"], 0, rows), "index": cache["index"]})


def _put_rows(state, sub, config):
    """Write a step's rows back into the donated state: the small per-row arrays whole, and of the
    cache only the one slot the step wrote (a [rows*H, D, 1] column per layer at the write
    index), so the cache is updated in place and never copied whole."""
    _, sax = _axes(config)
    cache, new = state["cache"], sub["cache"]
    g = cache["index"]

    def column(x, y, axis):
        starts = [jnp.zeros((), jnp.int32)] * x.ndim
        starts[axis] = g
        col = jax.lax.dynamic_slice_in_dim(y, g, 1, axis=axis).astype(x.dtype)
        return jax.lax.dynamic_update_slice(x, col, starts)

    return dict({k: jax.lax.dynamic_update_slice_in_dim(v, sub[k], 0, axis=0)
                 for k, v in state.items() if k != "cache"}, cache={
        "layers": jax.tree_util.tree_map(lambda x, y: column(x, y, sax), cache["layers"],
                                         new["layers"]),
        "pos": column(cache["pos"], new["pos"], 1), "index": new["index"]})


@functools.partial(jax.jit, static_argnames=("config", "rows"), donate_argnames=("states",))
def _generate_core(params, states, actives, *, config, rows):
    """One step over the first `rows[g]` slots of each group's state in `states` (the occupied
    ones are kept in front, so a lightly loaded server reads a fraction of the cache), in one
    model call: sample each active row's next token, feed it, advance the row. Several groups
    go through the model as one grouped cache (gptjax.nn.model.group_caches): the weights are
    read once and each group's rows attend over their own ring. With every slot of a group the
    model updates its donated cache in place; with fewer, it runs on a copy of their rows and
    only the slot it wrote goes back (`_put_rows`)."""
    subs, outs, toks, poss = [], [], [], []
    for state, active_B, r in zip(states, actives, rows):
        sub = state if r == state["pos"].shape[0] else _rows(state, config, r)
        logits_BxV = sub["logits"]
        tok_B = sample_rows(sub["key"], sub["t"], logits_BxV, sub["temp"], sub["top_p"])
        logp_BxV = jax.nn.log_softmax(logits_BxV)
        chosen_B = jnp.take_along_axis(logp_BxV, tok_B[:, None], axis=-1)[:, 0]
        outs.append((tok_B, chosen_B) + tuple(jax.lax.top_k(logp_BxV, MAX_LOGPROBS)))
        # Free slots decode token 0 at position 0 (fixed shapes); a row one step past its end
        # (the host reads a step after dispatching the next) is clamped inside the position table.
        toks.append(jnp.where(active_B, tok_B, 0))
        poss.append(jnp.where(active_B, jnp.minimum(sub["pos"], config.n_ctx - 1), 0))
        subs.append(sub)
    caches = [sub["cache"] for sub in subs]
    logits_BxV, cache = decode_step(config, params, jnp.concatenate(toks),
                                    jnp.concatenate(poss),
                                    caches[0] if len(caches) == 1 else group_caches(caches))
    new_caches = [cache] if len(caches) == 1 else ungroup_caches(cache)
    new_states, o = [], 0
    for state, sub, c, active_B, r in zip(states, subs, new_caches, actives, rows):
        step_B = active_B.astype(jnp.int32)
        c = dict(c, index=c["index"] % c["pos"].shape[1])
        sub = dict(sub, cache=c, logits=logits_BxV[o:o + r].astype(jnp.float32),
                   pos=sub["pos"] + step_B, t=sub["t"] + step_B)
        new_states.append(sub if r == state["pos"].shape[0] else _put_rows(state, sub, config))
        o += r
    return tuple(outs), tuple(new_states)


def _place(x, axis: int, S: int, shift, fill):
    """A prefilled row's P slots (along `axis`) as a ring of S slots ending at `shift` + min(P, S):
    the last min(P, S) slots (the prompt sits at the end), padded with `fill`, rolled."""
    P = x.shape[axis]
    W = min(P, S)
    x = jax.lax.slice_in_dim(x, P - W, P, axis=axis)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, S - W)
    return jnp.roll(jnp.pad(x, widths, constant_values=fill), shift, axis=axis)


@functools.partial(jax.jit, static_argnames=("config",), donate_argnames=("state",))
def _insert_core(state, logits_1xV, pcache, length, slot, key_data_2, temp, top_p, *, config):
    """Put one prefilled request into `slot`: its keys/values end just before the write index."""
    bax, sax = _axes(config)
    H = config.n_head
    cache = state["cache"]
    S = cache["pos"].shape[1]
    shift = (cache["index"] - min(pcache["pos"].shape[1], S)) % S

    def put(x, new):
        new = _place(new, sax, S, shift, 0).astype(x.dtype)
        return jax.lax.dynamic_update_slice_in_dim(x, new, slot * H, axis=bax)

    layers = jax.tree_util.tree_map(put, cache["layers"], pcache["layers"])
    pos = jax.lax.dynamic_update_slice_in_dim(
        cache["pos"], _place(pcache["pos"], 1, S, shift, -1), slot, axis=0)
    return dict(state, cache={"layers": layers, "pos": pos, "index": cache["index"]},
                logits=state["logits"].at[slot].set(logits_1xV[0]),
                pos=state["pos"].at[slot].set(length), t=state["t"].at[slot].set(0),
                key=state["key"].at[slot].set(key_data_2), temp=state["temp"].at[slot].set(temp),
                top_p=state["top_p"].at[slot].set(top_p))


@functools.partial(jax.jit, static_argnames=("config", "slots"))
def _resize_core(state, *, config, slots):
    """The ring with `slots` slots: rolled so the write index is 0, the newest slots kept."""
    _, sax = _axes(config)
    cache = state["cache"]
    S = cache["pos"].shape[1]

    def move(x, axis, fill):
        x = jnp.roll(x, -cache["index"], axis=axis)  # slot written d steps ago is now at S - d
        if slots < S:
            return jax.lax.slice_in_dim(x, S - slots, S, axis=axis)
        widths = [(0, 0)] * x.ndim
        widths[axis] = (slots - S, 0)
        return jnp.pad(x, widths, constant_values=fill)

    cache = {"layers": jax.tree_util.tree_map(lambda x: move(x, sax, 0), cache["layers"]),
             "pos": move(cache["pos"], 1, -1), "index": jnp.zeros((), jnp.int32)}
    return dict(state, cache=cache)


def default_cache_buckets(n_ctx: int) -> tuple:
    """64, 256, 1024, ... below n_ctx, and n_ctx."""
    return tuple(sorted({b for b in (64, 256, 1024, 4096) if b < n_ctx} | {n_ctx}))


class SlotEngine(Engine):
    """A model over `slots` decode slots (continuous batching); see the module docstring.

    The slots form groups, each with its own decode state and ring: `slots - long_slots` short
    ones first, then one group per long slot, for requests needing more than the smallest ring.
    Every row of a ring attends over all of it, so short rows kept apart from a long request
    keep decoding over a short ring while it runs, and a long row alone in its group is stepped
    in place. The short group and one long slot share a model call (`calls`). A request takes a
    free slot of its kind, else any free slot.

    Args:
      config, params, tokenizer: the model; params may already be `prepare_for_decoding`'s
        result (e.g. with other weight formats), else they are prepared here.
      slots: decode slots (the most rows decoded together, and per request).
      prompt_buckets: prompt-length buckets (see ShapePlan).
      cache_buckets: ring lengths; the largest must be >= n_ctx. Each group's ring is the
        smallest that holds every one of its rows' prompt + max_tokens.
      long_slots: long slots (default slots // 4; 0: one group).
    """

    def __init__(self, config: GPTConfig, params: Any, tokenizer: Any, *, slots: int = 8,
                 prompt_buckets=None, cache_buckets=None, long_slots=None):
        super().__init__(config, params, tokenizer, ShapePlan(config.n_ctx, (slots,),
                                                              prompt_buckets))
        self.slots = int(slots)
        self.cache_buckets = tuple(sorted({int(s) for s in (
            cache_buckets or default_cache_buckets(config.n_ctx))}))
        if self.cache_buckets[0] < 2 or self.cache_buckets[-1] < config.n_ctx:
            raise ValueError(f"cache_buckets={self.cache_buckets}: give lengths >= 2, the largest "
                             f">= n_ctx = {config.n_ctx}")
        n_long = self.slots // 4 if long_slots is None else int(long_slots)
        if not 0 <= n_long < self.slots:
            raise ValueError(f"long_slots={long_slots}: give 0 .. slots - 1 = {self.slots - 1}")
        first = self.slots - n_long  # the short group, then one group per long slot
        self.groups = ((0, first),) + tuple((first + i, 1) for i in range(n_long))
        self.model_calls = collections.Counter()  # groups per model call -> calls made
        self.reset()

    def reset(self) -> None:
        """Every slot free, the smallest rings (also after a failed step: donated state is gone)."""
        self.states = [empty_state(self.config, n, self.cache_buckets[0]) for _, n in self.groups]

    @property
    def cache_lens(self) -> tuple:
        """Each group's ring length."""
        return tuple(int(st["cache"]["pos"].shape[1]) for st in self.states)

    def cache_bucket(self, need: int) -> int:
        """The smallest ring holding `need` slots."""
        return next(s for s in self.cache_buckets if s >= need)

    def _group(self, slot: int) -> tuple:
        """(group index, slot within it)."""
        g = max(i for i, (o, _) in enumerate(self.groups) if o <= slot)
        return g, slot - self.groups[g][0]

    def pick_slot(self, need: int, free) -> int:
        """The slot a row needing `need` ring slots takes among `free` ones: the first of its
        kind (long: need > the smallest ring), else the first free one."""
        first = self.groups[0][1]
        mine = [s for s in free if (s >= first) == (need > self.cache_buckets[0])]
        return min(mine or free)

    def fit(self, needs: dict) -> None:
        """Move each group's ring to the smallest bucket holding its rows (`needs`: slot -> ring
        slots its row needs), keeping running rows; a group with no row keeps its ring."""
        for g in range(len(self.groups)):
            mine = [n for s, n in needs.items() if self._group(s)[0] == g]
            if mine:
                self.resize(self.cache_bucket(max(mine)), g)

    def resize(self, cache_len: int, group: int = 0) -> None:
        """Move a group's ring to `cache_len` slots (a cache bucket), keeping running rows."""
        if cache_len != self.cache_lens[group]:
            self.states[group] = _resize_core(self.states[group], config=self.config,
                                              slots=int(cache_len))

    def prefill(self, ids: list) -> tuple:
        """(first-token logits [1, V], cache rows with P slots) for one prompt, P its bucket."""
        P = self.plan.prompt_bucket(len(ids))
        tokens = np.zeros((1, P), np.int32)
        tokens[0, P - len(ids):] = ids
        return _prefill_core(self.params, tokens, np.array([len(ids)], np.int32),
                             config=self.config)

    def insert(self, prefilled: tuple, row, slot: int) -> None:
        """Put a prefilled prompt into a free slot, with the row's key and sampling settings."""
        logits, pcache = prefilled
        g, i = self._group(slot)
        self.states[g] = _insert_core(self.states[g], logits, pcache, np.int32(len(row.ids)),
                                      np.int32(i), row.key_data, np.float32(row.temperature),
                                      np.float32(row.top_p), config=self.config)

    @staticmethod
    def row_buckets(n: int) -> tuple:
        """Decode-step widths of a group of n slots: 1 (a lone row reads a fraction of the cache,
        at the price of copying its rows out) and n (the cache updated in place). Widths in
        between cost more than the whole step: XLA:CPU's copy of the rows' cache is slow
        (measured: 2 of 8 rows at S=1024 took ~2x the 8-row step)."""
        return tuple(sorted({1, n}))

    def generate(self, active: np.ndarray) -> list:
        """One decode step (`active` [slots] bool): per group holding an active slot, a step over
        the smallest row bucket that holds them. The short group at its smallest ring and one
        long slot share one model call (`calls`). Returns [(first slot, device arrays (token,
        its logprob, top logprobs, their ids) per slot of the bucket)], not yet read (`read`)."""
        active = np.asarray(active, bool)
        outs = []
        for call in self.calls(active):
            self.model_calls[len(call)] += 1
            states = tuple(self.states[g] for g, _ in call)
            masks = tuple(active[self.groups[g][0]:self.groups[g][0] + r] for g, r in call)
            res, states = _generate_core(self.params, states, masks, config=self.config,
                                         rows=tuple(r for _, r in call))
            for (g, _), out, st in zip(call, res, states):
                self.states[g] = st
                outs.append((self.groups[g][0], out))
        return outs

    def calls(self, active: np.ndarray) -> list:
        """The model calls of one step: [[(group, rows), ...], ...]. Each group holding an active
        slot steps over the smallest row bucket that holds them; the short group, while its ring
        is the smallest, and the first long slot holding a row go through one call (the weights
        read once for both), every other group alone. Fusing only that pair keeps the compiled
        shapes few: (short row buckets) x (long rings) more than one call per group."""
        steps = []
        for g, (o, n) in enumerate(self.groups):
            mine = active[o:o + n]
            if mine.any():
                last = int(np.flatnonzero(mine)[-1]) + 1
                steps.append((g, next(r for r in self.row_buckets(n) if r >= last)))
        if (len(steps) > 1 and steps[0][0] == 0 and len(self.groups) > 1
                and self.cache_lens[0] == self.cache_buckets[0]):
            return [steps[:2]] + [[s] for s in steps[2:]]
        return [[s] for s in steps]

    def read(self, outs: list) -> tuple:
        """`generate`'s result on the host: (tokens, logprobs, top logprobs, their ids), one per
        slot (zeros for slots no step covered)."""
        full = (np.zeros(self.slots, np.int32), np.zeros(self.slots, np.float32),
                np.zeros((self.slots, MAX_LOGPROBS), np.float32),
                np.zeros((self.slots, MAX_LOGPROBS), np.int32))
        for o, out in jax.device_get(outs):
            for dst, src in zip(full, out):
                dst[o:o + len(src)] = src
        return full

    def warmup(self) -> float:
        """Compile every prefill, insert, step and resize shape; returns seconds taken."""
        start = time.perf_counter()
        row = self.make_row([0], seed=0, temperature=1.0, top_p=0.9, max_tokens=1, logprobs=5,
                            stops=(), index=0)
        prev, pre = 0, {}
        for P in self.plan.prompt_buckets:
            L = min(P, self.config.n_ctx - 1)
            if L > prev and self.plan.prompt_bucket(L) == P:  # reachable by some prompt
                pre[P] = (prev, self.prefill([0] * L))
            prev = P
        for g, (o, n) in enumerate(self.groups):
            for a in self.cache_buckets:
                for b in self.cache_buckets:
                    self.resize(a, g)
                    self.resize(b, g)
            for S in self.cache_buckets:
                self.resize(S, g)
                for P, (shortest, prefilled) in pre.items():
                    if shortest + 2 <= S:  # a prompt of this bucket plus one token fits the ring
                        self.insert(prefilled, row, o)
                for r in self.row_buckets(n):
                    self.read(self.generate((np.arange(self.slots) >= o)
                                            & (np.arange(self.slots) < o + r)))
        if len(self.groups) > 1:  # the short group with the first long slot, in one call
            o, n = self.groups[1]
            self.resize(self.cache_buckets[0], 0)
            for S in self.cache_buckets:
                self.resize(S, 1)
                for r in self.row_buckets(self.groups[0][1]):
                    self.read(self.generate((np.arange(self.slots) < r)
                                            | (np.arange(self.slots) == o)))
        self.reset()
        self._advance(row, 0, 0.0, np.zeros(MAX_LOGPROBS), np.zeros(MAX_LOGPROBS, np.int32))
        return time.perf_counter() - start

    def describe(self) -> dict:
        return {"slots": self.slots, "prompt_buckets": list(self.plan.prompt_buckets),
                "cache_buckets": list(self.cache_buckets),
                "slot_groups": [n for _, n in self.groups]}


def need(row) -> int:
    """Ring slots a row needs: its prompt and every token it may generate."""
    return len(row.ids) + row.max_tokens


def need_now(row) -> int:
    """Ring slots a row needs through the next step: its prompt, the tokens the host has read,
    the step in flight and the one about to be dispatched (at most `need`). A ring sized by this
    grows with a long request (resize keeps the newest slots), so it attends over 64 or 256
    slots for its first tokens, not over the ring its last ones need."""
    return min(need(row), len(row.ids) + len(row.new_ids) + 2)
