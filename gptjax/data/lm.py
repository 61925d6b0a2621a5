"""Language-modelling windows and batches cut from a split's token ids (see `token_cache`).

Windows: a window starting at token s has inputs `tokens[s:s+T]` and targets
`tokens[s+1:s+T+1]` (T+1 tokens read). Packed and eval windows start at multiples of T, so
their inputs never overlap and every token after the first is a target exactly once per epoch.

Training batches are a pure function of (seed, step, process_index, process_count): nothing is
carried between steps, so the data position saved in a checkpoint is just the step, and N
processes each loading their slice build the same global batch as one process loading it all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from gptjax.checks import check_choice, check_int

MODES = ("packed", "random_offset")


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
    concatenation over processes equals the one-process batch. A `gptjax.data.batcher.Batcher`:
    `state()` is the seed, mode, shapes and a fingerprint of the data, which `restore()` checks
    a checkpoint's against (the caller owns the step).

    Args:
      tokens: 1-D token ids (e.g. from `load_tokens`; a memmap is fine).
      seq_len: T, the model's context length.
      global_batch_size: B, rows summed over all processes; divisible by process_count.
      seed: non-negative integer seed.
      mode: 'packed' or 'random_offset'.
      process_index: this process, in [0, process_count).
      process_count: number of data-loading processes.
      fingerprint: identifies `tokens`; defaults to `token_fingerprint(tokens)`.
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
    ):
        check_choice("mode", mode, MODES)
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
        check_int("seed", seed, 0)
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

    def state(self) -> dict[str, Any]:
        """What defines the batches, as plain JSON-able values, for the checkpoint."""
        return dict(
            seed=self.seed,
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
        """Checks `state` against this batcher (its batches are a function of the step)."""
        self.check_state(state)

    def close(self) -> None:
        """Nothing to release (no threads or workers)."""

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
          A batcher whose `batch(step)` is the saving batcher's for every step.
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
