"""Several processes: JAX's distributed runtime, barriers, and work done by process 0 first.

Every function here is a no-op (or a plain call) in a single-process run, so the trainer calls
them unconditionally.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
# The coordination service client (whose barrier timeout we choose) is only reachable through
# this private module; it exists in every jax version gptjax supports (0.10.x, 0.11.x).
from jax._src import distributed
from jax.experimental import multihost_utils


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process reaches `name` (no-op in a single-process run).

    Uses the coordination service's barrier, whose timeout we choose, rather than a collective
    (gloo's CPU collectives give up after 30 s, less than preparing a corpus may take).

    Args:
      name: the barrier's name, the same on every process.
      timeout_s: how long to wait for the other processes.
    """
    if jax.process_count() == 1:
        return
    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(f"gptjax_{name}", timeout_in_ms=timeout_s * 1000)
    else:
        multihost_utils.sync_global_devices(name)


def main_process_first(name: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` on process 0 first (preparing shared files), then on the others (reading them).

    Args:
      name: the barrier's name between the two turns.
      fn: the work; every process runs it once.

    Returns:
      What `fn` returned on this process.
    """
    if jax.process_index() == 0:
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


def maybe_init_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
    """Start JAX's multi-process runtime when flags or the environment ask for it.

    Explicit flags (all three) work anywhere, including several CPU processes on one machine
    (with gloo collectives). Without flags, `GPTJAX_DISTRIBUTED=1` lets JAX detect the cluster
    itself (TPU pods, SLURM, Open MPI). Otherwise the run is single-process.

    Args:
      coordinator_address: host:port of process 0.
      num_processes: how many processes the run has.
      process_id: this process's index.

    Raises:
      ValueError: if only some of the three are given.
    """
    given = [x is not None for x in (coordinator_address, num_processes, process_id)]
    if any(given) and not all(given):
        raise ValueError("multi-process needs all of --coordinator_address, --num_processes and "
                         "--process_id (or none of them)")
    if all(given):
        if (jax.config.jax_platforms in (None, "", "cpu")
                or os.environ.get("JAX_PLATFORMS") == "cpu"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif os.environ.get("GPTJAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()
