"""Attention implementations: time, memory and agreement with the XLA reference.

  python bench/attention.py                              # T in 1k..8k, every impl this platform has
  python bench/attention.py --seq 1024 2048 --batch 4 --heads 12 --dtype bfloat16 --out a.json
  python bench/attention.py --check [--out check.json]   # outputs+grads of every impl vs xla;
                                                         # exits 1 on a mismatch
  python bench/attention.py --smoke [--out a.json]       # end to end in seconds: T=128,256, tiny
                                                         # heads, one timed call per row

Rows are (implementation, layer kind, T): forward and forward+backward milliseconds (median of
--reps after one warm-up call) and the peak temporary memory XLA's buffer assignment gives the
compiled function (`compiled.memory_analysis().temp_size_in_bytes`: same number on every
platform, and per function rather than the process-wide high-water mark). 'dense' is causal
attention, 'local' the banded layer of width --window. 'xla' takes the blocked banded path on
local layers when T > 2 * window; 'xla_masked' always builds the T x T mask (the reference), so
the two local rows show linear against quadratic growth. Pallas and splash run in interpret mode
off their hardware; their CPU times measure the interpreter, not the kernel, and are only run when
named in --impls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptjax.nn import attention as A  # noqa: E402

# --smoke: the timing run's defaults it replaces (explicit flags still win; --check keeps its own
# fixed cases). Two lengths, so the growth lines print; both > 2 * window, so 'xla' takes the
# blocked banded path on local layers.
SMOKE = dict(seq=[128, 256], batch=1, heads=2, head_dim=16, window=32, reps=1)


def _impl_fn(impl, window, q_pos=None, k_pos=None):
    """f(q, k, v) for one implementation and layer kind."""
    if impl == "xla_masked":
        def f(q, k, v):
            pos = A.default_positions(q.shape[0], q.shape[1]) if q_pos is None else q_pos
            kp = pos if k_pos is None else k_pos
            return A.xla_attention(q, k, v, A.attention_mask(pos, kp, window))
        return f
    if impl == "splash" and jax.default_backend() != "tpu":
        # attention() refuses splash off-TPU; the kernel itself runs in Pallas interpret mode.
        return lambda q, k, v: A.splash_attention(q, k, v, window=window, block=128,
                                                  interpret=True)
    return lambda q, k, v: A.attention(q, k, v, q_pos, k_pos, window=window, impl=impl)


def available_impls(dtype) -> dict:
    """impl -> None if it runs natively here, else the reason it does not (interpret/unavailable)."""
    platform = jax.default_backend()
    out = {"xla": None, "xla_masked": None}
    out["pallas"] = None if platform == "gpu" else f"interpret mode on {platform}"
    out["splash"] = None if platform == "tpu" else f"interpret mode on {platform}"
    if platform != "gpu":
        out["cudnn"] = f"unavailable: needs an NVIDIA GPU (platform {platform})"
    elif jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        out["cudnn"] = "unavailable: needs bfloat16/float16"
    else:
        out["cudnn"] = None
    return out


def _inputs(B, T, H, D, dtype, seed=0, S=None):
    ks = jax.random.split(jax.random.key(seed), 4)
    S = T if S is None else S
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, H, D), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, H, D), jnp.float32).astype(dtype)
    ct = jax.random.normal(ks[3], (B, T, H, D), jnp.float32).astype(dtype)
    return q, k, v, ct


def _fwd_bwd(f):
    def g(q, k, v, ct):
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(ct)
    return g


def _time(compiled, args, reps):
    jax.block_until_ready(compiled(*args))  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def bench(args) -> list:
    dtype = jnp.dtype(args.dtype)
    avail = available_impls(dtype)
    impls = args.impls or [i for i, why in avail.items() if why is None]
    rows = []
    for T in args.seq:
        q, k, v, ct = _inputs(args.batch, T, args.heads, args.head_dim, dtype)
        for kind in args.kinds:
            window = args.window if kind == "local" else None
            for impl in impls:
                if impl == "xla_masked" and kind == "dense":
                    continue  # identical to 'xla' on dense layers
                row = dict(impl=impl, kind=kind, T=T, batch=args.batch, heads=args.heads,
                           head_dim=args.head_dim, dtype=dtype.name, window=window,
                           platform=jax.default_backend(), note=avail.get(impl))
                f = _impl_fn(impl, window)
                try:
                    for name, fn, a in (("fwd", f, (q, k, v)), ("fwd_bwd", _fwd_bwd(f), (q, k, v, ct))):
                        c = jax.jit(fn).lower(*a).compile()
                        mem = c.memory_analysis()
                        temp = None if mem is None else int(mem.temp_size_in_bytes)
                        row[f"{name}_temp_mib"] = None if temp is None else round(temp / 2**20, 1)
                        if temp is not None and temp > args.max_gib * 2**30:
                            row[f"{name}_ms"] = None
                            row["skipped"] = f"needs {temp / 2**30:.1f} GiB > --max_gib"
                            continue
                        row[f"{name}_ms"] = round(_time(c, a, args.reps), 3)
                except Exception as e:  # noqa: BLE001 -- a row that fails is reported, not fatal
                    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(row)
                print(_fmt(row), flush=True)
    _print_growth(rows)
    return rows


def _fmt(r):
    def ms(x):
        return "      -" if x is None else f"{x:9.2f}"
    extra = r.get("error") or r.get("skipped") or r.get("note") or ""
    return (f"{r['impl']:11s} {r['kind']:6s} T={r['T']:6d}  fwd {ms(r.get('fwd_ms'))} ms "
            f"({r.get('fwd_temp_mib')} MiB)  fwd+bwd {ms(r.get('fwd_bwd_ms'))} ms "
            f"({r.get('fwd_bwd_temp_mib')} MiB)  {extra}")


def _print_growth(rows):
    """Time at each T over time at the smallest T, next to T's own ratio (linear = equal)."""
    keys = sorted({(r["impl"], r["kind"]) for r in rows})
    print("\ngrowth over the smallest T (linear in T: the ratio equals T/T0; quadratic: (T/T0)^2)")
    for impl, kind in keys:
        rs = sorted((r for r in rows if (r["impl"], r["kind"]) == (impl, kind)
                     and r.get("fwd_bwd_ms")), key=lambda r: r["T"])
        if len(rs) < 2:
            continue
        t0, b0 = rs[0]["T"], rs[0]["fwd_bwd_ms"]
        parts = [f"T/T0={r['T'] / t0:g}: x{r['fwd_bwd_ms'] / b0:.2f}" for r in rs[1:]]
        print(f"  {impl:11s} {kind:6s} fwd+bwd  " + "  ".join(parts))


# ---------------------------------------------------------------------------- --check
def _check_case(impl, window, dtype, B, T, H, D, q_pos=None, k_pos=None, S=None, grads=True):
    """Max abs difference of impl vs the masked reference (outputs and grads), and the tolerance.

    The reference runs in fp32 on the same (dtype-rounded) inputs, so a bf16 kernel is judged
    against the exact answer to its own inputs.
    """
    q, k, v, ct = _inputs(B, T, H, D, dtype, seed=T + (window or 0), S=S)
    f = _impl_fn(impl, window, q_pos, k_pos)
    ref = _impl_fn("xla_masked", window, q_pos, k_pos)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
    valid = 1.0 if q_pos is None else (q_pos >= 0)[:, :, None, None].astype(jnp.float32)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    out = (jax.jit(f)(q, k, v).astype(jnp.float32) - jax.jit(ref)(*f32[:3])) * valid
    scale = float(jnp.max(jnp.abs(jax.jit(ref)(*f32[:3]))))
    errs = {"out": float(jnp.max(jnp.abs(out)))}
    if grads:
        def loss(fn, ct):
            return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * ct * valid)
        g = jax.jit(jax.grad(loss(f, f32[3]), (0, 1, 2)))(q, k, v)
        gr = jax.jit(jax.grad(loss(ref, f32[3]), (0, 1, 2)))(*f32[:3])
        for name, a, b in zip(("dq", "dk", "dv"), g, gr):
            scale = max(scale, float(jnp.max(jnp.abs(b))))
            errs[name] = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)))
    worst = max(errs.values())
    return dict(errs, tol=tol * max(1.0, scale), ok=bool(worst <= tol * max(1.0, scale)))


def check(args) -> list:
    """Every implementation this platform runs (natively or interpreted) against the reference."""
    jax.config.update("jax_default_matmul_precision", "highest")
    platform = jax.default_backend()
    B, H, D, w = 2, 4, 64, 32
    cases = []
    for kind, window in (("dense", None), ("local", w)):
        for T in (256, 200):  # a whole number of tiles, and not
            cases.append(("xla", kind, window, "float32", T, {}))
            cases.append(("pallas", kind, window, "float32", T, {}))
            if platform == "gpu":
                cases.append(("pallas", kind, window, "bfloat16", T, {}))
                cases.append(("cudnn", kind, window, "bfloat16", T, {}))
                cases.append(("auto", kind, window, "bfloat16", T, {}))
            if T == 256 or platform == "tpu":  # splash interpreted is slow: one length off-TPU
                cases.append(("splash", kind, window, "float32", T, {}))
        # Ragged prompts (rows left-padded by 0 and 37) and one decode step against a cache.
        t = np.arange(192)
        pos = jnp.asarray(np.stack([t, np.where(t < 37, -1, t - 37)]), jnp.int32)
        cases.append(("pallas", kind, window, "float32", 192, dict(q_pos=pos, k_pos=pos)))
        cases.append(("pallas", kind, window, "float32", 1,
                      dict(q_pos=pos[:, -1:], k_pos=pos, S=192, grads=False)))
    rows = []
    for impl, kind, window, dt, T, extra in cases:
        row = dict(impl=impl, kind=kind, T=T, dtype=dt, platform=platform,
                   case="decode" if T == 1 else ("ragged" if extra else "plain"))
        if impl == "splash" and platform != "tpu":
            row["note"] = "interpret mode"
        if impl == "pallas" and platform != "gpu":
            row["note"] = "interpret mode"
        try:
            row.update(_check_case(impl, window, jnp.dtype(dt), B, T, H, D, **extra))
        except Exception as e:  # noqa: BLE001 -- a failing impl is a failed check, not a crash
            row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        rows.append(row)
        errs = " ".join(f"{n}={row[n]:.1e}" for n in ("out", "dq", "dk", "dv") if n in row)
        print(f"{'ok  ' if row['ok'] else 'FAIL'} {impl:7s} {kind:6s} {row['case']:6s} T={T:4d} "
              f"{dt:9s} {errs} tol={row.get('tol', 0):.1e} {row.get('error', row.get('note', ''))}",
              flush=True)
    for impl, why in available_impls(jnp.bfloat16).items():
        if why and why.startswith("unavailable"):
            print(f"skip {impl:7s} {why}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="compare every impl with xla; exit 1 on a mismatch")
    p.add_argument("--seq", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_dim", type=int, default=64)
    p.add_argument("--window", type=int, default=256, help="band of local layers (GPT-3 preset: 256)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--kinds", nargs="+", default=["dense", "local"], choices=["dense", "local"])
    p.add_argument("--impls", nargs="+", default=None,
                   choices=["xla", "xla_masked", "cudnn", "pallas", "splash", "auto"],
                   help="default: those that run natively on this platform")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--max_gib", type=float, default=8.0,
                   help="skip a row whose compiled temporaries exceed this")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="end to end in seconds: T=128,256, 2 heads of 16, window 32, one timed "
                        "call per row (shows the script works; the numbers mean nothing)")
    args = p.parse_args(argv)
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args(argv)
    for name in ("batch", "heads", "head_dim", "window", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name}={getattr(args, name)}: must be a positive integer")
    if any(t < 1 for t in args.seq):
        p.error(f"--seq={args.seq}: lengths must be positive")
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    rows = check(args) if args.check else bench(args)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"mode": "check" if args.check else "bench", "device": jax.devices()[0].device_kind,
                       "platform": jax.default_backend(), "jax": jax.__version__, "rows": rows}, f,
                      indent=1)
    if args.check and not all(r["ok"] for r in rows):
        bad = [f"{r['impl']}/{r['kind']}/{r['case']}/T={r['T']}/{r['dtype']}" for r in rows if not r["ok"]]
        print(f"MISMATCH: {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
