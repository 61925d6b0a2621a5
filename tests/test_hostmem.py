"""gptjax.train.hostmem: with keep_freed_memory() a freed 44 MB buffer is reused without page faults,
and with prepare_host_for_training() so is an XLA:CPU step's buffer over glibc's 64 MB thread-heap
limit."""

import os
import platform
import subprocess
import sys

import pytest

# A child process mallocs and fills a buffer the size of the recipe shape's step buffer three
# times, freeing it in between, and prints the minor page faults of the last two rounds.
_CHILD = r"""
import ctypes, resource, sys
from gptjax.train.hostmem import keep_freed_memory
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


def _run_child(code: str, *args: str, drop=(), **env_vars) -> str:
    """stdout of `python -c code *args` run from the repository with env_vars set, drop unset."""
    env = dict(os.environ, **env_vars)
    for name in drop:
        env.pop(name, None)
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True,
                          text=True, check=True,
                          cwd=os.path.dirname(os.path.dirname(__file__))).stdout


def _child(keep: bool):
    out = _run_child(_CHILD, GPTJAX_KEEP_FREED_MEMORY="1" if keep else "0")
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


# A child process runs a jitted function whose temporary buffer (80 MB) is over glibc's 64 MB
# per-thread heap limit, and prints its temp size and the median call's minor faults after warm-up
# (a CI run on two busy workers once saw one call of four fault the whole buffer in).
_XLA_CHILD = r"""
import resource, sys
from gptjax.train import hostmem
mode = sys.argv[1]
if mode == "both":
    print(all(hostmem.prepare_host_for_training().values()))
else:
    print(hostmem.keep_freed_memory())
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.square(jax.lax.optimization_barrier(jnp.sin(x)))))
x = jnp.ones((20 << 20,), jnp.float32)
c = f.lower(x).compile()
print(c.memory_analysis().temp_size_in_bytes >> 20)
for _ in range(6):
    c(x).block_until_ready()
faults = []
for _ in range(8):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(sorted(faults)[len(faults) // 2])  # the median call: one slow call under load is not it
"""


def _xla_child(mode: str):
    # No XLA_FLAGS: one CPU device, so the step is a single-device computation.
    out = _run_child(_XLA_CHILD, mode, drop=("XLA_FLAGS",), GPTJAX_KEEP_FREED_MEMORY="1",
                     JAX_PLATFORMS="cpu")
    applied, temp_mb, faults = out.split()
    return applied == "True", int(temp_mb), int(faults)


@glibc_only
def test_inline_dispatch_reuses_a_step_buffer_over_the_thread_heap_limit():
    applied, temp_mb, faults = _xla_child("both")
    assert applied and temp_mb > 64, (applied, temp_mb)
    assert faults < 500, faults  # 20,480 pages per call without inline dispatch (below)


@glibc_only
def test_kept_memory_alone_faults_in_a_step_buffer_over_the_limit():
    # Why inline_cpu_dispatch() exists: XLA:CPU's worker thread gets a fresh mmap every call.
    applied, temp_mb, faults = _xla_child("keep")
    assert applied and temp_mb > 64, (applied, temp_mb)
    assert faults > (temp_mb << 20) // 4096 // 2, faults


def test_inline_dispatch_changes_nothing_once_jax_has_its_backend(monkeypatch):
    import jax

    from gptjax.train import hostmem
    monkeypatch.setenv("GPTJAX_KEEP_FREED_MEMORY", "1")
    monkeypatch.delenv("GPTJAX_INLINE_CPU_DISPATCH", raising=False)
    monkeypatch.setattr(hostmem, "_inlined", False)
    jax.devices()  # the backend exists from here on
    before = jax.config.values["jax_cpu_enable_async_dispatch"]
    assert hostmem.inline_cpu_dispatch() is False
    assert jax.config.values["jax_cpu_enable_async_dispatch"] == before


_OFF_CHILD = r"""
from gptjax.train import hostmem
print(hostmem.prepare_host_for_training())
import jax
print(jax.config.values["jax_cpu_enable_async_dispatch"])
"""


@pytest.mark.parametrize("var,value", [("GPTJAX_KEEP_FREED_MEMORY", "0"),
                                       ("GPTJAX_INLINE_CPU_DISPATCH", "0"),
                                       ("JAX_PLATFORMS", "tpu")])
def test_the_opt_outs_leave_dispatch_alone(var, value):
    # The child never asks JAX for a device, so JAX_PLATFORMS=tpu needs no TPU.
    env = dict(GPTJAX_KEEP_FREED_MEMORY="1", GPTJAX_INLINE_CPU_DISPATCH="1", JAX_PLATFORMS="cpu")
    env[var] = value
    out = _run_child(_OFF_CHILD, **env).splitlines()
    assert "'inline_cpu_dispatch': False" in out[0], out
    assert out[1] == "True", out  # JAX's default, asynchronous dispatch
    if var != "GPTJAX_KEEP_FREED_MEMORY" and platform.libc_ver()[0] == "glibc":
        assert "'keep_freed_memory': True" in out[0], out  # the malloc setting stays on
