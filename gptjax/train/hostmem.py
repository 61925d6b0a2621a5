"""Host memory: keep memory that XLA:CPU frees mapped, so a step does not page-fault it back in.

XLA:CPU allocates each execution's temporary buffer (every activation of a train step: 44 MB on
nanoGPT's CPU recipe, 555 MB at 6 x 384, T 256) with malloc and frees it when the step ends.
glibc serves an allocation that large with a fresh mmap and unmaps it on free, so every step
faults its whole buffer in again, 4 KiB at a time, and the kernel zeroes each page: 12,100 minor
faults per step on the recipe shape, about a quarter of its 47 ms step on a 2-core CPU.

`keep_freed_memory()` sets two glibc malloc options (mallopt): no mmap for large allocations
(M_MMAP_MAX = 0) and no returning freed heap memory to the OS (M_TRIM_THRESHOLD at its maximum).
The buffer then comes from a malloc heap and is reused, already mapped, by the next step: the
recipe shape's faults go to 0 per step and its step from 47 to 33 ms (see BENCHMARKS.md). The
price is that the process keeps its peak heap size mapped, which a training process reaches on
its first step anyway. Training calls it (`gptjax.train.loop.train_and_evaluate`, behind train.py,
and `gptjax.finetune.loop.finetune`, behind finetune.py, through `prepare_host_for_training()`); set
GPTJAX_KEEP_FREED_MEMORY=0 to leave malloc (and dispatch, below) alone. Decoding does not: a
batch-1 GPT-2 small decode ran at 53.4 tok/s with it and 54.8 without (bench/decode.py, which
therefore leaves malloc alone).

glibc's per-thread heaps hold at most 64 MB, and an allocation larger than that made by a thread
other than the main one is still mmapped whatever the options (glibc falls back to mmap there).
JAX dispatches CPU computations asynchronously, to a worker thread, and that thread allocates a
step's buffer, so on its own `keep_freed_memory()` does not reach steps whose buffer is over
64 MB: a 6 x 384, T 256 step (555 MB) still took 153,000 minor faults. `inline_cpu_dispatch()`
sets `jax_cpu_enable_async_dispatch=False` before JAX creates its CPU client, so a computation
on one addressable CPU device (a single-device step, or each process's part of a multi-process
run, whose collectives then run on its main thread) runs on the calling thread, the main one,
whenever its inputs are ready; the main thread's heap has no 64 MB limit. With both, that step
takes 0 faults and about 1,000 -> 850 ms (either alone: no change), and GPT-2 small at T 256
5.3 -> 4.4 s (against kept memory alone). The price is that Python no longer runs ahead of a
CPU step: the next batch is made after the step, not during it (within noise on the recipe
shape, 33.7 against 34.7 ms). Computations over several devices of one process are dispatched
as before, and GPU and TPU computations are not affected (on such a run only the host's malloc
setting applies). `prepare_host_for_training()` applies both, for the rest of the process;
train.py and finetune.py call it, so train.py's sample after training runs inline too (a
batch-1 GPT-2 small decode: 53.7 tok/s inline, 53.4 asynchronous). GPTJAX_INLINE_CPU_DISPATCH=0
keeps JAX's dispatch alone.

Measured and not applied: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:...`
set before Python starts (6 x 384: 1.11x in one A/B, 0.89x in the bench), and a single malloc
arena (M_ARENA_MAX=1: no faults either, but the recipe step went 33 -> 41 ms on lock contention).
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

log = logging.getLogger("gptjax")

_M_TRIM_THRESHOLD = -1  # glibc malloc.h
_M_MMAP_MAX = -4
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
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success.
    _applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
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
    import jax
    platforms = jax.config.values.get("jax_platforms") or os.environ.get("JAX_PLATFORMS") or ""
    if platforms and "cpu" not in platforms.lower().split(","):
        return False
    try:
        from jax._src import xla_bridge
        exists = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # private API moved: set the flag, claim nothing
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
