"""Where a compiled gptjax train step spends its time, per source op, from a jax.profiler trace.

    python bench/profile_step.py --shape 6x384_T256 [--steps 2] [--out /tmp/prof]
    python bench/profile_step.py --smoke [--out /tmp/prof]   # end to end in seconds: tiny_smoke

Traces --steps train steps of a bench/train_throughput.py shape with `jax.profiler.trace`, then
reads the trace with xprof when it is installed (`pip install xprof`; only this script uses it),
else the Chrome-format trace.json.gz that jax.profiler writes beside the xplane.pb (the same op
and thread times: checked against xprof 2.24), and prints the thunks' time per step grouped by
the JAX op that produced them (from the compiled HLO's metadata, layer index dropped:
"transpose(jvp(GPT))/mlp/c_fc/.../dot_general" is the MLP up-projection's backward over all
layers), and how busy each thread was. Op times of concurrently running thunks overlap, so the
total can exceed the step. XLA_FLAGS set in the environment apply, which is how flags were
compared (see BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from gptjax.train.hostmem import prepare_host_for_training  # noqa: E402
from train_throughput import SHAPES, jax_setup, model_cfg  # noqa: E402

_WRAPPERS = ("$", "ThunkExecutor", "ThreadpoolListener", "end:", "PjitFunction", "np.",
             "Common", "SlinkyThreadPool")
# --smoke: the defaults it replaces (explicit flags still win).
SMOKE = dict(shape="tiny_smoke", steps=1, top=10)


def _read_trace(trace_dir: str) -> dict:
    """The newest trace under trace_dir as Chrome trace JSON (a dict with 'traceEvents')."""
    path = max(glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True), key=os.path.getmtime)
    try:
        from xprof.convert import raw_to_tool_data  # optional: xprof, the trace viewer's reader
    except ImportError:
        with gzip.open(path[:-len(".xplane.pb")] + ".trace.json.gz", "rt") as fh:
            return _with_regions(json.load(fh))
    data, _ = raw_to_tool_data.xspace_to_tool_data([path], "trace_viewer", {})
    return json.loads(data)


def _with_regions(trace: dict) -> dict:
    """The trace as xprof's trace viewer gives it: each thread's ThreadpoolListener Start/StopRegion
    pair becomes one ThreadpoolListener::Region event, and the listener's markers become instants
    (ph 'i'), so the per-thread busy time reads the same."""
    start, regions = {}, []
    for e in sorted((e for e in trace["traceEvents"] if e.get("ph") == "X"),
                    key=lambda e: e["ts"]):
        key = (e["pid"], e["tid"])
        if e["name"].startswith("ThreadpoolListener::"):
            e["ph"] = "i"
        if e["name"] == "ThreadpoolListener::StartRegion":
            start[key] = e["ts"]
        elif e["name"] == "ThreadpoolListener::StopRegion" and key in start:
            t0 = start.pop(key)
            regions.append(dict(ph="X", pid=key[0], tid=key[1], ts=t0, dur=e["ts"] - t0,
                                name="ThreadpoolListener::Region"))
    trace["traceEvents"] += regions
    return trace


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="6x384_T256", help=f"one of {list(SHAPES)}")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="/tmp/gptjax_profile", help="trace directory")
    p.add_argument("--smoke", action="store_true",
                   help="end to end in seconds: shape tiny_smoke, 1 traced step, top 10 ops "
                        "(shows the script works; the numbers mean nothing)")
    a = p.parse_args(argv)
    if a.smoke:
        p.set_defaults(**SMOKE)
        a = p.parse_args(argv)
    prepare_host_for_training()  # as train.py runs the step (train_throughput: --keep_freed_memory)
    if a.shape not in SHAPES:
        sys.exit(f"--shape: {a.shape!r} is not one of {list(SHAPES)}")
    cfg = model_cfg(a.shape, "float32")
    step, state, batch, rng = jax_setup(cfg, SHAPES[a.shape][4])
    compiled = step.lower(state, batch, rng).compile()
    hlo = compiled.as_text()

    def run(n):
        nonlocal state
        t = time.perf_counter()
        for _ in range(n):
            state, m = compiled(state, batch, rng)
        float(m["loss"])
        return (time.perf_counter() - t) / n

    run(2)
    print(f"{a.shape}: {run(a.steps) * 1e3:.0f} ms/step untraced; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    os.makedirs(a.out, exist_ok=True)
    with jax.profiler.trace(a.out):
        traced = run(a.steps)
    trace = _read_trace(a.out)

    # thunk name -> the JAX op that produced it (its fusion's metadata op_name)
    op_of = {m.group(1): m.group(2) for m in re.finditer(
        r"^\s*%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo, re.M)}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    by_op = collections.defaultdict(float)
    count = collections.Counter()
    for e in events:
        if e["name"].startswith(_WRAPPERS):
            continue
        op = op_of.get(e["name"], "(" + re.sub(r"\.\d+$", "", e["name"]) + ")")
        op = re.sub(r"h_\d+/", "", op.replace("jit(train_step)/", ""))
        by_op[op] += e["dur"] / 1e3 / a.steps
        count[op] += 1
    total = sum(by_op.values())
    print(f"traced: {traced * 1e3:.0f} ms/step; thunk time {total:.0f} ms/step\n")
    print(f"{'ms/step':>9} {'share':>6} {'thunks':>6}  op")
    for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:a.top]:
        print(f"{ms:9.1f} {ms / total:6.1%} {count[op] // a.steps:6d}  {op[-110:]}")
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    busy = collections.defaultdict(float)
    for e in events:
        if e["name"].startswith("ThreadpoolListener"):
            busy[threads.get((e["pid"], e["tid"]), "?")] += e["dur"] / 1e3 / a.steps
    print("\nparallel-region time per thread (ms/step): " + ", ".join(
        f"{name.split('/')[0]} {ms:.0f}" for name, ms in sorted(busy.items(), key=lambda kv: -kv[1])))


if __name__ == "__main__":
    main()
