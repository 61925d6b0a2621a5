"""Checksums of checkpoint files, and the finiteness of a state before it is saved.

Orbax's reads check neither the bytes of an array file nor its length against what was written:
random bytes over an array's chunk restore silently about half the time. So once a save is
complete, each process records the SHA-256 and size of every file it wrote in the step directory
(`checksums.process_<i>.json`; files under an `ocdbt.process_<j>` or `process_<j>` directory
belong to process j, the rest to process 0, which writes the merged manifests and the metadata),
and every restore checks them first. On several processes each one verifies a share of the files
and they agree on the verdict through JAX's coordination service, so all take the same path.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
# The coordination service client (a key-value store shared by the processes) is only reachable
# through this private module, as in gptjax.multihost.
from jax._src import distributed

CHECKSUMS = "checksums.process_{}.json"
_CHECKSUMS_RE = re.compile(r"^checksums\.process_(\d+)\.json$")
_OWNER = re.compile(r"(?:^|/)(?:ocdbt\.)?process_(\d+)(?:/|$)")
_agreements = itertools.count()


def owner(relpath: str) -> int:
    """The process that writes `relpath` (relative to a step directory)."""
    m = _OWNER.search(relpath.replace(os.sep, "/"))
    return int(m.group(1)) if m else 0


def _digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()  # releases the GIL while hashing


def seal(step_dir: str, process: int, process_count: int) -> None:
    """Writes `checksums.process_<process>.json`: size and SHA-256 of each file it wrote.

    Written to a temporary name and renamed, so a crash leaves either no checksum file (the step
    then counts as damaged, see `verify`) or a complete one.
    """
    files = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel.startswith("checksums.") or owner(rel) != process:  # (others' in flight)
                continue
            files[rel.replace(os.sep, "/")] = [os.path.getsize(path), _digest(path)]
    out = os.path.join(step_dir, CHECKSUMS.format(process))
    with open(out + ".tmp", "w") as fh:
        json.dump({"algorithm": "sha256", "process_count": process_count, "files": files}, fh)
    os.replace(out + ".tmp", out)


def has_checksums(step_dir: str) -> bool:
    return any(_CHECKSUMS_RE.match(n) for n in os.listdir(step_dir))


def verify(step_dir: str, index: int = 0, count: int = 1) -> Optional[str]:
    """What is wrong with the files of `step_dir` (None: all match their checksums).

    With `count` processes, this one (`index`) reads the checksum files j with j % count ==
    index; `agree` then combines the verdicts. Files no checksum lists are ignored.
    """
    try:
        with open(os.path.join(step_dir, CHECKSUMS.format(0))) as fh:
            n_writers = int(json.load(fh)["process_count"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its checksum file {CHECKSUMS.format(0)} is missing or unreadable ({e})"
    for j in range(index, n_writers, count):
        name = CHECKSUMS.format(j)
        try:
            with open(os.path.join(step_dir, name)) as fh:
                files = json.load(fh)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its checksum file {name} is missing or unreadable ({e})"
        for rel, (size, digest) in sorted(files.items()):
            path = os.path.join(step_dir, rel)
            if not os.path.isfile(path):
                return f"its file {rel} is missing"
            if os.path.getsize(path) != size:
                return f"its file {rel} has {os.path.getsize(path)} bytes, {size} were written"
            if _digest(path) != digest:
                return f"its file {rel} does not match its checksum (sha256)"
    return None


def gather(value: Any) -> list:
    """Every process's JSON-able `value`, in process order (through JAX's coordination service).

    Every process must call this the same number of times, in the same order.
    """
    if jax.process_count() == 1:
        return [value]
    client = distributed.global_state.client
    key = f"gptjax_gather_{next(_agreements)}"
    client.key_value_set(f"{key}_{jax.process_index()}", json.dumps(value))
    return [json.loads(client.blocking_key_value_get(f"{key}_{i}", 600_000))
            for i in range(jax.process_count())]


def agree(problem: Optional[str]) -> Optional[str]:
    """The first process's problem among all processes' (None when every process found none).

    Every process must call this the same number of times, in the same order.
    """
    return next((p for p in gather(problem) if p), None)


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def all_finite(tree: Any) -> bool:
    """Whether every floating-point leaf of `tree` is finite (one reduction per leaf)."""
    leaves = [x for x in jax.tree_util.tree_leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    return not leaves or bool(np.asarray(_all_finite(leaves)))  # replicated on every host
