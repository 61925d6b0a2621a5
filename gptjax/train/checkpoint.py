"""Orbax checkpoints of the train state plus JSON metadata, saved asynchronously and atomically.

A checkpoint step directory holds two items: `state` (params, optimizer state, step; restored
straight into the target's sharding, so a checkpoint written on one mesh restores onto another)
and `meta` (JSON: the model config, the data iterator position, the tokenizer fingerprint).
Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once
every file is written, so a crash or `kill -9` mid-save never leaves a half-written step that
`latest_step()` would pick; a training run removes such leftovers when it starts, and says so.
A finalized step that is later damaged (files deleted or truncated) fails to restore with a
one-line `DamagedCheckpointError`; `restore_latest` then sets it aside and uses the one before.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptjax.train import faults
from gptjax.train.multihost import barrier


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not match the run; the message says which."""


class DamagedCheckpointError(CheckpointError):
    """A finalized checkpoint step whose files are missing, truncated or unreadable."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


TMP_SUFFIX = ".orbax-checkpoint-tmp"

# Tensorstore/Orbax messages of files that are missing, short or unreadable (as opposed to a
# checkpoint that is intact but has another tree structure, shape or dtype).
_DAMAGE = re.compile(r"NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|not found|does not exist|No such file|"
                     r"Error reading|Error opening|truncated|corrupt|Unterminated|Expecting value",
                     re.IGNORECASE)


def _short(e: BaseException, limit: int = 240) -> str:
    """The gist of an Orbax/tensorstore error on one line (without tensorstore's JSON specs)."""
    text = " ".join(str(e).split("[tensorstore_spec")[0].split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ignore_abandoned_restore_callbacks() -> None:
    """Drop the 'Event loop is closed' errors of a failed restore's leftover reads.

    When one array of a restore fails, Orbax closes its event loop while tensorstore still
    completes the other reads; their callbacks then raise into `sys.unraisablehook`, printing
    tracebacks after the real (one-line) error. They are harmless; keep the terminal clean.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_gptjax_filter", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
                unraisable.exc_value):
            return
        previous(unraisable)

    hook._gptjax_filter = True
    sys.unraisablehook = hook


def _notice(msg: str) -> None:
    if jax.process_index() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


class Checkpointer:
    """Saves every `save_every` steps, keeps the last `keep`, restores the latest automatically."""

    def __init__(self, directory: str, *, save_every: int = 0, keep: int = 3,
                 async_save: bool = True, read_only: bool = False):
        """Opens (and, unless `read_only`, creates) a checkpoint directory.

        A writer removes the `<step>.orbax-checkpoint-tmp` leftovers of interrupted saves (and
        says so); a reader (`read_only`: sampling, finetuning from a run) never touches them, as
        they may be a save that a running trainer has in flight.
        """
        self.directory = os.path.abspath(directory)
        leftovers = [] if read_only else sorted(
            os.path.basename(p) for p in glob.glob(os.path.join(self.directory, "*" + TMP_SUFFIX)))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(1, save_every),
            enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only)  # (Orbax's read_only logs warnings)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "meta"))
        if leftovers:
            _notice(f"removed the incomplete checkpoint save(s) {leftovers} in {self.directory} "
                    f"(a save was interrupted); complete checkpoints: steps {self.all_steps()}")

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an (async) save; returns whether a checkpoint is being written at this step."""
        started = self._mngr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=force)
        if started:
            faults.after_save_started(step)
        return started

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write a checkpoint (interval, or a preemption)."""
        return self._mngr.should_save(step)

    def restore_meta(self, step: Optional[int] = None) -> dict:
        step = self._require_step(step)
        try:
            return self._mngr.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - any failure to read the JSON is damage
            raise self._damaged(step, e) from e

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restores (state, meta) into the shapes, dtypes and shardings of `abstract_state`."""
        step = self._require_step(step)
        self._check_items(step)
        try:
            out = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001 - classified into one of two one-line errors
            raise self._restore_error(step, e, "this model/optimizer") from e
        return out["state"], out["meta"]

    def restore_latest(self, abstract_state: Any, check_meta: Callable[[int, dict], None]
                       ) -> Optional[tuple[int, Any, dict]]:
        """Restores the newest step that is intact, for auto-resume; None when there is none.

        A damaged step (missing or truncated files) is renamed to `<step>.damaged` (kept for
        inspection, invisible to Orbax) with a warning, and the step before it is tried.
        `check_meta(step, meta)` runs before the state is read; it raises CheckpointError when
        the checkpoint belongs to another run (architecture, tokenizer), which is not skipped.

        Returns:
          (step, state, meta) of the restored checkpoint, or None.
        """
        while (step := self.latest_step()) is not None:
            try:
                check_meta(step, self.restore_meta(step))
                state, meta = self.restore(abstract_state, step)
                return step, state, meta
            except DamagedCheckpointError as e:
                aside = self.set_aside(step)
                _notice(f"{e}; moved it to {aside} and resuming from the checkpoint before it")
        return None

    def set_aside(self, step: int) -> str:
        """Renames step directory `step` to `<step>.damaged[.N]` (process 0) and rescans."""
        src = os.path.join(self.directory, str(step))
        dst = src + ".damaged"
        if jax.process_index() == 0:
            n = 1
            while os.path.exists(dst):
                dst, n = f"{src}.damaged.{n}", n + 1
            os.rename(src, dst)
        barrier(f"checkpoint_set_aside_{step}")
        self._mngr.reload()
        return dst

    def _check_items(self, step: int) -> None:
        """Both items of a step must be there before Orbax is asked to read them."""
        for item in ("state", "meta"):
            if not os.path.isdir(os.path.join(self.directory, str(step), item)):
                raise DamagedCheckpointError(
                    f"checkpoint step {step} in {self.directory} is incomplete: its {item!r} "
                    f"directory is missing", step)

    def _damaged(self, step: int, e: BaseException) -> DamagedCheckpointError:
        _ignore_abandoned_restore_callbacks()
        others = [s for s in self.all_steps() if s != step]
        hint = (f"; delete that step directory (or pass step={others[-1]}) to use step "
                f"{others[-1]}" if others else "")
        return DamagedCheckpointError(f"checkpoint step {step} in {self.directory} is damaged "
                                      f"or truncated ({_short(e)}){hint}", step)

    def _restore_error(self, step: int, e: BaseException, what: str) -> CheckpointError:
        _ignore_abandoned_restore_callbacks()
        if isinstance(e, FileNotFoundError) or _DAMAGE.search(str(e)):
            return self._damaged(step, e)
        return CheckpointError(f"checkpoint step {step} in {self.directory} does not match "
                               f"{what}: {_short(e)}")

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
        except Exception as e:  # noqa: BLE001 - classified into one of two one-line errors
            raise self._restore_error(step, e, "this model's parameters") from e
        return out["state"]["params"]

    def _require_step(self, step: Optional[int]) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise CheckpointError(f"no checkpoint step {step} in {self.directory}; "
                                  f"allowed: {self.all_steps()}")
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
