"""Host memory: keep memory that XLA:CPU frees mapped, so a step does not page-fault it back in.

XLA:CPU allocates each execution's temporary buffer (every activation of a train step) with
malloc and frees it when the step ends. glibc serves an allocation that large with a fresh mmap
and unmaps it on free, so every step faults its whole buffer in again, 4 KiB at a time, and the
kernel zeroes each page: on a small CPU recipe that is a sizeable part of the step.

`keep_freed_memory()` sets two glibc malloc options (mallopt): no mmap for large allocations
(M_MMAP_MAX = 0) and no returning freed heap memory to the OS (M_TRIM_THRESHOLD at its maximum).
The buffer then comes from a malloc heap and is reused, already mapped, by the next step. The
price is that the process keeps its peak heap size mapped, which a training process reaches on
its first step anyway. Decoding gains nothing from it, so only training processes apply it.

glibc's per-thread heaps hold at most 64 MB, and an allocation larger than that made by a thread
other than the main one is still mmapped whatever the options. JAX dispatches CPU computations
asynchronously, to a worker thread, and that thread allocates a step's buffer, so on its own
`keep_freed_memory()` does not reach steps whose buffer is over 64 MB. `inline_cpu_dispatch()`
sets `jax_cpu_enable_async_dispatch=False` before JAX creates its CPU client, so a computation
on one addressable CPU device (a single-device step, or each process's part of a multi-process
run, whose collectives then run on its main thread) runs on the calling thread, the main one,
whose heap has no 64 MB limit. The price is that Python no longer runs ahead of a CPU step: the
next batch is made after the step, not during it. Computations over several devices of one
process are dispatched as before, and GPU and TPU computations are not affected (on such a run
only the host's malloc setting applies). BENCHMARKS.md has the measurements.

Both change the whole process, so the library never applies them: the entry scripts that train
(train.py, finetune.py, and the bench/ scripts that train in-process) call
`prepare_host_for_training()` first, at their own process edge. GPTJAX_KEEP_FREED_MEMORY=0 leaves
malloc (and dispatch) alone; GPTJAX_INLINE_CPU_DISPATCH=0 leaves JAX's dispatch alone.
"""

from __future__ import annotations

import logging
import os

import jax
from jax._src import xla_bridge  # JAX's own record of whether its backends exist yet

from gptjax import glibc

log = logging.getLogger("gptjax")

_INT_MAX = 2 ** 31 - 1

_applied = False


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory mapped for reuse; True if the options are now in effect.

    A no-op returning False off Linux/glibc, or when GPTJAX_KEEP_FREED_MEMORY=0. Idempotent.
    Affects the whole process (and any library in it) from the next allocation on.
    """
    global _applied
    if _applied:
        return True
    if os.environ.get("GPTJAX_KEEP_FREED_MEMORY", "1") == "0":
        return False
    _applied = (glibc.mallopt(glibc.M_MMAP_MAX, 0)
                and glibc.mallopt(glibc.M_TRIM_THRESHOLD, _INT_MAX))
    return _applied


_inlined = False


def inline_cpu_dispatch() -> bool:
    """Run single-device XLA:CPU computations on the calling thread; True if that is in effect.

    Sets `jax_cpu_enable_async_dispatch=False`, which JAX reads once, when it creates its CPU
    client. Returns False, changing nothing, if that has happened already, if JAX is configured
    for platforms without "cpu" (JAX_PLATFORMS / jax_platforms), or if GPTJAX_KEEP_FREED_MEMORY
    or GPTJAX_INLINE_CPU_DISPATCH is "0"; also False, with the flag set, if JAX's private
    `backends_are_initialized` has moved, as whether it took effect is then unknown. Lasts for
    the rest of the process. See the module docstring for why.
    """
    global _inlined
    if _inlined:
        return True
    if "0" in (os.environ.get("GPTJAX_KEEP_FREED_MEMORY", "1"),
               os.environ.get("GPTJAX_INLINE_CPU_DISPATCH", "1")):
        return False
    platforms = jax.config.values.get("jax_platforms") or os.environ.get("JAX_PLATFORMS") or ""
    if platforms and "cpu" not in platforms.lower().split(","):
        return False
    try:
        exists = xla_bridge.backends_are_initialized()
    except AttributeError:  # private API moved: set the flag, claim nothing
        exists = None
        log.warning("gptjax.train.hostmem: cannot tell whether JAX's CPU client exists yet; "
                    "inline CPU dispatch may not be in effect")
    if exists:
        return False
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _inlined = exists is False
    return _inlined


def prepare_host_for_training() -> dict:
    """What a training process calls first: `keep_freed_memory()`, then `inline_cpu_dispatch()`.

    The second only helps with the first, so it is applied only if the first took effect.
    Returns {"keep_freed_memory": bool, "inline_cpu_dispatch": bool}: what is now in effect.
    """
    kept = keep_freed_memory()
    return {"keep_freed_memory": kept, "inline_cpu_dispatch": kept and inline_cpu_dispatch()}
