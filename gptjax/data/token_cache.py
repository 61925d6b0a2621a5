"""Tokenize a split once into a cached .npy, keyed by the dataset, the split and the tokenizer.

A cache file is `<readable name>-<hash>.npy` with a `.json` of metadata beside it; the hash
covers the cache format, the dataset's fingerprint, the split and the tokenizer's fingerprint
(`tokenizers.fingerprint`), so a changed corpus or vocabulary never reads a stale cache. Files are
written to a temporary name and renamed, so concurrent writers and interrupted runs never leave a
partial cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO

import numpy as np

from gptjax.data.corpora import default_cache_dir
from gptjax.data.tokenizers import Tokenizer, fingerprint

log = logging.getLogger(__name__)

# Bumped when the cache file layout changes, so old caches are not misread.
_CACHE_FORMAT = 1

# Tokens buffered in memory before they are appended to the cache's temporary file.
_FLUSH_TOKENS = 1 << 24


def token_dtype(vocab_size: int) -> np.dtype:
    """Returns the smallest unsigned dtype holding ids below `vocab_size` (uint16 or uint32)."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size}; allowed: a positive integer")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def token_cache_path(
    cache_dir: str, dataset_fingerprint: str, split: str, tokenizer_fingerprint: str
) -> str:
    """Returns the .npy path for a (dataset, split, tokenizer) triple; the hash is the cache key."""
    key = json.dumps([_CACHE_FORMAT, dataset_fingerprint, split, tokenizer_fingerprint])
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    readable = re.sub(r"[^\w\-.]+", "_", f"{dataset_fingerprint.split('|')[0]}-{split}")[:80]
    return os.path.join(os.path.expanduser(cache_dir), f"{readable}-{digest}.npy")


def _metadata_path(npy_path: str) -> str:
    return npy_path[: -len(".npy")] + ".json"


# ----------------------------------------------------------------------------------------------
# Caches keyed by the probe hash.
# ----------------------------------------------------------------------------------------------

# The strings whose encodings identified a tokenizer in cache keys before caches were keyed by
# `tokenizers.fingerprint`; only `_adopt_probe_keyed_cache` uses them, to find such caches.
_PROBES = (
    "the quick brown fox jumps over the lazy dog",
    "Hello, World! 0123456789\n\tdef f(x): return x ** 2  # ok",
    "naïve café — Ünïcödé 東京 ☃",
)


def _probe_fingerprint(tokenizer: Tokenizer) -> str:
    """The probe hash: class, kind, vocab_size, eos_id and the encodings of `_PROBES`."""
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


def _adopt_probe_keyed_cache(
    tokenizer: Tokenizer, cache_dir: str, dataset_fingerprint: str, split: str, tok_fp: str
) -> None:
    """Renames a cache keyed by the probe hash to the key of `tok_fp` (`tokenizers.fingerprint`).

    Caches written while tokenizers were identified by `_probe_fingerprint` stay valid (the
    tokens are the same); renaming them once spares re-tokenizing a corpus. Nothing happens when
    the new cache exists or there is no old one; a concurrent process adopting it first is fine.
    """
    path = token_cache_path(cache_dir, dataset_fingerprint, split, tok_fp)
    if os.path.exists(path):
        return
    old = token_cache_path(cache_dir, dataset_fingerprint, split, _probe_fingerprint(tokenizer))
    if not os.path.exists(old):
        return
    try:
        with open(_metadata_path(old)) as f:
            meta = json.load(f)
        os.replace(old, path)
    except FileNotFoundError:  # another process adopted it between the check and here
        return
    _write_json_atomically(_metadata_path(path), {**meta, "tokenizer": tok_fp})
    os.unlink(_metadata_path(old))
    log.info("adopted the token cache %s as %s", old, path)


# ----------------------------------------------------------------------------------------------
# Writing.
# ----------------------------------------------------------------------------------------------


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


def check_ids(ids: np.ndarray, tokenizer: Tokenizer) -> None:
    """Raises ValueError when a document's encoding has an id outside the vocabulary."""
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        raise ValueError(
            f"tokenizer returned ids in [{ids.min()}, {ids.max()}]; "
            f"allowed: [0, {tokenizer.vocab_size})"
        )


def _stream_tokens(
    texts: Iterable[str], tokenizer: Tokenizer, dtype: np.dtype, raw: BinaryIO
) -> tuple[int, int]:
    """Encodes `texts` into `raw` as little-endian `dtype` ids, eos between documents.

    Returns:
      (tokens written, documents with tokens).
    """
    eos = None if tokenizer.eos_id is None else np.array([tokenizer.eos_id], dtype=dtype)
    num_tokens = num_docs = 0
    buffer, buffered = [], 0
    for text in texts:
        ids = np.asarray(tokenizer.encode(text), dtype=np.int64)
        if not ids.size:
            continue  # An empty document would only add a stray eos.
        check_ids(ids, tokenizer)
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
    return num_tokens, num_docs


def _write_cache(
    texts: Iterable[str], tokenizer: Tokenizer, path: str, what: str
) -> tuple[int, int]:
    """Tokenizes `texts` into the .npy at `path`; `what` names the split in errors.

    Returns:
      (tokens written, documents with tokens).
    """
    dtype = token_dtype(tokenizer.vocab_size)
    fd, raw_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".raw")
    try:
        with os.fdopen(fd, "wb") as raw:
            num_tokens, num_docs = _stream_tokens(texts, tokenizer, dtype, raw)
        if num_tokens == 0:
            raise ValueError(
                f"{what} has no tokens (every document is empty); allowed: a split with some text"
            )
        _write_npy_atomically(path, raw_path, dtype.newbyteorder("<"), num_tokens)
    finally:
        os.unlink(raw_path)
    return num_tokens, num_docs


# ----------------------------------------------------------------------------------------------
# Reading.
# ----------------------------------------------------------------------------------------------


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
    memory-mapped, so a large split is neither re-read into RAM nor copied per process.

    Args:
      texts: called only on a cache miss; returns the documents of the split.
      tokenizer: the tokenizer.
      dataset_fingerprint: identifies the dataset's content (e.g. `TextSource.fingerprint`).
      split: split name; part of the key.
      cache_dir: directory of the cache files (created if needed).
      tokenizer_fingerprint: identifies the tokenizer; defaults to
        `tokenizers.fingerprint(tokenizer)`, under which a cache keyed by the earlier probe hash
        is adopted (renamed) rather than rebuilt.

    Returns:
      A read-only, memory-mapped 1-D array of token ids.

    Raises:
      ValueError: the split has no tokens, or the tokenizer returned an id outside its vocabulary.
    """
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    tok_fp = tokenizer_fingerprint or fingerprint(tokenizer)
    path = token_cache_path(cache_dir, dataset_fingerprint, split, tok_fp)
    if tokenizer_fingerprint is None:
        _adopt_probe_keyed_cache(tokenizer, cache_dir, dataset_fingerprint, split, tok_fp)
    if os.path.exists(path):
        return np.load(path, mmap_mode="r")

    what = f"split {split!r} of {dataset_fingerprint}"
    num_tokens, num_docs = _write_cache(texts(), tokenizer, path, what)
    _write_json_atomically(
        _metadata_path(path),
        dict(
            dataset=dataset_fingerprint,
            split=split,
            tokenizer=tok_fp,
            tokenizer_kind=tokenizer.kind,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
            num_documents=num_docs,
            num_tokens=num_tokens,
            dtype=token_dtype(tokenizer.vocab_size).name,
        ),
    )
    log.info("cached %d tokens of %d documents (%s %s) at %s", num_tokens, num_docs,
             dataset_fingerprint, split, path)
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
      tokenizer_fingerprint: identifies the tokenizer; see `cached_tokens`.

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
