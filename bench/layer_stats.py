"""The cost of a train step with per-layer statistics against the plain step (layer_stats_every).

  python bench/layer_stats.py                                   # the CPU shapes
  python bench/layer_stats.py --shapes gpt2_1024 --dtype bfloat16 --batch 8   # a GPU
  python bench/layer_stats.py --smoke [--json r.json]   # end to end in seconds: tiny shape

The two sides are bench/train_throughput.py's gptjax step (gptjax.train.step.make_train_step,
jitted, state donated) without and with `layer_stats=True`: the step that also returns each
layer's parameter, gradient and update norms, their ratio and its blocks' output RMS, which a
run executes every train.layer_stats_every steps. Each side runs in its own process (set up as
train.py sets up its host: gptjax.train.hostmem), the processes alternating: every round starts
the plain side, then the statistics side; each compiles, warms up and times --steps steps. The
ratio (statistics step time / plain step time) is taken per round and its median reported, with
each side's median step time, compile-and-warm-up time and the load average before and after. A
run with statistics every N steps pays (ratio - 1) / N of a step per step on average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from gptjax.train.hostmem import prepare_host_for_training  # noqa: E402
from train_throughput import SHAPES, jax_setup, model_cfg  # noqa: E402

SIDES = ("plain", "stats")
# --smoke: the defaults it replaces (explicit flags still win).
SMOKE = dict(shapes="tiny_smoke", steps=2, rounds=1, warmup=1)


def time_side(shape: str, side: str, a) -> dict:
    """One side, in this process: compile and warm up, then time `a.steps` steps."""
    cfg = model_cfg(shape, a.dtype)
    step, state, batch, rng = jax_setup(cfg, a.batch or SHAPES[shape][4],
                                        layer_stats=side == "stats")
    t = time.perf_counter()
    m = None
    for _ in range(a.warmup):
        state, m = step(state, batch, rng)
    jax.block_until_ready(m)
    warm = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(a.steps):
        state, m = step(state, batch, rng)
    jax.block_until_ready(m)
    out = dict(step_s=(time.perf_counter() - t) / a.steps, warmup_s=warm, loss=float(m["loss"]))
    if side == "stats":  # the statistics are there and finite (a broken step would not be)
        out["grad_norm_l0"] = float(m["layers"]["grad_norm"][0])
    return out


def child(shape: str, side: str, a) -> dict:
    """`time_side` in a process of its own (this script with --child)."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "side.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", side, "--shapes", shape,
               "--dtype", a.dtype, "--batch", str(a.batch), "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--json", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"layer_stats: the {side} side of {shape} failed: "
                     f"{proc.stderr.strip()[-2000:]}")
        with open(out) as fh:
            return json.load(fh)


def bench_shape(shape: str, a, log=print) -> dict:
    """Both sides of `shape` over `a.rounds` alternating rounds: one result row."""
    runs = {s: [] for s in SIDES}
    load_before = os.getloadavg()[0]
    for i in range(a.rounds):
        for side in SIDES:
            runs[side].append(child(shape, side, a))
            log(f"  {shape} round {i} {side}: {runs[side][-1]['step_s'] * 1e3:.2f} ms/step, "
                f"load {os.getloadavg()[0]:.2f}")
    ratios = [s["step_s"] / p["step_s"] for p, s in zip(runs["plain"], runs["stats"])]
    L, C, H, T, B, V = SHAPES[shape]
    return dict(shape=shape, n_layer=L, n_embd=C, seq=T, batch=a.batch or B, dtype=a.dtype,
                steps_per_round=a.steps, rounds=a.rounds, ratio=statistics.median(ratios),
                ratios=ratios, load_before=load_before, load_after=os.getloadavg()[0],
                **{f"{s}_step_s": statistics.median(r["step_s"] for r in runs[s]) for s in SIDES},
                **{f"{s}_warmup_s": statistics.median(r["warmup_s"] for r in runs[s])
                   for s in SIDES})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="nano_4x128_T64,6x384_T256",
                    help=f"comma-separated, from {list(SHAPES)}")
    ap.add_argument("--batch", type=int, default=0, help="override every shape's batch")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per side per round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (compiles)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="end to end in seconds: shape tiny_smoke, 2 steps x 1 round (shows the "
                         "script works; the numbers mean nothing); explicit flags still win")
    a = ap.parse_args(argv)
    if a.smoke:
        ap.set_defaults(**SMOKE)
        a = ap.parse_args(argv)
    shapes = a.shapes.split(",")
    for s in shapes:
        if s not in SHAPES:
            sys.exit(f"--shapes: {s!r} is not one of {list(SHAPES)}")
    if a.child:
        prepare_host_for_training()
        with open(a.json, "w") as fh:
            json.dump(time_side(shapes[0], a.child, a), fh)
        return
    dev = jax.devices()[0]
    device = f"{dev.device_kind} ({dev.platform}, {os.cpu_count()} CPUs)"
    rows = [bench_shape(s, a) for s in shapes]
    print(f"\ndevice: {device}; each side in its own process, alternating\n")
    print("| shape | batch x seq | dtype | plain ms/step | stats ms/step | stats / plain "
          "(median of rounds) | compile+warm-up plain / stats | load |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['dtype']} | "
              f"{r['plain_step_s'] * 1e3:.2f} | {r['stats_step_s'] * 1e3:.2f} | "
              f"{r['ratio']:.3f} ({min(r['ratios']):.3f}-{max(r['ratios']):.3f}) | "
              f"{r['plain_warmup_s']:.1f} s / {r['stats_warmup_s']:.1f} s | "
              f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(device=device, jax=jax.__version__, argv=sys.argv, rows=rows), fh,
                      indent=2)


if __name__ == "__main__":
    main()
