"""Data at pod scale: each process reads and tokenizes only its share of a corpus, in parallel.

The small-corpus path (`token_cache.load_tokens`: one process tokenizes a whole split into one
cached .npy that every process reads) is right for Tiny Shakespeare and the embedded corpus. On
a pod the hosts share no local disk and a corpus is billions of tokens, so `data.pipeline =
'sharded'` does this instead:

* **Virtual shards.** Document i of the split belongs to virtual shard i mod V (V =
  `data.virtual_shards`, 1024 by default), whatever the number of processes.
* **Streams.** The global batch has B rows; row r reads stream k(r) = r * K // B, K = min(B, V),
  and stream k is the concatenation of shards k, k + K, k + 2K, ... (interleaved, so a corpus of
  few documents still fills every stream), each a run of its documents in order with the
  end-of-text token between documents. The n_k rows of stream k take
  its windows n_k at a time: at step s, its i-th row takes window s * n_k + i (in a permutation
  drawn from (seed, k, epoch) in 'packed' mode; at an offset drawn from (seed, k, s) in nanoGPT's
  'random_offset' mode).
* **Processes.** Process p of P feeds rows [p B / P, (p + 1) B / P), so it reads, tokenizes and
  caches only the shards of those rows' streams. Nothing in a row depends on P, so the global
  batch at step s is a pure function of (seed, s): bit-identical for 1, 2 or 4 processes, and a
  run resumes exactly, also on another number of processes.
* **Workers.** A process tokenizes its documents with grain's `DataLoader` (`data.workers`
  worker processes; 0 tokenizes in the calling process), reading through the source's random
  access (`tfds.data_source` / array_record), and writes one token file per shard to its own
  cache directory (atomically: an interrupted run never leaves half a shard). Those files are
  the pre-tokenized format: a later run with the same corpus, tokenizer and V reads them
  (`prepare_token_shards` writes them ahead of training, one process per host in parallel).
* **Worker memory.** The batched reads of tfds/grain's array_record sources run on a fresh
  thread each, and glibc gives threads their own malloc heaps; in a worker that fragmented into
  memory that grew with the text read, and grain's default read-ahead (16 threads, 500 chunks)
  added more: a worker's peak was 1.3 GB on a 1 GB corpus. The library's worker processes use
  one malloc heap (`_one_malloc_heap`) and read 8 chunks ahead on 2 threads: 293 MB on 100 MB,
  502 MB on 1 GB. What still grows is per document, not per byte: array_record's in-memory
  record index and the worker's list of its documents. The calling process is left as its
  caller set it up.
* **Bad records.** A document that is not valid UTF-8 is counted and skipped (the count is
  printed and kept in `ShardedBatcher.skipped_docs`); a worker that dies raises an error naming
  the worker count; nothing waits forever.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from typing import Any, Sequence

import numpy as np
from absl import flags

from gptjax import glibc
from gptjax.checks import check_choice, check_int
from gptjax.data.lm import MODES, _rng
from gptjax.data.token_cache import _write_npy_atomically, check_ids, token_dtype
from gptjax.data.tokenizers import Tokenizer, fingerprint

DEFAULT_VIRTUAL_SHARDS = 1024
# Bumped when a shard file's layout changes, so old shard files are not misread.
_SHARD_FORMAT = 1
# The random-number streams of this module (lm.py uses 0 and 1 for its own modes).
_PACKED_STREAM, _OFFSET_STREAM = 2, 3


# ================================================================================ layout
@dataclasses.dataclass(frozen=True)
class Layout:
    """Which stream each row of the global batch reads, and which shards each stream holds.

    Args:
      global_batch_size: B, rows over all processes.
      num_shards: V, virtual shards.
    """

    global_batch_size: int
    num_shards: int

    def __post_init__(self):
        if self.global_batch_size < 1 or self.num_shards < 1:
            raise ValueError(f"global_batch_size={self.global_batch_size}, "
                             f"virtual_shards={self.num_shards}: allowed: positive integers")

    @property
    def num_streams(self) -> int:
        """K = min(B, V)."""
        return min(self.global_batch_size, self.num_shards)

    def stream_of_row(self, row: int) -> int:
        return row * self.num_streams // self.global_batch_size

    def rows_of_stream(self, k: int) -> range:
        """The rows reading stream k: r with r K // B == k."""
        B, K = self.global_batch_size, self.num_streams
        return range(-(-k * B // K), -(-(k + 1) * B // K))

    def shards_of_stream(self, k: int) -> range:
        """Shards k, k + K, k + 2K, ...: interleaved, so documents i go to stream i mod K (when K
        divides V) and a corpus of few documents still fills every stream."""
        return range(k, self.num_shards, self.num_streams)

    def streams_of_process(self, process_index: int, process_count: int) -> list:
        """The streams that process p's rows read (in order)."""
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index}, process_count={process_count}; "
                             "allowed: 0 <= index < count")
        if self.global_batch_size % process_count:
            raise ValueError(f"global_batch_size={self.global_batch_size} is not divisible by "
                             f"process_count={process_count}")
        n = self.global_batch_size // process_count
        rows = range(process_index * n, (process_index + 1) * n)
        return sorted({self.stream_of_row(r) for r in rows})

    def shards_of_process(self, process_index: int, process_count: int) -> list:
        return [v for k in self.streams_of_process(process_index, process_count)
                for v in self.shards_of_stream(k)]


# ================================================================================ tokenizing
# Documents per grain record: a worker tokenizes a chunk of documents and returns their ids in
# one array, so the per-record cost of moving results between processes is paid per chunk.
CHUNK_DOCS = 256
# Threads of a grain worker that read chunks while it tokenizes.
READ_THREADS = 2


_one_heap_pid = None


def _one_malloc_heap() -> bool:
    """In a worker process (once): every thread allocates from one glibc malloc heap.

    grain's and tfds's array_record sources read each batch on a new thread; with glibc's
    per-thread heaps (arenas) the records' memory is spread over several heaps and freed from
    another thread, and the worker's resident memory grows with the documents read instead of
    staying flat. Returns True if the option is in effect (False off glibc).
    """
    global _one_heap_pid
    if _one_heap_pid == os.getpid():
        return True
    if not glibc.mallopt(glibc.M_ARENA_MAX, 1):
        return False
    _one_heap_pid = os.getpid()
    return True


class _Chunks:
    """Chunks of documents of some shards, in (shard, index) order, as a random-access source
    (grain's workers read through it with the source's own random access). A chunk holds up to
    CHUNK_DOCS documents of one shard."""

    def __init__(self, data_source: Any, indices: np.ndarray, shards: np.ndarray,
                 text_key: str):
        self.data_source, self.indices, self.text_key = data_source, indices, text_key
        self.owner_pid = os.getpid()  # the process that tokenizes with workers
        n = len(indices)
        runs = np.concatenate([[0], np.flatnonzero(np.diff(shards)) + 1, [n]]) if n else [0, 0]
        starts = [np.arange(a, b, CHUNK_DOCS) for a, b in zip(runs[:-1], runs[1:]) if b > a]
        self.bounds = [int(b) for b in np.concatenate(starts + [[n]])] if n else [0]
        self.shard = [int(shards[b]) for b in self.bounds[:-1]]

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, c: int) -> list:
        if os.getpid() != self.owner_pid:  # a worker process of the library's own
            _one_malloc_heap()
        idx = [int(i) for i in self.indices[self.bounds[c]:self.bounds[c + 1]]]
        # One batched read where the source has one (tfds and grain's array_record sources:
        # several times faster than a read per record).
        many = getattr(self.data_source, "__getitems__", None)
        records = many(idx) if many is not None else [self.data_source[i] for i in idx]
        return [r[self.text_key] for r in records]


class _Tokenize:
    """A chunk of documents (bytes or str) -> {'ids': their token ids concatenated, 'lens': each
    document's count, -1 for one that is not valid UTF-8 (the reader counts and skips it)}.
    grain's workers run it as `_GrainTokenize`."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def map(self, values: list) -> dict:
        ids, lens = [], []
        for value in values:
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    lens.append(-1)
                    continue
            x = np.asarray(self.tokenizer.encode(str(value)), dtype=np.int64)
            check_ids(x, self.tokenizer)
            ids.append(x)
            lens.append(x.size)
        return {"ids": np.concatenate(ids) if ids else np.zeros(0, np.int64),
                "lens": np.asarray(lens, np.int64)}


def __getattr__(name: str):
    # `_GrainTokenize`, grain's MapTransform of `_Tokenize`, is made on first use so that importing
    # this module does not import grain (1.4 s); a module attribute, so workers unpickle it.
    if name == "_GrainTokenize":
        import grain.python as grain  # heavy: grain, only when tokenizing with workers

        cls = type(name, (_Tokenize, grain.MapTransform), {"__module__": __name__,
                                                           "__qualname__": name})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _tokenized(chunks: _Chunks, tokenizer: Tokenizer, workers: int):
    """Yields each chunk's {'ids', 'lens'}, in order, from `workers` grain worker processes
    (0: this process)."""
    if workers == 0:
        tok = _Tokenize(tokenizer)
        for c in range(len(chunks)):
            yield tok.map(chunks[c])
        return
    import grain.python as grain  # heavy: grain, only when tokenizing with workers

    # grain's workers read absl flags, which a library caller may not have parsed.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    loader = grain.DataLoader(
        data_source=chunks,
        sampler=grain.IndexSampler(len(chunks), shuffle=False, num_epochs=1),
        operations=[__getattr__("_GrainTokenize")(tokenizer)], worker_count=workers,
        worker_buffer_size=4,  # chunks a worker may run ahead, so no worker waits on another
        # grain's default (16 reading threads, 500 chunks read ahead per worker) holds far more
        # documents than a worker that tokenizes at ~1 M tokens/s can use.
        read_options=grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=8))
    try:
        yield from loader
    except Exception as e:  # noqa: BLE001 - grain's worker failures come in several types
        first = str(e).splitlines()[0] if str(e) else ""
        raise RuntimeError(f"tokenizing with data.workers={workers} failed: "
                           f"{type(e).__name__}: {first} (a worker died or raised; "
                           "data.workers=0 tokenizes in this process)") from None


def shard_key(source_fingerprint: str, split: str, tokenizer: Tokenizer, num_shards: int) -> str:
    """What a shard file's content depends on: the corpus, the split, the tokenizer and V."""
    key = json.dumps([_SHARD_FORMAT, source_fingerprint, split, fingerprint(tokenizer),
                      num_shards])
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def shard_path(shards_dir: str, key: str, shard: int) -> str:
    return os.path.join(shards_dir, key, f"shard-{shard:05d}.npy")


def tokenize_shards(source: Any, split: str, tokenizer: Tokenizer, shards: Sequence[int], *,
                    num_shards: int, shards_dir: str, workers: int = 0,
                    log=print) -> tuple[dict, int]:
    """Token files of `shards` (written where missing) and the malformed documents skipped.

    Args:
      source: a TextSource (gptjax.data.corpora): its split is read by random access.
      split: the split.
      tokenizer: the run's tokenizer.
      shards: the virtual shards wanted.
      num_shards: V.
      shards_dir: this host's directory of token shards.
      workers: grain worker processes (0: tokenize in this process).
      log: where the progress line goes.

    Returns:
      ({shard: memory-mapped token ids}, malformed documents skipped while writing).
    """
    if workers < 0:
        raise ValueError(f"data.workers={workers}: allowed: 0 (this process) or more")
    key = shard_key(source.fingerprint, split, tokenizer, num_shards)
    os.makedirs(os.path.join(shards_dir, key), exist_ok=True)
    missing = [v for v in shards if not os.path.exists(shard_path(shards_dir, key, v))]
    skipped = 0
    if missing:
        data_source = source._data_source(split)
        n = len(data_source)
        # This process's documents in (shard, index) order: each shard's file in one pass.
        order = np.concatenate([np.arange(v, n, num_shards, dtype=np.int64) for v in missing])
        chunks = _Chunks(data_source, order, order % num_shards, source.text_key)
        log(f"tokenizing {len(order):,} of {n:,} documents ({len(missing)} of {num_shards} "
            f"virtual shards) with {workers or 'no'} worker processes into {shards_dir}")
        skipped = _write_shards(_tokenized(chunks, tokenizer, workers), chunks.shard, missing,
                                tokenizer, lambda v: shard_path(shards_dir, key, v))
        if skipped:
            log(f"skipped {skipped} malformed documents (not UTF-8)")
    return {v: np.load(shard_path(shards_dir, key, v), mmap_mode="r") for v in shards}, skipped


def _write_shards(chunk_iter, chunk_shards: Sequence[int], shards: Sequence[int],
                  tokenizer: Tokenizer, path_of) -> int:
    """Writes each shard's documents (from its chunks, in order; eos between documents) to its
    file; returns the malformed documents skipped. Every shard in `shards` gets a file, empty
    ones too."""
    dtype = token_dtype(tokenizer.vocab_size).newbyteorder("<")
    eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], dtype)
    skipped, it, c = 0, iter(chunk_iter), 0
    for v in shards:
        path = path_of(v)
        fd, raw_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".raw")
        count = docs = 0
        try:
            with os.fdopen(fd, "wb") as raw:
                while c < len(chunk_shards) and chunk_shards[c] == v:
                    rec = next(it)
                    c += 1
                    lens = np.asarray(rec["lens"])
                    skipped += int((lens < 0).sum())
                    lens = lens[lens > 0]  # an empty document would only add a stray eos
                    if not lens.size:
                        continue
                    ids = np.asarray(rec["ids"]).astype(dtype)
                    if eos is not None:
                        # eos before every document but the shard's first, in one insert.
                        at = np.cumsum(lens)[:-1] if docs == 0 else np.concatenate(
                            [[0], np.cumsum(lens)[:-1]])
                        ids = np.insert(ids, at, eos[0])
                    raw.write(ids.tobytes())
                    count, docs = count + ids.size, docs + lens.size
            _write_npy_atomically(path, raw_path, dtype, count)
        finally:
            if os.path.exists(raw_path):
                os.unlink(raw_path)
    return skipped


# ================================================================================ batches
class ShardedBatcher:
    """Training batches from per-process token shards, a `gptjax.data.batcher.Batcher` like
    `LMBatcher` (`batch(step)`, `state()`, `restore()`, `close()`), the global batch a pure function
    of (seed, step) whatever the process count (see the module docstring).

    Args:
      shard_tokens: {shard: token ids} for at least this process's shards.
      seq_len: T.
      global_batch_size: B.
      seed: non-negative integer seed.
      mode: 'packed' or 'random_offset'.
      num_shards: V.
      process_index, process_count: this process and the number of processes.
      fingerprint: identifies the corpus, split, tokenizer and V (not the process layout).
      skipped_docs: malformed documents skipped while tokenizing (reported).
    """

    def __init__(self, shard_tokens: dict, seq_len: int, global_batch_size: int, seed: int,
                 mode: str = "packed", *, num_shards: int = DEFAULT_VIRTUAL_SHARDS,
                 process_index: int = 0, process_count: int = 1, fingerprint: str = "",
                 skipped_docs: int = 0):
        check_choice("mode", mode, MODES)
        check_int("seed", seed, 0)
        self.layout = Layout(int(global_batch_size), int(num_shards))
        self.streams = self.layout.streams_of_process(process_index, process_count)
        self.seq_len, self.global_batch_size = int(seq_len), int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed, self.mode, self.num_shards = int(seed), mode, int(num_shards)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.fingerprint, self.skipped_docs = fingerprint, skipped_docs
        self._tokens = {}
        for k in self.streams:
            parts = [np.asarray(shard_tokens[v]) for v in self.layout.shards_of_stream(k)]
            toks = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if len(toks) < self.seq_len + 1:
                sh = list(self.layout.shards_of_stream(k))
                names = ", ".join(map(str, sh[:3])) + (", ..." if len(sh) > 3 else "")
                raise ValueError(
                    f"stream {k} (virtual shards {names}) has {len(toks)} "
                    f"tokens, fewer than one sequence (seq_len {self.seq_len} + 1): the corpus "
                    f"has too few documents for data.virtual_shards={self.num_shards} at batch "
                    f"{self.global_batch_size}; allowed: fewer virtual shards, or "
                    "data.pipeline='single' for a small corpus")
            self._tokens[k] = toks
        self._perms: dict = {}
        # Each row of this process: (stream, index among the stream's rows, rows of the stream).
        self._rows = []
        for r in range(process_index * self.local_batch_size,
                       (process_index + 1) * self.local_batch_size):
            k = self.layout.stream_of_row(r)
            rows = self.layout.rows_of_stream(k)
            self._rows.append((k, r - rows.start, len(rows)))

    @property
    def stream_tokens(self) -> dict:
        """{stream: its token ids} of this process's streams (a mixture reads them)."""
        return self._tokens

    @property
    def num_local_tokens(self) -> int:
        """Tokens in this process's streams."""
        return int(sum(len(t) for t in self._tokens.values()))

    def _permutation(self, k: int, epoch: int) -> np.ndarray:
        key = (k, epoch)
        if key not in self._perms:
            if len(self._perms) >= 4 * len(self.streams):
                self._perms.pop(next(iter(self._perms)))
            n = (len(self._tokens[k]) - 1) // self.seq_len
            self._perms[key] = _rng(self.seed, _PACKED_STREAM, k * (1 << 20) + epoch).permutation(n)
        return self._perms[key]

    def _row(self, step: int, k: int, i: int, n: int) -> np.ndarray:
        toks, T = self._tokens[k], self.seq_len
        if self.mode == "packed":
            windows = (len(toks) - 1) // T
            epoch, pos = divmod(step * n + i, windows)
            start = int(self._permutation(k, epoch)[pos]) * T
        else:
            starts = _rng(self.seed, _OFFSET_STREAM, k * (1 << 32) + step).integers(
                0, len(toks) - T, size=n)
            start = int(starts[i])
        return np.asarray(toks[start:start + T + 1], np.int32)

    def batch(self, step: int) -> dict:
        """This process's rows of the global batch of `step`: dict(inputs, targets) int32
        [B / P, T]."""
        if step < 0:
            raise ValueError(f"step={step}; allowed: step >= 0")
        win = np.stack([self._row(step, k, i, n) for k, i, n in self._rows])
        return dict(inputs=np.ascontiguousarray(win[:, :-1]),
                    targets=np.ascontiguousarray(win[:, 1:]))

    def state(self) -> dict:
        """What defines the batches, as plain JSON-able values, for the checkpoint."""
        return dict(seed=self.seed, mode=self.mode, fingerprint=self.fingerprint,
                    seq_len=self.seq_len, global_batch_size=self.global_batch_size,
                    virtual_shards=self.num_shards)

    def check_state(self, state: dict) -> None:
        """Raises ValueError when a saved state was made for other data or another batching (the
        process count is free: the global batch does not depend on it)."""
        for key, now in (("fingerprint", self.fingerprint), ("seed", self.seed),
                         ("mode", self.mode), ("seq_len", self.seq_len),
                         ("global_batch_size", self.global_batch_size),
                         ("virtual_shards", self.num_shards)):
            if state.get(key) != now:
                raise ValueError(f"data state mismatch: checkpoint {key}={state.get(key)!r}, now "
                                 f"{now!r} ({'the corpus, split or tokenizer differs' if key == 'fingerprint' else 'config changed'})")

    def restore(self, state: dict) -> None:
        """Checks `state` against this batcher (its batches are a function of the step)."""
        self.check_state(state)

    def close(self) -> None:
        """Nothing to release (the tokenizing workers are done once the shards exist)."""


def build_batcher(source: Any, split: str, tokenizer: Tokenizer, *, seq_len: int,
                  global_batch_size: int, seed: int, mode: str, num_shards: int,
                  shards_dir: str, workers: int, process_index: int = 0, process_count: int = 1,
                  log=print) -> ShardedBatcher:
    """This process's shards of `split`, tokenized where missing, as a ShardedBatcher."""
    layout = Layout(global_batch_size, num_shards)
    shards = layout.shards_of_process(process_index, process_count)
    tokens, skipped = tokenize_shards(source, split, tokenizer, shards, num_shards=num_shards,
                                      shards_dir=shards_dir, workers=workers, log=log)
    return ShardedBatcher(tokens, seq_len, global_batch_size, seed, mode, num_shards=num_shards,
                          process_index=process_index, process_count=process_count,
                          fingerprint=shard_key(source.fingerprint, split, tokenizer, num_shards),
                          skipped_docs=skipped)
