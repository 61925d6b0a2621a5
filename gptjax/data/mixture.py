"""Weighted mixtures of corpora: which corpus each row of a batch reads, a pure function of
(seed, step, row), so the global batch is the same for any number of processes and a run resumes
exactly, also across a change of weights at a scheduled step.

* **Corpora.** `data.mixture` names the corpora, one string each:
  `'name=web;weight=0.7;dataset=local_text;path=web/*.txt'`. A corpus takes the `data.*` fields it
  names (`SOURCE_KEYS`) and the run's for the rest; each keeps its own token cache (or shards), so
  changing weights never retokenizes anything.
* **Schedule.** `data.mixture_schedule` changes weights at given steps:
  `'1000:web=0.2,code=0.8'` (corpora not named keep their weight).
* **Rows.** The rows of the global batch are cut into streams as the pipeline reads them (one
  stream of B rows with `data.pipeline='single'`; `sharded.Layout`'s streams with 'sharded'), and
  stream k's rows, step after step, form one sequence h = step * n_k + i. Each weight phase cuts
  its part of the sequence into blocks of `BLOCK` rows; a block gives corpus c exactly `c_c` rows
  (BLOCK x weight, largest remainders), spread through the block in stratified order with a
  random shift drawn from (seed, k, phase, block): any stretch of rows holds each corpus within
  one row of its share. The row that is corpus c's m-th in its block is that corpus' draw
  `before + block * c_c + m`, `before` being its rows in the earlier phases (closed form), so
  nothing is carried from step to step.
* **Windows.** Corpus c's draw d in stream k is a window of its tokens (its stream's, sharded):
  'packed' windows in a permutation per (seed, c, k, epoch), each window once per epoch of the
  corpus' own draws; 'random_offset' offsets drawn from (seed, c, k, d // BLOCK).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Sequence

import numpy as np

from gptjax.checks import check_choice, check_int
from gptjax.data import sharded
from gptjax.data.lm import MODES

BLOCK = 1024
# The data.* fields a corpus of a mixture may set (the run's are taken for the others).
SOURCE_KEYS = ("dataset", "path", "data_dir", "encoding", "text_key", "validation_fraction",
               "max_train_bytes")
# Random streams (lm.py uses 0 and 1, sharded.py 2 and 3).
_LABEL_STREAM, _PACKED_STREAM, _OFFSET_STREAM = 4, 5, 6


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(seed, spawn_key=key)))


# ================================================================================ config
@dataclasses.dataclass(frozen=True)
class Corpus:
    """One corpus of a mixture: its name, weight and the data.* fields it sets."""

    name: str
    weight: float
    fields: dict


def _weight(text: str, what: str) -> float:
    try:
        w = float(text)
    except ValueError:
        w = math.nan
    if not math.isfinite(w) or w < 0:
        raise ValueError(f"{what}: weight {text!r}; allowed: a finite number >= 0")
    return w


def parse_mixture(entries: Sequence[str]) -> list[Corpus]:
    """The corpora of `data.mixture` (see the module docstring); ValueError names a bad entry."""
    if isinstance(entries, str):
        entries = (entries,)
    corpora = []
    for entry in entries:
        fields = {}
        for part in str(entry).split(";"):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in ("name", "weight") + SOURCE_KEYS:
                raise ValueError(f"data.mixture entry {entry!r}: {part!r} is not key=value with "
                                 f"a key in {('name', 'weight') + SOURCE_KEYS}")
            fields[key] = value.strip()
        name = fields.pop("name", "")
        if not name or not all(ch.isalnum() or ch in "_-." for ch in name):
            raise ValueError(f"data.mixture entry {entry!r}: name={name!r}; allowed: a non-empty "
                             "name of letters, digits, '_', '-', '.'")
        if name in (c.name for c in corpora):
            raise ValueError(f"data.mixture: two corpora are named {name!r}")
        if "weight" not in fields:
            raise ValueError(f"data.mixture entry {entry!r} has no weight=")
        weight = _weight(fields.pop("weight"), f"data.mixture corpus {name!r}")
        corpora.append(Corpus(name, weight, fields))
    return corpora


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The weights of each phase: `starts[j]` is the first step of phase j, `weights[j]` its
    weights (summing to 1), one per corpus in `names` order."""

    names: tuple
    starts: tuple
    weights: tuple

    def phase_at(self, step: int) -> int:
        return int(np.searchsorted(self.starts, step, side="right")) - 1

    def to_json(self) -> list:
        return [[s, list(w)] for s, w in zip(self.starts, self.weights)]

    def same_before(self, saved: list, step: int) -> bool:
        """Whether `saved` (a `to_json()`) gives the same weights as this at every step < step."""
        if step <= 0:
            return True
        mine = [(s, list(w)) for s, w in zip(self.starts, self.weights) if s < step]
        return mine == [(s, list(w)) for s, w in saved if s < step]


def make_schedule(corpora: Sequence[Corpus], entries: Sequence[str] = (),
                  steps: int | None = None) -> Schedule:
    """The weight phases of `corpora` and `data.mixture_schedule` entries 'step:name=w,...'.

    Raises:
      ValueError: weights that do not sum to a positive number, an unknown corpus, a step
        outside 1..steps-1 (`steps`: the run's), or a malformed entry. Entries apply in
        step order; two of one step apply in the order given.
    """
    names = tuple(c.name for c in corpora)
    if not names:
        raise ValueError("data.mixture is empty; allowed: one or more 'name=...;weight=...' "
                         "entries")
    current = [c.weight for c in corpora]
    phases = {0: _normalized(current, "data.mixture")}
    if isinstance(entries, str):
        entries = (entries,)
    changes = {}  # step -> (entry, {corpus index: weight}), applied in step order below
    for entry in entries:
        step_text, colon, rest = str(entry).partition(":")
        try:
            step = int(step_text)
        except ValueError:
            step = -1
        if not colon or step < 1 or (steps is not None and step >= steps):
            last = "" if steps is None else f" (train.steps={steps}: 1..{steps - 1})"
            raise ValueError(f"data.mixture_schedule entry {entry!r}: allowed: "
                             f"'step:name=weight,...' with 1 <= step < train.steps{last}")
        new = changes[step][1] if step in changes else {}  # (two entries of a step: both)
        for part in rest.split(","):
            name, eq, w = part.partition("=")
            if name.strip() not in names or not eq:
                raise ValueError(f"data.mixture_schedule entry {entry!r}: corpus "
                                 f"{name.strip()!r} is not in data.mixture; allowed: "
                                 f"{', '.join(names)}")
            new[names.index(name.strip())] = _weight(w, f"data.mixture_schedule {entry!r}")
        changes[step] = (changes[step][0] + ", " + repr(entry) if step in changes
                         else repr(entry), new)
    for step in sorted(changes):  # (entries in any order: each keeps the weights before it)
        entry, new = changes[step]
        for i, w in new.items():
            current[i] = w
        phases[step] = _normalized(current, f"data.mixture_schedule entry {entry}")
    starts = tuple(sorted(phases))
    return Schedule(names, starts, tuple(phases[s] for s in starts))


def _normalized(weights: list, what: str) -> tuple:
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"{what}: the weights {weights} sum to {total:g}; allowed: weights >= 0 "
                         "summing to a positive number")
    return tuple(float(w) / total for w in weights)


def block_counts(weights: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Rows of each corpus in a block: block x weight, rounded by largest remainders (ties to
    the first corpus), summing to `block`."""
    exact = np.asarray(weights, np.float64) * block
    counts = np.floor(exact).astype(np.int64)
    short = block - int(counts.sum())
    order = np.lexsort((np.arange(len(exact)), -(exact - counts)))
    counts[order[:short]] += 1
    return counts


# ================================================================================ rows
class Labels:
    """Which corpus each row of a stream reads, and which of that corpus' draws it is.

    Args:
      schedule: the weight phases.
      seed: the run's seed.
    """

    def __init__(self, schedule: Schedule, seed: int):
        self.schedule, self.seed = schedule, int(seed)
        self.counts = [block_counts(w) for w in schedule.weights]
        self._blocks: dict = {}
        self._before: dict = {}  # (k, n) -> draws of each corpus before each phase

    def block(self, k: int, phase: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """(corpus, rank among the block's rows of that corpus) of each row of block b."""
        key = (k, phase, b)
        if key not in self._blocks:
            if len(self._blocks) >= 4096:
                self._blocks.pop(next(iter(self._blocks)))
            c = self.counts[phase]
            shift = _rng(self.seed, _LABEL_STREAM, k, phase, b).random(len(c))
            # Stratified: the m-th of c rows sits at (m + shift) / c of the block.
            pos = np.concatenate([(np.arange(n) + shift[i]) / max(n, 1) for i, n in enumerate(c)])
            corpus = np.repeat(np.arange(len(c)), c)
            rank = np.concatenate([np.arange(n) for n in c])
            order = np.lexsort((corpus, pos))
            self._blocks[key] = (corpus[order], rank[order])
        return self._blocks[key]

    def _draws_before(self, k: int, n: int) -> np.ndarray:
        """[phase, corpus]: draws of each corpus in stream k (n rows a step) before each phase."""
        if (k, n) not in self._before:
            starts = self.schedule.starts
            out = np.zeros((len(starts), len(self.counts[0])), np.int64)
            for j in range(1, len(starts)):
                rows = (starts[j] - starts[j - 1]) * n
                full, part = divmod(rows, BLOCK)
                last = np.bincount(self.block(k, j - 1, full)[0][:part],
                                   minlength=out.shape[1]) if part else 0
                out[j] = out[j - 1] + full * self.counts[j - 1] + last
            self._before[(k, n)] = out
        return self._before[(k, n)]

    def rows(self, k: int, n: int, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(corpus, draw) of rows `h` (= step * n + i) of stream k, which has n rows a step."""
        h = np.asarray(h, np.int64)
        starts = self.schedule.starts
        phase = (np.searchsorted(np.asarray(starts) * n, h, side="right") - 1
                 if len(starts) > 1 else np.zeros_like(h))
        before = self._draws_before(k, n)
        corpus, draw = np.empty_like(h), np.empty_like(h)
        for j in (0,) if len(starts) == 1 else np.unique(phase).tolist():
            at = slice(None) if len(starts) == 1 else phase == j
            b, pos = np.divmod(h[at] - starts[j] * n, BLOCK)
            c_at, d_at = np.empty_like(b), np.empty_like(b)
            for blk in np.unique(b).tolist():  # (a step's rows: one or two blocks)
                sel = b == blk
                lab, rank = self.block(k, j, blk)
                c = lab[pos[sel]]
                c_at[sel] = c
                d_at[sel] = before[j, c] + blk * self.counts[j][c] + rank[pos[sel]]
            corpus[at], draw[at] = c_at, d_at
        return corpus, draw


# ================================================================================ batches
class MixtureBatcher:
    """Training batches of a weighted mixture, a `gptjax.data.batcher.Batcher`, pure in
    (seed, step) whatever the process count (see the module docstring).

    Args:
      tokens: {(corpus index, stream): token ids} for at least this process's streams.
      schedule: the weight phases (corpus order = `schedule.names`).
      seq_len: T.
      global_batch_size: B.
      seed: non-negative integer seed.
      mode: 'packed' or 'random_offset'.
      layout: which stream each row reads (`sharded.Layout`; `Layout(B, 1)`: one stream).
      process_index, process_count: this process and the number of processes.
      fingerprints: identifies each corpus' tokens (and the pipeline), in `schedule.names` order.
    """

    def __init__(self, tokens: dict, schedule: Schedule, seq_len: int, global_batch_size: int,
                 seed: int, mode: str, layout: Any, *, process_index: int = 0,
                 process_count: int = 1, fingerprints: Sequence[str] = (),
                 virtual_shards: int = 0):
        check_choice("mode", mode, MODES)
        check_int("seed", seed, 0)
        self.schedule, self.layout = schedule, layout
        self.seq_len, self.global_batch_size = int(seq_len), int(global_batch_size)
        self.seed, self.mode, self.virtual_shards = int(seed), mode, int(virtual_shards)
        self.local_batch_size = self.global_batch_size // process_count
        self.labels = Labels(schedule, seed)
        # `proportions` has its own (equal) Labels: the loop logs on the main thread while a
        # Prefetcher builds batches on another, and the two must not share the caches.
        self._log_labels = Labels(schedule, seed)
        self.streams = layout.streams_of_process(process_index, process_count)
        # (plain views of memory-mapped files: slicing an np.memmap costs more)
        self.tokens = {key: np.asarray(t) for key, t in tokens.items()}
        for (c, k), toks in self.tokens.items():
            if k in self.streams and len(toks) < self.seq_len + 1:
                raise ValueError(f"corpus {schedule.names[c]!r} (stream {k}) has {len(toks)} "
                                 f"tokens, fewer than one sequence (seq_len {self.seq_len} + 1)")
        self.fingerprint = hashlib.sha256(json.dumps(
            [list(schedule.names), list(fingerprints)]).encode()).hexdigest()[:16]
        # Each row of this process: (stream, index among the stream's rows, rows of the stream).
        self._rows = []
        for r in range(process_index * self.local_batch_size,
                       (process_index + 1) * self.local_batch_size):
            k = layout.stream_of_row(r)
            rows = layout.rows_of_stream(k)
            self._rows.append((k, r - rows.start, len(rows)))
        # stream -> (this process's rows in it, their index among its rows, its rows a step)
        self._by_stream = {}
        for k in self.streams:
            at = [j for j, row in enumerate(self._rows) if row[0] == k]
            self._by_stream[k] = (np.array(at), np.array([self._rows[j][1] for j in at]),
                                  self._rows[at[0]][2])
        self._perms: dict = {}

    def _permutation(self, c: int, k: int, epoch: int, windows: int) -> np.ndarray:
        key = (c, k, epoch)
        if key not in self._perms:
            if len(self._perms) >= 4 * len(self.tokens):
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = _rng(self.seed, _PACKED_STREAM, c, k, epoch).permutation(windows)
        return self._perms[key]

    def _starts(self, c: int, k: int, d: np.ndarray) -> np.ndarray:
        """Start offsets of corpus c's draws `d` (ascending) in stream k."""
        toks, T = self.tokens[(c, k)], self.seq_len
        if self.mode == "packed":
            windows = (len(toks) - 1) // T
            epoch, pos = np.divmod(d, windows)
            if epoch[0] == epoch[-1]:
                return self._permutation(c, k, int(epoch[0]), windows)[pos] * T
            return np.concatenate([self._permutation(c, k, int(e), windows)[pos[epoch == e]]
                                   for e in np.unique(epoch)]) * T
        chunk, i = np.divmod(d, BLOCK)
        return np.concatenate([_rng(self.seed, _OFFSET_STREAM, c, k, int(ch)).integers(
            0, len(toks) - T, size=BLOCK)[i[chunk == ch]] for ch in np.unique(chunk)])

    def _sources(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stream, corpus, draw) of each of this process's rows at `step`."""
        stream, corpus, draw = (np.empty(len(self._rows), np.int64) for _ in range(3))
        for k, (rows, i, n) in self._by_stream.items():
            stream[rows] = k
            corpus[rows], draw[rows] = self.labels.rows(k, n, step * n + i)
        return stream, corpus, draw

    def sources(self, step: int) -> np.ndarray:
        """The corpus index of each of this process's rows at `step`."""
        return self._sources(step)[1]

    def batch(self, step: int) -> dict:
        """This process's rows of the global batch of `step`: dict(inputs, targets) int32
        [B / P, T]."""
        if step < 0:
            raise ValueError(f"step={step}; allowed: step >= 0")
        stream, corpus, draw = self._sources(step)
        T1 = self.seq_len + 1
        win_BxT1 = np.empty((self.local_batch_size, T1), np.int32)
        for c, k in set(zip(corpus.tolist(), stream.tolist())):
            rows = np.flatnonzero((corpus == c) & (stream == k))
            toks = self.tokens[(c, k)]
            # A slice per row: faster than one fancy index of B x (T + 1) positions.
            for r, s in zip(rows.tolist(), self._starts(c, k, draw[rows]).tolist()):
                win_BxT1[r] = toks[s:s + T1]
        # As lm._gather cuts its windows: contiguous inputs and targets that never alias.
        return dict(inputs=np.ascontiguousarray(win_BxT1[:, :-1]),
                    targets=np.ascontiguousarray(win_BxT1[:, 1:]))

    def proportions(self, first: int, end: int) -> dict:
        """{corpus name: its share of the global batch's rows over steps [first, end)}."""
        counts = np.zeros(len(self.schedule.names), np.int64)
        for k in range(self.layout.num_streams):
            n = len(self.layout.rows_of_stream(k))
            c, _ = self._log_labels.rows(k, n, np.arange(first * n, end * n))
            counts += np.bincount(c, minlength=len(counts))
        total = max(int(counts.sum()), 1)
        return {name: float(counts[i]) / total for i, name in enumerate(self.schedule.names)}

    def state(self) -> dict:
        """What defines the batches, as plain JSON-able values, for the checkpoint."""
        return dict(seed=self.seed, mode=self.mode, fingerprint=self.fingerprint,
                    seq_len=self.seq_len, global_batch_size=self.global_batch_size,
                    virtual_shards=self.virtual_shards, mixture=list(self.schedule.names),
                    mixture_schedule=self.schedule.to_json(), mixture_block=BLOCK)

    def check_state(self, state: dict) -> None:
        """Raises ValueError when a saved state was made for other data or another batching. The
        weights may differ only from the saved step on (a schedule entry added for later steps);
        the process count is free."""
        now = self.state()
        for key in ("fingerprint", "seed", "mode", "seq_len", "global_batch_size",
                    "virtual_shards", "mixture", "mixture_block"):
            if state.get(key) != now[key]:
                what = ("the corpora, splits or tokenizer differ" if key == "fingerprint"
                        else "config changed")
                raise ValueError(f"data state mismatch: checkpoint {key}={state.get(key)!r}, "
                                 f"now {now[key]!r} ({what})")
        saved = state.get("mixture_schedule") or []
        step = state.get("step")
        if not self.schedule.same_before(saved, math.inf if step is None else int(step)):
            raise ValueError(f"data state mismatch: the mixture weights before step {step} "
                             f"were {saved}, now {now['mixture_schedule']} (the weights may "
                             "change only from the resumed step on)")

    def restore(self, state: dict) -> None:
        """Checks `state` against this batcher (its batches are a function of the step)."""
        self.check_state(state)

    def close(self) -> None:
        """Nothing to release."""


def build_batcher(schedule: Schedule, sources: Sequence[Any], tokenizer: Any, *,
                  tokens: Sequence[np.ndarray] | None = None, seq_len: int,
                  global_batch_size: int, seed: int, mode: str, num_shards: int = 0,
                  shards_dir: str = "", workers: int = 0, process_index: int = 0,
                  process_count: int = 1, log=print) -> MixtureBatcher:
    """This process's MixtureBatcher: from each corpus' whole token array (`tokens`, the
    'single' pipeline: one stream of B rows), or, without `tokens`, from this process's virtual
    shards of each corpus' train split, tokenized where missing (`sharded.build_batcher`).

    Args:
      schedule: the weight phases; `sources` and `tokens` are in `schedule.names` order.
      sources: each corpus' TextSource (its fingerprint identifies it).
      tokenizer: the run's tokenizer.
      tokens, seq_len, global_batch_size, seed, mode: see MixtureBatcher.
      num_shards, shards_dir, workers, log: the sharded pipeline's (see sharded.build_batcher).
      process_index, process_count: this process and the number of processes.
    """
    where = dict(process_index=process_index, process_count=process_count)
    if tokens is not None:
        parts = {(c, 0): t for c, t in enumerate(tokens)}
        fps = [s.fingerprint for s in sources]
        return MixtureBatcher(parts, schedule, seq_len, global_batch_size, seed, mode,
                              sharded.Layout(global_batch_size, 1), fingerprints=fps, **where)
    parts, fps = {}, []
    for c, (name, source) in enumerate(zip(schedule.names, sources)):
        try:
            b = sharded.build_batcher(source, "train", tokenizer, seq_len=seq_len,
                                      global_batch_size=global_batch_size, seed=seed,
                                      mode=mode, num_shards=num_shards, shards_dir=shards_dir,
                                      workers=workers,
                                      log=lambda m, name=name: log(f"{name}: {m}"), **where)
        except ValueError as e:  # (a stream too short for a window: name the corpus)
            raise ValueError(f"data.mixture corpus {name!r}: {e}") from None
        parts.update({(c, k): t for k, t in b.stream_tokens.items()})
        fps.append(b.fingerprint)
    return MixtureBatcher(parts, schedule, seq_len, global_batch_size, seed, mode,
                          sharded.Layout(global_batch_size, num_shards), fingerprints=fps,
                          virtual_shards=num_shards, **where)
