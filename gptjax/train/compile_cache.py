"""JAX's persistent compilation cache for gptjax's entry scripts: a second run skips compiling.

A small run spends a large share of its wall time compiling (the train step, the parameter
initialisation, the evaluation and sampling functions: seconds each on a 2-core CPU); with the
cache on disk a second run of the same shapes loads the executables instead. The directory is
JAX_COMPILATION_CACHE_DIR when set (JAX's own variable), else $XDG_CACHE_HOME/gptjax/jax or
~/.cache/gptjax/jax; GPTJAX_COMPILATION_CACHE=0 turns it off. JAX keys each entry by the
computation, the compiler flags and the jax/jaxlib versions, so a stale entry is never used.
"""

from __future__ import annotations

import os

import jax

# Cache compilations that take at least this long (JAX's default of 1 s would skip the
# evaluation and finiteness-check functions, each a fraction of a second on a CPU).
MIN_COMPILE_SECONDS = 0.2


def default_directory() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "gptjax", "jax")


def enable_compilation_cache(directory: str | None = None) -> str | None:
    """Turns on JAX's persistent compilation cache; returns its directory (None when off).

    Args:
      directory: where to keep it (default: as the module docstring says).
    """
    if os.environ.get("GPTJAX_COMPILATION_CACHE", "1") == "0":
        return None
    directory = (directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                 or jax.config.jax_compilation_cache_dir or default_directory())
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:  # a read-only home: run without the cache rather than fail
        return None
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return directory
