"""Language-modelling data: tokenize a split once into a cached .npy, then cut batches from it.

Windows: a window starting at token s has inputs `tokens[s:s+T]` and targets
`tokens[s+1:s+T+1]` (T+1 tokens read). Packed and eval windows start at multiples of T, so
their inputs never overlap and every token after the first is a target exactly once per epoch.

Training batches are a pure function of (seed, step, process_index, process_count): nothing is
carried between steps, so the data position saved in a checkpoint is just the step, and N
processes each loading their slice build the same global batch as one process loading it all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from gptjax.data.corpora import default_cache_dir

log = logging.getLogger(__name__)

MODES = ("packed", "random_offset")

# Bumped when the cache file layout changes, so old caches are not misread.
_CACHE_FORMAT = 1

# Tokens buffered in memory before they are appended to the cache's temporary file.
_FLUSH_TOKENS = 1 << 24


class Tokenizer(Protocol):
    """What the pipeline needs from a tokenizer (gptjax.data.tokenizers implements it)."""

    vocab_size: int
    eos_id: int | None
    kind: str

    def encode(self, text: str) -> list[int]: ...


# ----------------------------------------------------------------------------------------------
# Tokenize once and cache.
# ----------------------------------------------------------------------------------------------


def token_dtype(vocab_size: int) -> np.dtype:
    """Returns the smallest unsigned dtype holding ids below `vocab_size` (uint16 or uint32)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}; allowed: a positive integer")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# Probes cover ASCII, code and non-ASCII text; a tokenizer that cannot encode one (a character
# vocabulary) contributes the exception's type instead, which is still deterministic.
_PROBES = (
    "the quick brown fox jumps over the lazy dog",
    "Hello, World! 0123456789\n\tdef f(x): return x ** 2  # ok",
    "naïve café — Ünïcödé 東京 ☃",
)


def fingerprint_tokenizer(tokenizer: Tokenizer) -> str:
    """Identifies a tokenizer for cache keys.

    Uses `tokenizer.fingerprint` when the tokenizer has a non-empty string one; otherwise hashes
    its class, kind, vocab_size, eos_id and the encodings of a few probe strings. The fallback
    catches different vocabularies in practice, but a caller that knows the tokenizer's files
    should pass their hash as `tokenizer_fingerprint` instead.

    Args:
      tokenizer: the tokenizer.

    Returns:
      A short hex string.
    """
    given = getattr(tokenizer, "fingerprint", None)
    if isinstance(given, str) and given:
        return given
    encodings = []
    for probe in _PROBES:
        try:
            encodings.append(list(tokenizer.encode(probe)))
        except Exception as e:  # noqa: BLE001 - any failure is part of the tokenizer's identity.
            encodings.append(type(e).__name__)
    parts = (
        type(tokenizer).__qualname__,
        tokenizer.kind,
        tokenizer.vocab_size,
        tokenizer.eos_id,
        encodings,
    )
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def token_cache_path(
    cache_dir: str, dataset_fingerprint: str, split: str, tokenizer_fingerprint: str
) -> str:
    """Returns the .npy path for a (dataset, split, tokenizer) triple; the hash is the cache key."""
    key = json.dumps([_CACHE_FORMAT, dataset_fingerprint, split, tokenizer_fingerprint])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    readable = re.sub(r"[^\w\-.]+", "_", f"{dataset_fingerprint.split('|')[0]}-{split}")[:80]
    return os.path.join(os.path.expanduser(cache_dir), f"{readable}-{digest}.npy")


def _write_npy_atomically(path: str, raw_path: str, dtype: np.dtype, num_tokens: int) -> None:
    """Writes an .npy from a raw token file: a temp file in the same dir, then os.replace."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as out, open(raw_path, "rb") as raw:
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": (num_tokens,),
            }
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, length=1 << 22)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _write_json_atomically(path: str, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def cached_tokens(
    texts: Callable[[], Iterable[str]],
    tokenizer: Tokenizer,
    *,
    dataset_fingerprint: str,
    split: str,
    cache_dir: str,
    tokenizer_fingerprint: str | None = None,
) -> np.ndarray:
    """Returns the token ids of a split, tokenizing only when no cache file has the same key.

    Documents are concatenated in order with `tokenizer.eos_id` between consecutive ones (none
    after the last); without an eos id they are concatenated directly. Empty documents are
    skipped. The array is stored as uint16 when the vocabulary fits, else uint32, and opened
    memory-mapped, so a large split is neither re-read into RAM nor copied per process. Files
    are written to a temporary name and renamed, so concurrent writers and interrupted runs
    never leave a partial cache.

    Args:
      texts: called only on a cache miss; returns the documents of the split.
      tokenizer: has `encode`, `vocab_size`, `eos_id`, `kind`.
      dataset_fingerprint: identifies the dataset's content (e.g. `TextSource.fingerprint`).
      split: split name; part of the key.
      cache_dir: directory of the cache files (created if needed).
      tokenizer_fingerprint: identifies the tokenizer; defaults to
        `fingerprint_tokenizer(tokenizer)`.

    Returns:
      A read-only, memory-mapped 1-D array of token ids.

    Raises:
      ValueError: the split has no tokens, or the tokenizer returned an id outside its vocabulary.
    """
    tok_fp = tokenizer_fingerprint or fingerprint_tokenizer(tokenizer)
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    path = token_cache_path(cache_dir, dataset_fingerprint, split, tok_fp)
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")

    dtype = token_dtype(tokenizer.vocab_size)
    eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], dtype=dtype)
    num_tokens = num_docs = 0
    buffer, buffered = [], 0
    fd, raw_path = tempfile.mkstemp(dir=cache_dir, prefix=".tmp-", suffix=".raw")
    try:
        with os.fdopen(fd, "wb") as raw:
            for text in texts():
                ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
                if not ids.size:
                    continue  # An empty document would only add a stray eos.
                if ids.min() < 0 or ids.max() >= tokenizer.vocab_size:
                    raise ValueError(
                        f"tokenizer returned ids in [{ids.min()}, {ids.max()}]; "
                        f"allowed: [0, {tokenizer.vocab_size})"
                    )
                if eos is not None and num_docs:
                    buffer.append(eos)
                buffer.append(ids.astype(dtype))
                buffered += ids.size + (eos is not None and num_docs > 0)
                num_docs += 1
                if buffered >= _FLUSH_TOKENS:
                    # Bounded memory: a split of billions of tokens streams through this buffer.
                    raw.write(np.concatenate(buffer).astype(dtype.newbyteorder("<")).tobytes())
                    num_tokens += buffered
                    buffer, buffered = [], 0
            if buffer:
                raw.write(np.concatenate(buffer).astype(dtype.newbyteorder("<")).tobytes())
                num_tokens += buffered
        if num_tokens == 0:
            raise ValueError(
                f"split {split!r} of {dataset_fingerprint} has no tokens "
                "(every document is empty); allowed: a split with some text"
            )
        _write_npy_atomically(path, raw_path, dtype.newbyteorder("<"), num_tokens)
    finally:
        os.unlink(raw_path)
    _write_json_atomically(
        path[: -len(".npy")] + ".json",
        dict(
            dataset=dataset_fingerprint,
            split=split,
            tokenizer=tok_fp,
            tokenizer_kind=tokenizer.kind,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
            num_documents=num_docs,
            num_tokens=num_tokens,
            dtype=dtype.name,
        ),
    )
    log.info(
        "cached %d tokens of %d documents (%s %s) at %s",
        num_tokens,
        num_docs,
        dataset_fingerprint,
        split,
        path,
    )
    return np.load(path, mmap_mode="r")


def load_tokens(
    source: Any,
    split: str,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | None = None,
    tokenizer_fingerprint: str | None = None,
) -> np.ndarray:
    """Tokenizes a split of a text source once and returns the cached token ids.

    Args:
      source: a `gptjax.data.TextSource` (anything with `.fingerprint` and `.texts(split)`).
      split: split name.
      tokenizer: the tokenizer.
      cache_dir: defaults to `<gptjax cache>/tokens` (see `corpora.default_cache_dir`).
      tokenizer_fingerprint: identifies the tokenizer; see `fingerprint_tokenizer`.

    Returns:
      A read-only, memory-mapped 1-D array of token ids.
    """
    if cache_dir is None:
        cache_dir = os.path.join(default_cache_dir(), "tokens")
    if hasattr(source, "splits") and split not in source.splits:
        raise ValueError(
            f"split {split!r} is not in {source.name}; allowed: {', '.join(source.splits)}"
        )
    return cached_tokens(
        lambda: source.texts(split),
        tokenizer,
        dataset_fingerprint=source.fingerprint,
        split=split,
        cache_dir=cache_dir,
        tokenizer_fingerprint=tokenizer_fingerprint,
    )


def token_fingerprint(tokens: np.ndarray) -> str:
    """Identifies a token array cheaply: its length plus 64 evenly spaced blocks of 4096 tokens.

    Blocks rather than scattered samples keep this to 64 reads on a memory-mapped file of
    billions of tokens; arrays up to 256K tokens are hashed whole.

    Args:
      tokens: 1-D token ids.

    Returns:
      A short hex string; equal arrays give equal strings whatever their dtype.
    """
    n, block, blocks = len(tokens), 4096, 64
    h = hashlib.sha256(str(n).encode())
    if n <= block * blocks:
        h.update(np.asarray(tokens, dtype="<i8").tobytes())
    else:
        for start in np.linspace(0, n - block, blocks).astype(np.int64):
            h.update(np.asarray(tokens[start : start + block], dtype="<i8").tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Training batches.
# ----------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    # Separate spawn keys per mode and per epoch/step give independent PCG64 streams that any
    # process can recreate from integers alone.
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream, index)))
    )


def _gather(tokens: np.ndarray, starts_B: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """Reads windows of T+1 tokens at `starts_B` with one fancy index (no per-token Python)."""
    idx_BxT1 = starts_B[:, None] + np.arange(seq_len + 1)
    win_BxT1 = np.asarray(tokens[idx_BxT1], dtype=np.int32)
    # Contiguous copies: device transfers take them as they are, and the two never alias.
    return dict(
        inputs=np.ascontiguousarray(win_BxT1[:, :-1]),
        targets=np.ascontiguousarray(win_BxT1[:, 1:]),
    )


class LMBatcher:
    """Training batches that are a pure function of (seed, step, process_index, process_count).

    Modes:
      * 'packed': the (len - 1) // T windows starting at multiples of T, visited in the order of
        a permutation drawn from (seed, epoch) with numpy's PCG64. Global window number
        `step * B + row` maps to epoch and position, so epochs continue seamlessly, even inside
        a batch, and every window is used exactly once per epoch.
      * 'random_offset': nanoGPT's sampling, B start offsets uniform in [0, len - T - 1] drawn
        from (seed, step).

    Process p of P gets rows [p * B / P, (p + 1) * B / P) of the global batch, so the
    concatenation over processes equals the one-process batch. The instance also counts steps
    for iteration; `state()` / `restore()` save and restore that count with the seed, mode and
    a fingerprint of the data for checkpoints.

    Args:
      tokens: 1-D token ids (e.g. from `load_tokens`; a memmap is fine).
      seq_len: T, the model's context length.
      global_batch_size: B, rows summed over all processes; divisible by process_count.
      seed: non-negative integer seed.
      mode: 'packed' or 'random_offset'.
      process_index: this process, in [0, process_count).
      process_count: number of data-loading processes.
      fingerprint: identifies `tokens`; defaults to `token_fingerprint(tokens)`.
      step: first step that iteration yields.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        mode: str = "packed",
        process_index: int = 0,
        process_count: int = 1,
        *,
        fingerprint: str | None = None,
        step: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; allowed: {', '.join(map(repr, MODES))}")
        tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {np.shape(tokens)}")
        if seq_len < 1 or global_batch_size < 1:
            raise ValueError(
                f"seq_len={seq_len}, global_batch_size={global_batch_size}; "
                "allowed: positive integers"
            )
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(
                f"process_index={process_index}, process_count={process_count}; "
                "allowed: 0 <= index < count"
            )
        if global_batch_size % process_count:
            raise ValueError(
                f"global_batch_size={global_batch_size} is not divisible by "
                f"process_count={process_count}"
            )
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed={seed}; allowed: a non-negative integer")
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"corpus has {len(tokens)} tokens, shorter than one sequence: seq_len={seq_len} "
                f"needs at least {seq_len + 1}"
            )
        self.tokens = tokens
        self.seq_len = int(seq_len)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.seed = int(seed)
        self.mode = mode
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.fingerprint = fingerprint or token_fingerprint(tokens)
        self.step = int(step)
        self.num_windows = (len(tokens) - 1) // self.seq_len
        self._perms: dict[int, np.ndarray] = {}

    @property
    def steps_per_epoch(self) -> float:
        """Steps per pass over all packed windows (fractional when B does not divide them)."""
        return self.num_windows / self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:
                # A batch spans at most two epochs unless B exceeds the window count; keep two.
                self._perms.pop(min(self._perms))
            perm = _rng(self.seed, 0, epoch).permutation(self.num_windows)
            self._perms[epoch] = perm
        return perm

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Returns this process's slice of the global batch of `step`.

        Args:
          step: non-negative training step.

        Returns:
          dict(inputs=int32[B_local, T], targets=int32[B_local, T]); targets are inputs
          shifted left by one token.
        """
        if step < 0:
            raise ValueError(f"step={step}; allowed: step >= 0")
        rows = self.process_index * self.local_batch_size + np.arange(
            self.local_batch_size, dtype=np.int64
        )
        if self.mode == "packed":
            g_B = np.int64(step) * self.global_batch_size + rows
            epoch_B, pos_B = np.divmod(g_B, self.num_windows)
            window_B = np.empty_like(g_B)
            for epoch in np.unique(epoch_B):
                at = epoch_B == epoch
                window_B[at] = self._permutation(int(epoch))[pos_B[at]]
            starts_B = window_B * self.seq_len
        else:
            # Draw the whole global batch so each process's slice matches the 1-process batch.
            all_starts = _rng(self.seed, 1, step).integers(
                0, len(self.tokens) - self.seq_len, size=self.global_batch_size
            )
            starts_B = all_starts[rows]
        return _gather(self.tokens, starts_B, self.seq_len)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.step)
        self.step += 1
        return batch

    def state(self) -> dict[str, Any]:
        """Returns the iterator position as plain JSON-able values, for the checkpoint."""
        return dict(
            seed=self.seed,
            step=self.step,
            mode=self.mode,
            fingerprint=self.fingerprint,
            seq_len=self.seq_len,
            global_batch_size=self.global_batch_size,
        )

    def check_state(self, state: dict[str, Any]) -> None:
        """Raises ValueError when a saved state was made for other data or another batching.

        The process layout is not checked: the global batch of a step does not depend on it,
        so a run may resume on a different number of hosts.
        """
        for key in ("fingerprint", "seed", "mode", "seq_len", "global_batch_size"):
            if key not in state:
                raise ValueError(f"data state has no {key!r}; got keys {sorted(state)}")
            if state[key] != getattr(self, key):
                what = (
                    "the training tokens differ from the checkpoint's"
                    if key == "fingerprint"
                    else "config changed"
                )
                raise ValueError(
                    f"data state mismatch: checkpoint {key}={state[key]!r}, "
                    f"now {getattr(self, key)!r} ({what})"
                )

    def restore(self, state: dict[str, Any]) -> None:
        """Checks `state` against this batcher and continues from its step."""
        self.check_state(state)
        self.step = int(state["step"])

    @classmethod
    def from_state(
        cls,
        state: dict[str, Any],
        tokens: np.ndarray,
        process_index: int = 0,
        process_count: int = 1,
        *,
        fingerprint: str | None = None,
    ) -> LMBatcher:
        """Rebuilds a batcher from `state()` output and checks it against `tokens`.

        Args:
          state: a dict returned by `state()`.
          tokens: the training tokens; must match the state's fingerprint.
          process_index: this process.
          process_count: number of processes (may differ from the saving run).
          fingerprint: identifies `tokens`; defaults to `token_fingerprint(tokens)`.

        Returns:
          A batcher whose next batch is the one after the saved step.
        """
        batcher = cls(
            tokens,
            int(state["seq_len"]),
            int(state["global_batch_size"]),
            int(state["seed"]),
            state["mode"],
            process_index,
            process_count,
            fingerprint=fingerprint,
            step=int(state["step"]),
        )
        batcher.check_state(state)
        return batcher


# ----------------------------------------------------------------------------------------------
# Evaluation batches.
# ----------------------------------------------------------------------------------------------


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    drop_remainder: bool = True,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every non-overlapping window of a split once, in order, for a whole-split loss.

    Windows start at 0, T, 2T, ...; with N tokens there are (N - 1) // T full windows. The
    last batch is padded with rows of weight 0. With `drop_remainder=True` (the default, and
    the usual "non-overlapping windows" evaluation) the last (N - 1) % T targets, which do not
    fill a window, are dropped; with False they form one more, shorter window whose padding
    has weight 0, so every token after the first is a target exactly once.

    The loss over the split is `sum(loss * weights) / sum(weights)` over all batches.

    Args:
      tokens: 1-D token ids of the split.
      seq_len: T.
      batch_size: global rows per batch, divisible by process_count.
      process_index: this process; it gets rows [p * B / P, (p + 1) * B / P) of each batch.
      process_count: number of processes.
      drop_remainder: drop the targets that do not fill a last window (see above).

    Yields:
      dict(inputs=int32[B_local, T], targets=int32[B_local, T], weights=float32[B_local, T]).

    Raises:
      ValueError: the split is shorter than one window, or bad batch layout.
    """
    tokens = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    n = len(tokens)
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}; allowed: a positive integer")
    if batch_size < 1 or batch_size % process_count or not 0 <= process_index < process_count:
        raise ValueError(
            f"batch_size={batch_size}, process_index={process_index}, "
            f"process_count={process_count}; "
            "allowed: batch_size divisible by process_count and 0 <= process_index < process_count"
        )
    num_windows = (n - 1) // seq_len if n > 0 else 0
    if not drop_remainder and n > 1 and (n - 1) % seq_len:
        num_windows += 1
    if num_windows == 0:
        raise ValueError(
            f"split has {n} tokens, shorter than one sequence: seq_len={seq_len} needs at least "
            f"{seq_len + 1 if drop_remainder else 2}"
        )
    local = batch_size // process_count
    offsets_T1 = np.arange(seq_len + 1, dtype=np.int64)
    for first in range(0, num_windows, batch_size):
        window_B = first + process_index * local + np.arange(local, dtype=np.int64)
        valid_B = window_B < num_windows
        idx_BxT1 = window_B[:, None] * seq_len + offsets_T1
        # A target at position t exists iff index s + t + 1 < N; padding rows count for nothing.
        weights_BxT = (idx_BxT1[:, 1:] < n) & valid_B[:, None]
        win_BxT1 = np.asarray(tokens[np.minimum(idx_BxT1, n - 1)], dtype=np.int32)
        win_BxT1[:, 1:] *= weights_BxT
        win_BxT1[~valid_B] = 0
        yield dict(
            inputs=np.ascontiguousarray(win_BxT1[:, :-1]),
            targets=np.ascontiguousarray(win_BxT1[:, 1:]),
            weights=weights_BxT.astype(np.float32),
        )
