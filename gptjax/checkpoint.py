"""Orbax checkpoints of the train state plus JSON metadata, saved asynchronously and atomically.

A checkpoint step directory holds two items: `state` (params, optimizer state, step; restored
straight into the target's sharding, so a checkpoint written on one mesh restores onto another)
and `meta` (JSON: the model config, the data iterator position, the tokenizer fingerprint).
Orbax writes each step to a temporary directory and renames it when complete, so a crash mid-save
never leaves a half-written step that `latest_step()` would pick.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the run; the message says which."""


class Checkpointer:
    """Saves every `save_every` steps, keeps the last `keep`, restores the latest automatically."""

    def __init__(self, directory: str, *, save_every: int = 1000, keep: int = 3,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, save_every),
            enable_async_checkpointing=async_save, create=True)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an (async) save; returns whether a checkpoint is being written at this step."""
        return self._mngr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=force)

    def restore_meta(self, step: Optional[int] = None) -> dict:
        step = self._require_step(step)
        return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"]

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restores (state, meta) into the shapes, dtypes and shardings of `abstract_state`."""
        step = self._require_step(step)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint step {step} in {self.directory} does not match "
                                  f"this model/optimizer: {first}") from e
        return out["state"], out["meta"]

    def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
        """Only `state.params`, as host numpy arrays in the shapes of `abstract_params`.

        An Orbax partial restore: the optimizer state is never read, and no mesh or train
        Setup is needed (inference, finetuning, export).
        """
        step = self._require_step(step)
        item = {"params": abstract_params}
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item=item, restore_args=restore_args, partial_restore=True)))
        except (ValueError, KeyError, FileNotFoundError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint step {step} in {self.directory} does not hold "
                                  f"this model's parameters: {first}") from e
        return out["state"]["params"]

    def _require_step(self, step: Optional[int]) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        return step

    def wait(self) -> None:
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring straight into a layout."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
