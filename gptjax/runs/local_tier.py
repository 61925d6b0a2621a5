"""The local checkpoint tier: each process saves the shards it holds to its own disk, often.

A step is `<directory>/<step>/` holding `shards.bin` (the bytes of this process's addressable
shards of every array of the state, each distinct shard once) and `local.json` (the step, the
checkpoint metadata the persistent tier saves, the layout the shards were taken on: process
count and index, the global and local device ids, the mesh's shape, each shard's array index,
offset, shape and dtype; and the size and SHA-256 of `shards.bin`). A save writes
`<step>.tmp-<pid>` and renames it, so a crash never leaves a half-written step; leftovers are
removed when the tier is opened. No process waits for another to save. A step restores only onto
the layout it was taken on (the same processes, devices and shardings): `read` says why not
otherwise. The persistent tier (gptjax.runs.checkpoint) is the one that restores anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from typing import Any, Optional

import jax
import numpy as np

from gptjax.runs import faults, integrity

SHARDS, INDEX, DAMAGED = "shards.bin", "local.json", ".damaged"


class LocalTierError(ValueError):
    """A local step that cannot be used: damaged, or taken on another layout (`damaged` says)."""

    def __init__(self, message: str, damaged: bool):
        super().__init__(message)
        self.damaged = damaged


def _digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _index(idx: tuple, shape: tuple) -> list:
    """A shard's index (a tuple of slices into its array) as [[start, stop], ...]."""
    return [list(s.indices(n)[:2]) for s, n in zip(idx, shape)]


def _layout(mesh) -> dict:
    return dict(process_count=jax.process_count(), process_index=jax.process_index(),
                devices=[d.id for d in jax.devices()],
                local_devices=[d.id for d in jax.local_devices()],
                mesh={str(k): int(v) for k, v in dict(mesh.shape).items()})


class LocalTier:
    """This process's local checkpoints: save every `save_every` steps, keep the last `keep`."""

    def __init__(self, directory: str, save_every: int, keep: int):
        self.directory = os.path.abspath(directory)
        self.save_every, self.keep = save_every, keep
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # interrupted saves: never a step
            if ".tmp-" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def steps(self) -> list:
        """The steps saved here (complete saves; not yet verified), oldest first."""
        return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())

    def due(self, step: int) -> bool:
        return step % self.save_every == 0

    def discard_after(self, step: int) -> list:
        """Deletes the steps after `step`, the one a run resumed from: saved by an attempt
        whose work the resume did not take (another layout, a damaged step), they are not this
        run's past any more. Returns the steps deleted."""
        later = [s for s in self.steps() if s > step]
        for s in later:
            shutil.rmtree(os.path.join(self.directory, str(s)), ignore_errors=True)
        return later

    def save(self, step: int, state: Any, meta: dict, mesh) -> Optional[str]:
        """Writes this process's shards of `state` at `step` (replacing an older save of that
        step) and drops the steps beyond the last `keep`; returns the step's directory (None:
        not saved, as the state holds a non-finite value, with a warning)."""
        if not integrity.all_finite(state):
            print(f"warning: not saving local checkpoint step {step}: the train state holds "
                  "non-finite values", file=sys.stderr, flush=True)
            return None
        leaves, index, offset = jax.tree_util.tree_leaves(state), [], 0
        final = os.path.join(self.directory, str(step))
        tmp = f"{final}.tmp-{os.getpid()}"
        os.makedirs(tmp)
        with open(os.path.join(tmp, SHARDS), "wb") as fh:
            for leaf in leaves:
                shards, seen = [], set()
                for shard in leaf.addressable_shards:
                    where = _index(shard.index, leaf.shape)
                    if str(where) in seen:  # (a replica of a shard written already)
                        continue
                    seen.add(str(where))
                    data = np.asarray(shard.data)
                    fh.write(data.tobytes(order="C"))
                    shards.append(dict(index=where, offset=offset, shape=list(data.shape)))
                    offset += data.nbytes
                index.append(dict(shape=list(leaf.shape), dtype=str(leaf.dtype), shards=shards))
        doc = dict(step=step, meta=meta, layout=_layout(mesh), leaves=index,
                   file=dict(size=offset, sha256=_digest(os.path.join(tmp, SHARDS))))
        with open(os.path.join(tmp, INDEX), "w") as fh:
            json.dump(doc, fh)
        if os.path.isdir(final):  # (a step saved again after a restore from an earlier one)
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(os.path.join(self.directory, str(old)), ignore_errors=True)
        faults.active().after_local_save(step, final)
        return final

    def check(self, step: int, mesh) -> dict:
        """`local.json` of `step` once its shards match their checksum and its layout is this
        run's.

        Raises:
          LocalTierError: the step is damaged (`damaged`), or was taken on another layout.
        """
        step_dir = os.path.join(self.directory, str(step))
        try:
            with open(os.path.join(step_dir, INDEX)) as fh:
                doc = json.load(fh)
            size, digest = doc["file"]["size"], doc["file"]["sha256"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LocalTierError(f"its {INDEX} is missing or unreadable ({e})", True)
        path = os.path.join(step_dir, SHARDS)
        if not os.path.isfile(path):
            raise LocalTierError(f"its {SHARDS} is missing", True)
        if os.path.getsize(path) != size:
            raise LocalTierError(f"its {SHARDS} has {os.path.getsize(path)} bytes, {size} were "
                                 "written", True)
        if _digest(path) != digest:
            raise LocalTierError(f"its {SHARDS} does not match its checksum (sha256)", True)
        here = _layout(mesh)
        if doc.get("layout") != here:
            changed = sorted(k for k in here if doc.get("layout", {}).get(k) != here[k])
            raise LocalTierError(f"it was saved on another layout ({', '.join(changed)} "
                                 "differ)", False)
        return doc

    def set_aside(self, step: int) -> str:
        """Renames the (damaged) step to `<step>.damaged[.N]`, out of `steps()`."""
        src = os.path.join(self.directory, str(step))
        dst, n = src + DAMAGED, 1
        while os.path.exists(dst):
            dst, n = f"{src}{DAMAGED}.{n}", n + 1
        os.rename(src, dst)
        return dst

    def read(self, doc: dict, abstract_state: Any) -> Any:
        """The state of checked step `doc` (see `check`) as global arrays in the shapes, dtypes
        and shardings of `abstract_state`.

        Raises:
          LocalTierError: the state's arrays or their shardings are not those saved.
        """
        leaves, treedef = jax.tree_util.tree_flatten(abstract_state)
        if len(leaves) != len(doc["leaves"]):
            raise LocalTierError(f"it holds {len(doc['leaves'])} arrays, this state "
                                 f"{len(leaves)}", False)
        path = os.path.join(self.directory, str(doc["step"]), SHARDS)
        data = np.memmap(path, np.uint8, "r") if doc["file"]["size"] else np.zeros(0, np.uint8)
        out = []
        for target, saved in zip(leaves, doc["leaves"]):
            if saved["shape"] != list(target.shape) or saved["dtype"] != str(target.dtype):
                raise LocalTierError(f"an array of shape {saved['shape']} {saved['dtype']} "
                                     f"is {list(target.shape)} {target.dtype} here", False)
            by_index = {str(s["index"]): s for s in saved["shards"]}
            arrays = []
            for device, idx in target.sharding.addressable_devices_indices_map(
                    target.shape).items():
                s = by_index.get(str(_index(idx, target.shape)))
                if s is None:
                    raise LocalTierError("its shards are not this run's sharding", False)
                n = int(np.prod(s["shape"])) * target.dtype.itemsize
                host = np.frombuffer(data[s["offset"]: s["offset"] + n], dtype=target.dtype)
                arrays.append(jax.device_put(host.reshape(tuple(s["shape"])), device))
            out.append(jax.make_array_from_single_device_arrays(
                target.shape, target.sharding, arrays))
        return jax.tree_util.tree_unflatten(treedef, out)
