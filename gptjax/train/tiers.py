"""Two checkpoint tiers: which one a run resumes from.

The persistent tier is the run directory's Orbax checkpoints (gptjax.runs.checkpoint, every
`train.save_every` steps); the local tier (gptjax.runs.local_tier, every
`train.local_save_every` steps, under `train.local_dir`) is each process's own copy of the shards
it holds. A run resumes from the newer of the persistent tier's latest step and the newest
local step that every process holds intact on this run's layout: each process verifies its
own steps (a damaged one is set aside with a warning), the processes tell each other which they
hold, and a step one process lacks (a replaced machine, a damaged file) is not used; one line
says so when that makes the run resume from an older step.
"""

from __future__ import annotations

import os
import sys
import uuid
from typing import Any, Callable, Optional

import jax
import ml_collections

from gptjax.multihost import main_process_first
from gptjax.runs.integrity import agree, gather
from gptjax.runs.local_tier import LocalTier, LocalTierError

RUN_ID = "local_tier_id"  # in the run directory: names the run's folder under train.local_dir


def open_local(config: ml_collections.ConfigDict, workdir: str) -> Optional[LocalTier]:
    """This process's local tier of the run in `workdir` (None when `train.local_dir` is '').

    Its folder is `<local_dir>/<workdir's name>-<run id>/process_<i>`: the run id (written to
    the run directory once) keeps the steps of a deleted and restarted run, or of another run
    on the same disk, apart.
    """
    tc = config.train
    if not tc.local_dir:
        return None

    def run_id() -> str:
        path = os.path.join(workdir, RUN_ID)
        if jax.process_index() == 0 and not os.path.exists(path):
            with open(path + ".tmp", "w") as fh:
                fh.write(uuid.uuid4().hex[:12])
            os.replace(path + ".tmp", path)
        with open(path) as fh:
            return fh.read().strip()

    name = f"{os.path.basename(os.path.abspath(workdir))}-{main_process_first(RUN_ID, run_id)}"
    return LocalTier(os.path.join(os.path.abspath(tc.local_dir), name,
                                  f"process_{jax.process_index()}"),
                     tc.local_save_every, tc.local_keep)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _intact_steps(tier: LocalTier, mesh) -> dict:
    """{step: its local.json} of this process's intact local steps on this layout; damaged
    ones are set aside with a warning, ones of another layout skipped with one line."""
    docs, other = {}, []
    for step in tier.steps():
        try:
            docs[step] = tier.check(step, mesh)
        except LocalTierError as e:
            if e.damaged:
                aside = tier.set_aside(step)
                _warn(f"local checkpoint step {step} in {tier.directory} is damaged ({e}); "
                      f"moved it to {aside}")
            else:
                other.append((step, str(e)))
    if other:
        print(f"local checkpoint step(s) {[s for s, _ in other]} in {tier.directory} not used: "
              f"{other[-1][1]}; they restore only onto the layout they were saved on",
              flush=True)
    return docs


def restore_local(run, check_meta: Callable[[int, dict], None], floor: Optional[int] = None
                  ) -> Optional[tuple[int, Any, dict]]:
    """(step, state, meta) of the newest local step every process holds, when it is newer than
    `floor` (default: the persistent tier's latest step); None otherwise (and always without a
    local tier).

    Args:
      run: the gptjax.train.run.Run (its `local` tier, `ckpt`, `setup`).
      check_meta: raises CheckpointError when a step's metadata belongs to another run.
      floor: the persistent step the local one must be newer than (-1: none); given when the
        persistent tier's latest step turned out damaged and an older one was restored.
    """
    tier = run.local
    if tier is None:
        return None
    docs = _intact_steps(tier, run.setup.mesh)
    held = gather(sorted(docs))
    common = set(held[0]).intersection(*held[1:])
    best = max(common, default=None)
    persistent = run.ckpt.latest_step() if floor is None else (floor if floor >= 0 else None)
    newest = max((s for steps in held for s in steps), default=None)
    floor = -1 if persistent is None else persistent
    if best is not None and best <= floor:
        best = None
    if newest is not None and newest > floor and newest != best and jax.process_index() == 0:
        lacking = [i for i, steps in enumerate(held) if newest not in steps]
        then = (f"local step {best}" if best is not None else
                f"the persistent tier's step {persistent}" if persistent is not None else
                "a new state")
        print(f"local checkpoint tier incomplete: step {newest} is missing or damaged on "
              f"process(es) {lacking}; resuming from {then}", flush=True)
    if best is None:
        return None
    doc = docs[best]
    check_meta(best, doc["meta"])
    try:
        state, problem = tier.read(doc, run.setup.abstract_sharded_state()), None
    except LocalTierError as e:
        state, problem = None, f"process {jax.process_index()}: {e}"
    problem = agree(problem)
    if problem:
        if jax.process_index() == 0:
            print(f"local checkpoint step {best} not used ({problem}); resuming from the "
                  "persistent tier", flush=True)
        return None
    return best, state, doc["meta"]
