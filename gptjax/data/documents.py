"""Document-masked packing: segment ids (and restarted positions) of packed windows.

The token streams join documents with the tokenizer's end-of-text id between consecutive ones
(gptjax.data.token_cache, gptjax.data.sharded; prompt/completion rows end with it). With
`data.document_mask` a window's tokens are split into documents at those ids, and the model
attends only within a document (gptjax.nn.masks, `GPT(..., segment_ids_BxT=...)`).

The end-of-text token *opens* the document after it, as it does when GPT-2 generates from
<|endoftext|>: a window `a1 a2 EOS b1 b2` has segment ids `0 0 1 1 1`. So no target is predicted
across a boundary and none is dropped: a2's target is EOS (the end of A, from A's tokens), EOS's
target is b1 (B's first token, from EOS alone). Segment ids count the end-of-text tokens up to
and including each position, so they depend only on the window's tokens: batches stay a pure
function of the step on any number of processes.

With `data.position_restart` (default on) positions restart at 0 at each document's first token
(the EOS): each document is seen as it is at inference, where a prompt starts at position 0.
Off, positions are 0..T-1 across the window, as GPT-2's learned positions were trained.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from gptjax.data.batcher import Batcher


class DocumentMask(NamedTuple):
    """How batches mark documents: the end-of-text id and whether positions restart."""

    eos_id: int
    position_restart: bool = True

    def arrays(self, inputs_BxT: np.ndarray) -> dict[str, np.ndarray]:
        """`segment_ids` int32[B, T] and, with position_restart, `positions` int32[B, T]."""
        is_eos = np.asarray(inputs_BxT) == self.eos_id
        out = dict(segment_ids=np.cumsum(is_eos, axis=-1, dtype=np.int32))
        if self.position_restart:
            t = np.arange(is_eos.shape[-1], dtype=np.int32)
            start = np.maximum.accumulate(np.where(is_eos, t, 0), axis=-1)
            out["positions"] = (t - start).astype(np.int32)
        return out

    def apply(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`batch` with its documents' arrays added (see `arrays`)."""
        return {**batch, **self.arrays(batch["inputs"])}

    def state(self) -> dict[str, Any]:
        return dict(eos_id=int(self.eos_id), position_restart=bool(self.position_restart))


def document_mask(data_config: Any, tokenizer: Any) -> Optional[DocumentMask]:
    """The run's DocumentMask (data.document_mask, data.position_restart), or None when off.

    Raises:
      ValueError: data.document_mask is on and the tokenizer has no end-of-text token.
    """
    if not data_config.get("document_mask", False):
        return None
    if tokenizer.eos_id is None:
        raise ValueError(f"data.document_mask=True needs an end-of-text token between documents; "
                         f"the {tokenizer.kind!r} tokenizer has none (allowed: tokenizer.kind "
                         "'gpt2_bpe' or 'sentencepiece')")
    return DocumentMask(int(tokenizer.eos_id), bool(data_config.get("position_restart", True)))


def batch_keys(data_config: Any) -> tuple[str, ...]:
    """The int32 [B, T] arrays of a training batch of this data config (compiling the step)."""
    if not data_config.get("document_mask", False):
        return ("inputs", "targets")
    restart = data_config.get("position_restart", True)
    return ("inputs", "targets", "segment_ids") + (("positions",) if restart else ())


class DocumentBatcher:
    """A Batcher whose batches also carry their documents' segment ids (and positions).

    Args:
      batcher: the batcher of the windows (LMBatcher, ShardedBatcher, prompt/completion).
      mask: the DocumentMask.
    """

    def __init__(self, batcher: Batcher, mask: DocumentMask):
        self.batcher, self.mask = batcher, mask

    def batch(self, step: int) -> dict[str, np.ndarray]:
        return self.mask.apply(self.batcher.batch(step))

    def state(self) -> dict[str, Any]:
        return {**self.batcher.state(), "document_mask": self.mask.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Refuses a state saved without the same document mask; then the inner batcher's."""
        if state.get("document_mask") != self.mask.state():
            raise ValueError(f"data state mismatch: checkpoint document_mask="
                             f"{state.get('document_mask')!r}, now {self.mask.state()!r} "
                             "(config changed)")
        self.batcher.restore({k: v for k, v in state.items() if k != "document_mask"})

    def close(self) -> None:
        self.batcher.close()

    def __getattr__(self, name: str) -> Any:  # steps_per_epoch, fingerprint, ... of the windows
        if "batcher" not in self.__dict__:  # (copy/pickle probe before __init__)
            raise AttributeError(name)
        return getattr(self.__dict__["batcher"], name)
