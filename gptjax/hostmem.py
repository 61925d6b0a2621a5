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
its first step anyway. Training calls it (`gptjax.trainer.train_and_evaluate`, behind train.py,
and `gptjax.finetune.finetune`, behind finetune.py); set GPTJAX_KEEP_FREED_MEMORY=0 to leave
malloc alone. Decoding does not: a batch-1 GPT-2 small decode ran at 53.4 tok/s with it and
54.8 without (bench/decode.py, which therefore leaves malloc alone).

Limit: glibc's per-thread heaps hold at most 64 MB, and an allocation larger than that made by a
thread other than the main one is still mmapped whatever the options (glibc falls back to mmap
there), which is where XLA:CPU allocates a step's buffer. Bigger steps (6 x 384 at T 256 and
up) therefore still fault theirs in. Setting, before Python starts,
`GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=2147483647`
makes those faults fill 2 MiB transparent huge pages instead (6 x 384: 1.11x; measured, not
applied by gptjax, as a variable read at process start cannot be set from inside it).
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys

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
