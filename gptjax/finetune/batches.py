"""A task split as arrays (GPT-1's input transformation applied) and its fixed-size batches.

    enc = encode_examples(examples, spec, tokenizer, special, max_len)   # tokens [N, K, T]
    for batch in epoch_batches(enc, batch_size, seed, epoch): ...
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

from gptjax.data.tasks import Example, TaskSpec
from gptjax.eval.scoring import round_up
from gptjax.finetune import heads


@dataclasses.dataclass
class EncodedSplit:
    """A split after GPT-1's input transformation: tokens [N, K, T], lengths [N, K], labels [N]."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    examples: list

    def __len__(self) -> int:
        return len(self.examples)


def encode_examples(examples: Sequence[Example], spec: TaskSpec, tokenizer,
                    special: heads.SpecialTokens, max_len: int) -> EncodedSplit:
    """Tokenizes and transforms a split (see heads.transform); unlabelled examples get label 0.

    Args:
      examples: the split's examples.
      spec: their task.
      tokenizer: the decoder's tokenizer.
      special: the task tokens' ids.
      max_len: longest transformed sequence (longer inputs are cut, see heads.transform).

    Returns:
      The EncodedSplit, padded to its longest sequence.

    Raises:
      ValueError: a multiple-choice example with another number of candidates than the task's.
    """
    if not examples:
        raise ValueError(f"task {spec.name!r}: the split to encode is empty")
    seqs = []
    for ex in examples:
        if spec.task_type == "multiple_choice" and len(ex.choices) != spec.num_choices:
            raise ValueError(f"{spec.name} example {ex.idx!r} has {len(ex.choices)} choices; the "
                             f"task has {spec.num_choices}")
        seqs.append(heads.transform(
            spec.task_type, special, max_len, tokenizer.encode(ex.text_a),
            tokenizer.encode(ex.text_b) if ex.text_b is not None else None,
            [tokenizer.encode(c) for c in ex.choices]))
    longest = max(len(s) for k in seqs for s in k)
    tokens, lengths = heads.pack(seqs, longest)
    dtype = np.float32 if spec.regression else np.int32
    labels = np.array([0 if ex.label is None else ex.label for ex in examples], dtype)
    return EncodedSplit(tokens, lengths, labels, list(examples))


def make_batch(enc: EncodedSplit, rows: np.ndarray, batch_size: int, bucket: int = 16,
               max_len: int = 0) -> dict:
    """Rows of a split as one fixed-size batch: padding rows repeat row 0 with weight 0.

    The length is the batch's longest sequence rounded up to `bucket` (at most `max_len` when
    given), so few shapes compile while short batches skip most of the padding; a bucket of
    max_len gives every batch of every split one shape.

    Args:
      enc: the split.
      rows: indices of its examples, at most batch_size.
      batch_size: rows of the batch.
      bucket: the length is a multiple of this.
      max_len: the longest length (0: no limit).

    Returns:
      {'tokens' [B, K, T], 'lengths' [B, K], 'labels' [B], 'weights' [B] (0 on padding rows)}.
    """
    n = len(rows)
    idx = np.concatenate([rows, np.full(batch_size - n, rows[0])]).astype(np.int64)
    lengths = enc.lengths[idx]
    T = round_up(int(lengths.max()), bucket)
    if max_len:
        T = min(T, max_len)
    width = enc.tokens.shape[-1]
    tokens = enc.tokens[idx, :, :T]
    if T > width:
        tokens = np.pad(tokens, ((0, 0), (0, 0), (0, T - width)))
    return {"tokens": tokens, "lengths": lengths, "labels": enc.labels[idx],
            "weights": (np.arange(batch_size) < n).astype(np.float32)}


def epoch_batches(enc: EncodedSplit, batch_size: int, seed: int, epoch: int,
                  bucket: int = 16, max_len: int = 0) -> Iterator[dict]:
    """One shuffled pass over a split; the permutation depends only on (seed, epoch).

    Args:
      enc, batch_size, bucket, max_len: as in `make_batch`.
      seed, epoch: what the order of the pass depends on.

    Returns:
      An iterator over the pass's batches (the last one padded).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(len(enc))
    for start in range(0, len(enc), batch_size):
        yield make_batch(enc, perm[start:start + batch_size], batch_size, bucket, max_len)
