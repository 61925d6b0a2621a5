"""The training batcher protocol: what the training loop asks of its data.

Implemented by `gptjax.data.lm.LMBatcher` (one token array), `gptjax.data.sharded.ShardedBatcher`
(per-process token shards), `gptjax.data.prompt_completion.PromptCompletionBatcher` (JSONL rows,
completion-only weights) and `gptjax.data.prefetch.Prefetcher` (any of them, built ahead on a
thread). A batch is a pure function of the step, so the loop owns the step: it asks for
`batch(step)`, saves `state()` with the step in its checkpoint, and on resume hands the saved
state to `restore()`, which refuses a state made for other data or another batching.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Batcher(Protocol):
    """This process's training batches."""

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the global batch of `step`: dict(inputs, targets) int32, and
        `weights` float32 (0 drops a target) from batchers whose targets do not all count."""
        ...

    def state(self) -> dict[str, Any]:
        """What defines the batches (seed, mode, data fingerprint, shapes), JSON-able."""
        ...

    def restore(self, state: dict[str, Any]) -> None:
        """Raises ValueError when `state` (a saved `state()`) was made for other batches."""
        ...

    def close(self) -> None:
        """Releases threads or workers (a later `batch()` may start them again)."""
        ...
