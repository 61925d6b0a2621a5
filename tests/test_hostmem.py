"""gptjax.hostmem: with keep_freed_memory() a freed 44 MB buffer is reused without page faults."""

import os
import platform
import subprocess
import sys

import pytest

# A child process mallocs and fills a buffer the size of the recipe shape's step buffer three
# times, freeing it in between, and prints the minor page faults of the last two rounds.
_CHILD = r"""
import ctypes, resource, sys
from gptjax.hostmem import keep_freed_memory
print(keep_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n = 44 << 20
def fill():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
fill()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
fill(); fill()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""

glibc_only = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="mallopt is glibc's")


def _child(keep: bool):
    env = dict(os.environ, GPTJAX_KEEP_FREED_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(__file__))).stdout
    applied, faults = out.split()
    return applied == "True", int(faults)


@glibc_only
def test_keep_freed_memory_reuses_a_freed_buffer_without_faults():
    applied, faults = _child(keep=True)
    assert applied
    assert faults < 200, faults  # 2 x 11,264 pages without it (below)


@glibc_only
def test_default_malloc_faults_a_large_buffer_in_again():
    # The behaviour keep_freed_memory() exists to avoid, so the test above can fail.
    applied, faults = _child(keep=False)
    assert not applied
    assert faults > 2 * (44 << 20) // 4096 // 2, faults
