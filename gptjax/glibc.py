"""glibc's malloc options (`mallopt`), for the host memory settings of training processes
(gptjax.train.hostmem) and data workers (gptjax.data.sharded)."""

from __future__ import annotations

import ctypes
import platform
import sys

# From glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8


def mallopt(option: int, value: int) -> bool:
    """Sets one glibc malloc option for this process; whether it took effect (False off
    Linux/glibc, where there is no such call)."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    fn.argtypes, fn.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return fn(option, value) == 1  # mallopt returns 1 on success
