"""Orbax checkpoints of the train state plus JSON metadata, saved asynchronously and atomically.

A checkpoint step directory holds two items: `state` (params, optimizer state, step; restored
straight into the target's sharding, so a checkpoint written on one mesh restores onto another)
and `meta` (JSON: the model config, the data iterator position, the tokenizer fingerprint).
Orbax writes each step to `<step>.orbax-checkpoint-tmp` and renames it to `<step>` only once
every file is written, so a crash or `kill -9` mid-save never leaves a half-written step that
`latest_step()` would pick; a training run removes such leftovers when it starts, and says so.
Once a save is complete each process records checksums of the files it wrote
(gptjax.runs.integrity); every restore checks them before Orbax reads anything, since Orbax
itself restores overwritten array bytes without an error. A finalized step that is later damaged
(files deleted, truncated or overwritten) fails to restore with a one-line
`DamagedCheckpointError`; `restore_latest` then sets it aside and uses the one before. A state
holding a non-finite value is never saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import glob
import os
import re
import sys
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from gptjax.runs import faults, integrity
from gptjax.multihost import barrier


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
    text = " ".join(str(e).split("[tensorstore_spec")[0].split("See full TensorStore")[0].split())
    text = text or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _chain(e: BaseException) -> list:
    """`e` and every exception it carries: causes, contexts and the members of groups."""
    seen, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in seen):
            continue
        seen.append(x)
        todo += [x.__cause__, x.__context__, *getattr(x, "exceptions", ())]
    return seen


def _is_damage(e: BaseException) -> bool:
    """Whether anything in `e`'s chain says a file is missing, short or unreadable.

    Orbax wraps the tensorstore error that names the damage ('OUT_OF_RANGE ... Requested byte
    range') in a generic 'Encountered error while reading array index', so the top message alone
    would read as a mismatch.
    """
    return any(isinstance(x, FileNotFoundError) or _DAMAGE.search(str(x)) for x in _chain(e))


def is_closed_loop_error(exc: BaseException) -> bool:
    """Whether `exc` is asyncio's RuntimeError('Event loop is closed'): what a read left over
    from a failed restore raises when it completes (dropped by this module's restores and by
    gptjax.cli's hooks)."""
    return isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc)


def _from_abandoned_read(unraisable) -> bool:
    """Whether an unraisable exception comes from the leftover reads of a failed restore."""
    exc = unraisable.exc_value
    if is_closed_loop_error(exc):
        return True
    tb = getattr(exc, "__traceback__", None)
    while tb is not None:
        if re.search(r"[/\\](orbax|tensorstore)[/\\]", tb.tb_frame.f_code.co_filename):
            return True
        tb = tb.tb_next
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine closed with its error
    return code is not None and re.search(r"[/\\]orbax[/\\]", code.co_filename) is not None


def _ignore_abandoned_restore_callbacks() -> None:
    """Drop the tracebacks of a failed restore's leftover reads.

    When one array of a restore fails, Orbax closes its event loop while tensorstore still
    completes the other reads: their callbacks raise 'Event loop is closed', and the read
    coroutines that are never awaited raise their own errors when collected. Both reach
    `sys.unraisablehook` ("Exception ignored in ...") after the real, one-line error; the
    classification already said what is wrong, so they are dropped (GPTJAX_DEBUG shows them).
    """
    previous = sys.unraisablehook
    if not getattr(previous, "_gptjax_filter", False):
        def hook(unraisable):
            if os.environ.get("GPTJAX_DEBUG") or not _from_abandoned_read(unraisable):
                previous(unraisable)

        hook._gptjax_filter = True
        sys.unraisablehook = hook
    gc.collect()  # collect the abandoned coroutines now, while the hook is in place


class _QuietLoop(asyncio.SelectorEventLoop):
    """An event loop that stays quiet about the leftovers of a failed restore.

    When one read of a restore fails, Orbax closes its loop while tensorstore still finishes
    the other reads. Each of them then calls `call_soon_threadsafe` on the closed loop, which
    tensorstore reports with a traceback (through `sys.excepthook`), and the tasks of reads that
    failed too are collected later with "Task exception was never retrieved" and a traceback
    (through the loop's exception handler and asyncio's logger). All of it comes after the
    one-line error and says nothing more: once the loop is closed, or its restore failed
    (`abandoned`), both are dropped (GPTJAX_DEBUG shows the exception handler's).
    """

    abandoned = False

    def call_soon_threadsafe(self, callback, *args, context=None):
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise

    def call_exception_handler(self, context):
        if (self.abandoned or self.is_closed()) and not os.environ.get("GPTJAX_DEBUG"):
            return None
        return super().call_exception_handler(context)


class _QuietLoopPolicy(asyncio.DefaultEventLoopPolicy):
    def __init__(self):
        super().__init__()
        self.loops = []

    def new_event_loop(self):
        loop = _QuietLoop()
        self.loops.append(loop)
        return loop


@contextlib.contextmanager
def _quiet_loops():
    """Orbax's restores inside create `_QuietLoop`s (it makes a fresh loop per restore); when
    the restore fails they are marked abandoned."""
    previous = asyncio.get_event_loop_policy()
    policy = _QuietLoopPolicy()
    asyncio.set_event_loop_policy(policy)
    try:
        yield
    except BaseException:
        for loop in policy.loops:
            loop.abandoned = True
        raise
    finally:
        asyncio.set_event_loop_policy(previous)


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
        # Every save_every steps and at a preemption; not Orbax's default extra save at the
        # first step (seconds of a small run for a state that is one step from the init).
        policy = ocp.checkpoint_managers.AnySavePolicy([
            ocp.checkpoint_managers.FixedIntervalPolicy(max(1, save_every)),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()])
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_decision_policy=policy,
            enable_async_checkpointing=async_save, create=not read_only,
            cleanup_tmp_directories=not read_only)  # (Orbax's read_only logs warnings)
        self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=("state", "meta"))
        self._async = async_save
        self._hooks = faults.active()  # fault points: no-ops unless a test installs faults
        self._unsealed: Optional[int] = None  # the step saved last, before its checksums
        self._verified: set = set()  # steps whose checksums matched (or were written) here
        if leftovers:
            _notice(f"removed the incomplete checkpoint save(s) {leftovers} in {self.directory} "
                    f"(a save was interrupted); complete checkpoints: steps {self.all_steps()}")

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self) -> list:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts an (async) save; returns whether a checkpoint is being written at this step.

        A state holding a NaN or an infinity is not saved (with a warning): rotation would
        otherwise delete the finite checkpoints it could be resumed from.
        """
        due = force or self._mngr.should_save(step)
        if not due:
            self._seal(block=False)
            return False
        self._seal(block=True)
        if not integrity.all_finite(state):
            _notice(f"not saving the checkpoint of step {step}: the train state holds non-finite "
                    f"values; the last checkpoint is step {self.latest_step()}")
            return False
        meta = dict(meta, checksums=jax.process_count())  # this step must have checksum files
        started = self._mngr.save(
            step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          meta=ocp.args.JsonSave(meta)), force=force)
        if started:
            self._unsealed = step
            self._hooks.after_save_started(step, self.directory)
            if not self._async:
                self._seal(block=True)
        return started

    def _seal(self, block: bool) -> None:
        """Writes this process's checksums of the last save once Orbax has finished it.

        Args:
          block: wait for a save in flight; otherwise return at once if one is.
        """
        if self._unsealed is None:
            return
        if not block and self._mngr.is_saving_in_progress():
            return
        self._mngr.wait_until_finished()
        step, self._unsealed = self._unsealed, None
        step_dir = os.path.join(self.directory, str(step))
        if os.path.isdir(step_dir):  # (rotation may have removed it already)
            integrity.seal(step_dir, jax.process_index(), jax.process_count())
            self._verified.add(step)

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` would write a checkpoint (interval, or a preemption)."""
        return self._mngr.should_save(step)

    def restore_meta(self, step: Optional[int] = None) -> dict:
        step = self._require_step(step)
        self.verify(step)
        return self._read_meta(step)

    def _read_meta(self, step: int) -> dict:
        try:
            with _quiet_loops():
                return self._mngr.restore(step, args=ocp.args.Composite(
                    meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - any failure to read the JSON is damage
            raise self._damaged(step, e) from e

    def verify(self, step: int) -> None:
        """Checks the files of `step` against the checksums written with it.

        A step saved before gptjax wrote checksums loads with a one-line warning.

        Raises:
          DamagedCheckpointError: a file is missing, of another size or another content, or
            the checksums themselves are missing although the step was saved with them.
        """
        if step in self._verified:
            return
        step_dir = os.path.join(self.directory, str(step))
        if integrity.has_checksums(step_dir):
            problem = integrity.verify(step_dir, jax.process_index(), jax.process_count())
        elif "checksums" in self._read_meta(step):
            problem = "its checksum files are missing (the run stopped before writing them)"
        else:
            problem = None
            _notice(f"checkpoint step {step} in {self.directory} has no checksums (it was "
                    "written before gptjax recorded them); loading it unverified")
        problem = integrity.agree(problem)
        if problem is not None:
            raise self._damaged(step, problem)
        self._verified.add(step)

    def restore(self, abstract_state: Any, step: Optional[int] = None) -> tuple[Any, dict]:
        """Restores (state, meta) into the shapes, dtypes and shardings of `abstract_state`."""
        step = self._require_step(step)
        self._check_items(step)
        self.verify(step)
        try:
            with _quiet_loops():
                out = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    meta=ocp.args.JsonRestore()))
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

        Args:
          abstract_state: the state to restore into, or a function of the step's metadata that
            gives it (a step saved in another parameter layout is read in its own).
          check_meta: see above.

        Returns:
          (step, state, meta) of the restored checkpoint, or None.
        """
        while (step := self.latest_step()) is not None:
            try:
                saved_meta = self.restore_meta(step)
                check_meta(step, saved_meta)
                target = abstract_state(saved_meta) if callable(abstract_state) else abstract_state
                state, meta = self.restore(target, step)
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
        self._verified.discard(step)
        self._mngr.reload()
        return dst

    def _check_items(self, step: int) -> None:
        """Both items of a step must be there before Orbax is asked to read them."""
        for item in ("state", "meta"):
            if not os.path.isdir(os.path.join(self.directory, str(step), item)):
                raise DamagedCheckpointError(
                    f"checkpoint step {step} in {self.directory} is incomplete: its {item!r} "
                    f"directory is missing", step)

    def _damaged(self, step: int, e) -> DamagedCheckpointError:
        """The one-line error of a damaged step; `e` is the error or the problem found."""
        if isinstance(e, BaseException):
            _ignore_abandoned_restore_callbacks()
            # The message that names the damage, not Orbax's generic wrapper around it.
            e = _short(next((x for x in _chain(e) if _DAMAGE.search(str(x))), e))
        others = [s for s in self.all_steps() if s != step]
        hint = (f"; delete that step directory (or pass step={others[-1]}) to use step "
                f"{others[-1]}" if others else "")
        return DamagedCheckpointError(f"checkpoint step {step} in {self.directory} is damaged "
                                      f"or truncated ({e}){hint}", step)

    def _restore_error(self, step: int, e: BaseException, what: str) -> CheckpointError:
        _ignore_abandoned_restore_callbacks()
        if _is_damage(e):
            return self._damaged(step, e)
        return CheckpointError(f"checkpoint step {step} in {self.directory} does not match "
                               f"{what}: {_short(e)}")

    def restore_params(self, abstract_params: Any, step: Optional[int] = None) -> Any:
        """Only `state.params`, as host numpy arrays in the shapes of `abstract_params`.

        An Orbax partial restore: the optimizer state is never read, and no mesh or train
        Setup is needed (inference, finetuning, export).
        """
        step = self._require_step(step)
        self.verify(step)
        item = {"params": abstract_params}
        restore_args = jax.tree_util.tree_map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        try:
            with _quiet_loops():
                out = self._mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                 partial_restore=True)))
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
        self._seal(block=True)

    def close(self) -> None:
        self.wait()
        self._mngr.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for restoring straight into a layout."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
