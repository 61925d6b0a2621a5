"""Page faults and time per compiled gptjax train step under each host memory setting.

    python bench/step_faults.py --shape 6x384_T256 --host kept_inline [--steps 3] [--repeats 3]
    python bench/step_faults.py --smoke   # end to end in seconds: tiny_smoke, 2 blocks of 1 step

Runs a bench/train_throughput.py shape's compiled train step in a loop, in this process with
--host applied before JAX creates its CPU client, and prints per block of --steps steps the
minor page faults per step (`resource.getrusage`), ms per step and resident memory:
  default      glibc's malloc and JAX's asynchronous dispatch (what a bare JAX program gets);
  kept         gptjax.train.hostmem.keep_freed_memory() only;
  inline       gptjax.train.hostmem.inline_cpu_dispatch() only;
  kept_inline  gptjax.train.hostmem.prepare_host_for_training(), what train.py and finetune.py do.
The setting is fixed at process start, so compare settings in alternating runs of this script
(see BENCHMARKS.md); the first block includes warm-up allocations. Linux only (it reads
/proc/self/statm).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptjax.train import hostmem  # noqa: E402
from gptjax.cli import fail  # noqa: E402
from train_throughput import SHAPES, jax_setup, model_cfg  # noqa: E402

HOSTS = ("default", "kept", "inline", "kept_inline")
# --smoke: the defaults it replaces (explicit flags still win).
SMOKE = dict(shape="tiny_smoke", steps=1, repeats=2)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="6x384_T256")
    p.add_argument("--host", default="kept_inline", help=f"one of {list(HOSTS)}")
    p.add_argument("--steps", type=int, default=3, help="steps per printed block")
    p.add_argument("--repeats", type=int, default=3, help="printed blocks")
    p.add_argument("--smoke", action="store_true",
                   help="end to end in seconds: shape tiny_smoke, 2 blocks of 1 step (shows the "
                        "script works; the numbers mean nothing); explicit flags still win")
    a = p.parse_args(argv)
    if a.smoke:
        p.set_defaults(**SMOKE)
        a = p.parse_args(argv)
    if a.host not in HOSTS:
        fail(f"--host: {a.host!r} is not one of {list(HOSTS)}")
    if a.steps < 1 or a.repeats < 1:
        fail(f"--steps {a.steps}, --repeats {a.repeats}: both must be >= 1")
    if a.shape not in SHAPES:
        fail(f"--shape: {a.shape!r} is not one of {list(SHAPES)}")
    if a.host == "kept_inline":
        applied = hostmem.prepare_host_for_training()
    else:
        applied = {"keep_freed_memory": a.host == "kept" and hostmem.keep_freed_memory(),
                   "inline_cpu_dispatch": a.host == "inline" and hostmem.inline_cpu_dispatch()}
    cfg = model_cfg(a.shape, "float32")
    step, state, batch, rng = jax_setup(cfg, SHAPES[a.shape][4])
    compiled = step.lower(state, batch, rng).compile()
    ma = compiled.memory_analysis()
    temp = f"{ma.temp_size_in_bytes / 2 ** 20:.0f} MB" if ma is not None else "unknown"
    print(f"{a.shape}: host {a.host} (applied: {applied}); step buffer {temp}", flush=True)
    page = os.sysconf("SC_PAGE_SIZE")
    for _ in range(a.repeats):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        for _ in range(a.steps):
            state, m = compiled(state, batch, rng)
        float(m["loss"])  # waits for the last step
        dt = (time.perf_counter() - t0) / a.steps
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / a.steps
        rss = int(open("/proc/self/statm").read().split()[1]) * page / 2 ** 20
        print(f"  faults/step {faults:9,.0f}   ms/step {dt * 1e3:8.1f}   RSS {rss:6,.0f} MB",
              flush=True)


if __name__ == "__main__":
    main()
