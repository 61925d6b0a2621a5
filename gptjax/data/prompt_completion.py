"""Prompt/completion data: JSONL rows whose loss counts the completion tokens only.

Each line of a JSONL file is an object with a prompt and a completion (keys `prompt` and
`completion` unless configured). A row is tokenized as `encode(prompt) + encode(completion)`,
then the tokenizer's end-of-text id when it has one (GPT-2's <|endoftext|>): the prompt and the
completion are encoded separately, so the boundary is exact (as TRL does). Every token of the
completion and the end-of-text token is a *completion token*; a target position has weight 1
when the token it predicts is one, 0 otherwise (prompt tokens and padding): transformers'
`labels=-100` on the prompt.

Layouts (`data.pc_layout`):
  * 'pad': one row per sequence, right-padded to seq_len + 1 tokens with the end-of-text id (0
    without one) at weight 0. A row is at most seq_len + 1 tokens.
  * 'pack': the rows concatenated in file order into one stream, cut into windows as plain text
    is (gptjax.data.lm: inputs `s[w*T : w*T+T]`, targets one token later). A row then attends
    to the rows before it in its window unless `data.document_mask` (gptjax.data.documents:
    each row then attends only to itself, its end-of-text id opening the next); a row still fits
    one context (at most seq_len + 1 tokens), the error says otherwise.

Training batches are a pure function of (seed, step, process_index, process_count), like
`LMBatcher`'s: 'pad' visits the rows in a permutation drawn per epoch (data.sampling 'packed')
or draws them with replacement per step ('random_offset'); 'pack' is an LMBatcher over the
stream. A batch is `dict(inputs=int32[B, T], targets=int32[B, T], weights=float32[B, T])`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np

from gptjax.checks import check_choice, check_int
from gptjax.data.corpora import local_text
from gptjax.data.lm import MODES, LMBatcher, eval_batches
from gptjax.data.tokenizers import Tokenizer

DATASET = "prompt_completion"
LAYOUTS = ("pad", "pack")


class Row(NamedTuple):
    """One JSONL row: its prompt, its completion and where it came from ('file:line')."""

    prompt: str
    completion: str
    where: str


# ================================================================================ reading
def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Files and glob patterns (comma-separated in a string) -> sorted absolute file paths."""
    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    if not paths:
        raise ValueError("prompt/completion data needs a JSONL file or glob (data.path)")
    return local_text.expand_paths(paths, kind="JSONL", suffix="*.jsonl")


def _row(line: str, where: str, keys: tuple[str, str]) -> Row:
    """The Row of one JSONL line, or a one-line ValueError naming `where` (file:line)."""
    allowed = f"allowed: a JSON object with string fields {keys[0]!r} and {keys[1]!r}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not JSON ({e.msg} at column {e.colno}); {allowed}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a JSON {type(obj).__name__}, not an object; {allowed}")
    values = []
    for key in keys:
        if key not in obj:
            raise ValueError(f"{where}: the row has no {key!r} field (its keys: {sorted(obj)}); "
                             f"allowed keys: data.prompt_key={keys[0]!r}, "
                             f"data.completion_key={keys[1]!r}")
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: field {key!r} is a {type(obj[key]).__name__}, not a "
                             f"string; {allowed}")
        values.append(obj[key])
    return Row(values[0], values[1], where)


def read_rows(paths: str | Sequence[str], prompt_key: str = "prompt",
              completion_key: str = "completion") -> list[Row]:
    """Every row of the JSONL files `paths` (files or globs), in file then line order.

    Files are UTF-8; blank lines are skipped. Errors name the file and the 1-based line number.

    Raises:
      FileNotFoundError: a path does not exist or a glob matches no file.
      ValueError: a file has no rows, a line is not UTF-8 or not a JSON object, or a field is
        missing or not a string.
    """
    if not prompt_key or not completion_key or prompt_key == completion_key:
        raise ValueError(f"prompt_key={prompt_key!r}, completion_key={completion_key!r}; "
                         "allowed: two different non-empty keys")
    rows = []
    for path in expand_paths(paths):
        n = len(rows)
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                try:  # (a UTF-8 byte-order mark on the first line is not part of the row)
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {e.start}); allowed: "
                                     "UTF-8 JSON lines") from None
                if line.strip():
                    rows.append(_row(line, f"{path}:{lineno}", (prompt_key, completion_key)))
        if len(rows) == n:
            raise ValueError(f"{path}: empty file (no JSON rows); allowed: one JSON object per "
                             f"line with {prompt_key!r} and {completion_key!r}")
    return rows


def split_validation(rows: list[Row], fraction: float) -> tuple[list[Row], list[Row]]:
    """(train, validation): `round(fraction * len(rows))` rows (at least 1) chosen by a fixed
    permutation (PCG64, seed 0; not the run's seed, so every run holds out the same rows), the
    rest for training; both keep file order."""
    if not 0 < fraction < 1:
        raise ValueError(f"validation_fraction={fraction}; allowed: 0 < fraction < 1 (or a "
                         "validation file in data.val_path)")
    k = max(1, round(fraction * len(rows)))
    if k >= len(rows):
        raise ValueError(f"{len(rows)} rows leave none for training with validation_fraction="
                         f"{fraction}; allowed: more rows, a smaller fraction or data.val_path")
    held = np.zeros(len(rows), bool)
    held[np.random.Generator(np.random.PCG64(0)).permutation(len(rows))[:k]] = True
    return ([r for r, h in zip(rows, held) if not h], [r for r, h in zip(rows, held) if h])


class PromptCompletionSource:
    """The rows of a run's splits, with the text-source face the tokenizer builders read
    (`splits`, `texts`, `sample_texts`, `fingerprint`; gptjax.train.experiment.run_tokenizer).

    Args:
      splits: {split name: rows}.
      name: shown in errors.
    """

    def __init__(self, splits: dict[str, list[Row]], name: str = DATASET):
        self.rows, self.name = splits, name
        h = hashlib.sha256()
        for split, rows in sorted(splits.items()):
            h.update(json.dumps([split, [(r.prompt, r.completion) for r in rows]]).encode())
        self.fingerprint = f"{name}|{h.hexdigest()[:16]}"

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.rows)

    def split(self, split: str) -> list[Row]:
        if split not in self.rows:
            raise ValueError(f"split {split!r} is not in {self.name}; allowed: "
                             f"{', '.join(self.rows)}")
        return self.rows[split]

    def texts(self, split: str) -> Iterator[str]:
        """Each row's prompt, then its completion (what a tokenizer is built from)."""
        for r in self.split(split):
            yield r.prompt
            yield r.completion

    def sample_texts(self, split: str, n: int) -> list[str]:
        """The texts of `n` evenly spaced rows."""
        rows = self.split(split)
        idx = np.unique(np.linspace(0, len(rows) - 1, min(n, len(rows))).astype(np.int64))
        return [t for i in idx for t in (rows[i].prompt, rows[i].completion)]


def load_source(path: str | Sequence[str], val_path: str | Sequence[str] = "",
                validation_fraction: float | None = None, prompt_key: str = "prompt",
                completion_key: str = "completion") -> PromptCompletionSource:
    """The 'train' and 'validation' rows of a run: `path`'s rows and `val_path`'s when it is
    given, else `validation_fraction` (None = 0.1) of `path`'s rows (`split_validation`)."""
    rows = read_rows(path, prompt_key, completion_key)
    if val_path:
        return PromptCompletionSource({"train": rows, "validation": read_rows(
            val_path, prompt_key, completion_key)})
    frac = 0.1 if validation_fraction is None else validation_fraction
    return PromptCompletionSource(dict(zip(("train", "validation"),
                                           split_validation(rows, frac))))


# ================================================================================ tokenizing
class PromptCompletionSplit:
    """A split's rows tokenized: one token stream, its completion mask and the row offsets.

    Row r is `tokens[offsets[r]:offsets[r+1]]`; `mask` is 1 on its completion tokens.
    `len()` is the token positions its sequences fill (what train.epochs and the start-up
    line count): 'pad' rows x seq_len, 'pack' the stream's tokens.
    """

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
                 seq_len: int, layout: str, pad_id: int):
        check_choice("data.pc_layout", layout, LAYOUTS)
        self.tokens, self.mask, self.offsets = tokens, mask, offsets
        self.seq_len, self.layout, self.pad_id = int(seq_len), layout, int(pad_id)
        h = hashlib.sha256(json.dumps([layout, self.seq_len, self.pad_id]).encode())
        for a in (tokens.astype("<i4"), mask.astype("u1"), offsets.astype("<i8")):
            h.update(a.tobytes())
        self.fingerprint = h.hexdigest()[:16]

    @property
    def num_rows(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        """The rows' tokens (no padding)."""
        return len(self.tokens)

    def __len__(self) -> int:
        return self.num_rows * self.seq_len if self.layout == "pad" else self.num_tokens

    def padded(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The 'pad' sequences of `rows` (row indices; -1 = an empty row of weight 0)."""
        T1 = self.seq_len + 1
        seq = np.full((len(rows), T1), self.pad_id, np.int32)
        msk = np.zeros((len(rows), T1), np.float32)
        for i, r in enumerate(rows):
            if r >= 0:
                a, b = self.offsets[r], self.offsets[r + 1]
                seq[i, : b - a] = self.tokens[a:b]
                msk[i, : b - a] = self.mask[a:b]
        return dict(inputs=np.ascontiguousarray(seq[:, :-1]),
                    targets=np.ascontiguousarray(seq[:, 1:]),
                    weights=np.ascontiguousarray(msk[:, 1:]))

    def eval_batches(self, batch_size: int, *, process_index: int = 0,
                     process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
        """Every completion token of the split a target exactly once, weight 1 (the rest 0).

        'pad': the rows in order, `batch_size` per global batch (the last padded with empty
        rows); 'pack': the stream's non-overlapping windows, the last one shorter (see
        gptjax.data.lm.eval_batches with drop_remainder=False). Process p gets rows
        [p * B / P, (p + 1) * B / P) of each batch.
        """
        if batch_size < 1 or batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(f"batch_size={batch_size}, process_index={process_index}, "
                             f"process_count={process_count}; allowed: batch_size divisible by "
                             "process_count and 0 <= process_index < process_count")
        if self.layout == "pack":
            kw = dict(process_index=process_index, process_count=process_count,
                      drop_remainder=False)
            for b, m in zip(eval_batches(self.tokens, self.seq_len, batch_size, **kw),
                            eval_batches(self.mask, self.seq_len, batch_size, **kw)):
                # the mask's targets are 0 wherever the token batch's weights are
                yield dict(b, weights=m["targets"].astype(np.float32))
            return
        local = batch_size // process_count
        for first in range(0, self.num_rows, batch_size):
            rows = first + process_index * local + np.arange(local)
            yield self.padded(np.where(rows < self.num_rows, rows, -1))

    def batcher(self, global_batch_size: int, seed: int, sampling: str = "packed",
                process_index: int = 0, process_count: int = 1) -> PromptCompletionBatcher:
        """This process's training batcher over the split (see `PromptCompletionBatcher`)."""
        return PromptCompletionBatcher(self, global_batch_size, seed, sampling, process_index,
                                       process_count)


def tokenize_rows(rows: Sequence[Row], tokenizer: Tokenizer, seq_len: int,
                  layout: str = "pad") -> PromptCompletionSplit:
    """Tokenizes `rows` (prompt and completion separately, then the end-of-text id).

    Raises:
      ValueError: no rows, or a row longer than seq_len + 1 tokens (naming its file:line and
        its token count).
    """
    check_choice("data.pc_layout", layout, LAYOUTS)
    check_int("seq_len", seq_len, 1)
    if not rows:
        raise ValueError("no prompt/completion rows; allowed: at least one")
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    if not eos:
        warnings.warn(f"the {tokenizer.kind!r} tokenizer has no end-of-text token: completions "
                      "end without one, so the model does not learn where they stop (and with "
                      "data.pc_layout='pack' a completion runs into the next row's prompt)",
                      stacklevel=2)
    toks, masks, lengths = [], [], []
    for r in rows:
        p, c = tokenizer.encode(r.prompt), tokenizer.encode(r.completion) + eos
        n = len(p) + len(c)
        if n > seq_len + 1:
            raise ValueError(f"{r.where}: the row has {n} tokens ({len(p)} prompt + {len(c)} "
                             f"completion{' with end-of-text' if eos else ''}), longer than the "
                             f"context; allowed: at most seq_len + 1 = {seq_len + 1}")
        toks.append(np.asarray(p + c, np.int32))
        masks.append(np.r_[np.zeros(len(p), np.uint8), np.ones(len(c), np.uint8)])
        lengths.append(n)
    tokens = np.concatenate(toks) if toks else np.zeros(0, np.int32)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tokenizer.vocab_size):
        raise ValueError(f"tokenizer returned ids in [{tokens.min()}, {tokens.max()}]; "
                         f"allowed: [0, {tokenizer.vocab_size})")
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int64)
    return PromptCompletionSplit(tokens, np.concatenate(masks), offsets, seq_len, layout,
                                 eos[0] if eos else 0)


# ================================================================================ batches
def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(stream, index))))


class PromptCompletionBatcher:
    """Training batches of a `PromptCompletionSplit`, a pure function of (seed, step,
    process_index, process_count); a `gptjax.data.batcher.Batcher`.

    'pad' layout, sampling 'packed': global sequence number `step * B + row` maps to (epoch,
    position) and the row at that position of the epoch's permutation (drawn from (seed,
    epoch)), so epochs continue seamlessly, even inside a batch, and each row is used once
    per epoch; 'random_offset': B rows drawn with replacement from (seed, step). 'pack'
    layout: `LMBatcher` windows of the stream (either sampling), the weights read from the
    mask at the same positions. Process p of P gets rows [p * B / P, (p + 1) * B / P) of the
    global batch, so the concatenation over processes equals the one-process batch.

    Args:
      split: the tokenized training rows.
      global_batch_size: B, summed over processes; divisible by process_count.
      seed: non-negative integer.
      sampling: 'packed' or 'random_offset' (data.sampling).
      process_index, process_count: this process and the number of processes.
    """

    def __init__(self, split: PromptCompletionSplit, global_batch_size: int, seed: int,
                 sampling: str = "packed", process_index: int = 0, process_count: int = 1):
        check_choice("data.sampling", sampling, MODES)
        check_int("seed", seed, 0)
        check_int("global_batch_size", global_batch_size, 1)
        if process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index}, process_count={process_count}; "
                             "allowed: 0 <= index < count")
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}")
        self.split, self.seq_len, self.layout = split, split.seq_len, split.layout
        self.global_batch_size, self.seed, self.mode = int(global_batch_size), int(seed), sampling
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.local_batch_size = self.global_batch_size // self.process_count
        self.fingerprint = split.fingerprint
        self._perms: dict[int, np.ndarray] = {}
        if self.layout == "pack":
            if split.num_tokens < self.seq_len + 1:
                raise ValueError(f"the packed rows have {split.num_tokens} tokens, fewer than "
                                 f"one window (seq_len + 1 = {self.seq_len + 1}); allowed: more "
                                 "rows or data.pc_layout='pad'")
            args = (self.seq_len, global_batch_size, seed, sampling, process_index, process_count)
            self._tokens = LMBatcher(split.tokens, *args, fingerprint=split.fingerprint)
            self._mask = LMBatcher(split.mask, *args, fingerprint=split.fingerprint)

    @property
    def steps_per_epoch(self) -> float:
        """Steps per pass over the rows ('pad') or the stream's windows ('pack')."""
        if self.layout == "pack":
            return self._tokens.steps_per_epoch
        return self.split.num_rows / self.global_batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            perm = self._perms[epoch] = _rng(self.seed, 2, epoch).permutation(self.split.num_rows)
        return perm

    def rows(self, step: int) -> np.ndarray:
        """'pad': the row indices of this process's part of the batch of `step`."""
        local = self.process_index * self.local_batch_size + np.arange(self.local_batch_size)
        if self.mode == "random_offset":
            # The whole global batch, so each process's slice matches the 1-process batch.
            return _rng(self.seed, 3, step).integers(0, self.split.num_rows,
                                                     self.global_batch_size)[local]
        epoch_B, pos_B = np.divmod(np.int64(step) * self.global_batch_size + local,
                                   self.split.num_rows)
        out = np.empty_like(pos_B)
        for epoch in np.unique(epoch_B):
            out[epoch_B == epoch] = self._permutation(int(epoch))[pos_B[epoch_B == epoch]]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """dict(inputs=int32[B_local, T], targets=int32[B_local, T], weights=float32[B_local,
        T]): weight 1 where the target is a completion token."""
        if step < 0:
            raise ValueError(f"step={step}; allowed: step >= 0")
        if self.layout == "pad":
            return self.split.padded(self.rows(step))
        b = self._tokens.batch(step)
        return dict(b, weights=self._mask.batch(step)["targets"].astype(np.float32))

    def state(self) -> dict[str, Any]:
        """What defines the batches, JSON-able, for the checkpoint."""
        return dict(dataset=DATASET, layout=self.layout, seed=self.seed, mode=self.mode,
                    fingerprint=self.fingerprint, seq_len=self.seq_len,
                    global_batch_size=self.global_batch_size)

    def restore(self, state: dict[str, Any]) -> None:
        """Raises ValueError when `state` was made for other rows or another batching (the
        process layout may differ: the global batch of a step does not depend on it)."""
        for key, now in self.state().items():
            if key not in state:
                raise ValueError(f"data state has no {key!r} (a checkpoint of other data?); got "
                                 f"keys {sorted(state)}")
            if state[key] != now:
                what = ("the training rows differ from the checkpoint's" if key == "fingerprint"
                        else "config changed")
                raise ValueError(f"data state mismatch: checkpoint {key}={state[key]!r}, now "
                                 f"{now!r} ({what})")

    def close(self) -> None:
        """Nothing to release."""
