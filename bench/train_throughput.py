"""Train-step throughput and MFU of gptjax next to PyTorch (transformers and a nanoGPT-style model).

  python bench/train_throughput.py                      # the three CPU shapes, every runner
  python bench/train_throughput.py --shapes gpt2_1024 --dtype bfloat16 --batch 16   # a GPU
  python bench/train_throughput.py --smoke [--json r.json]   # end to end in seconds: tiny shape

Runners (--runners), all on the same architecture (GPT-2: pre-LN, biases, tanh GELU, tied
embeddings, no dropout), AdamW(3e-4, weight decay 0.1) after global-norm clipping at 1.0, fp32
unless --dtype says otherwise (bf16 compute with fp32 master weights in gptjax, bf16 autocast in
torch):
  gptjax        gptjax.train.step.make_train_step, jitted with the state donated;
                `gptjax:IMPL` runs it with attention_impl=IMPL (xla, cudnn, pallas, auto, ...).
  hf            transformers' GPT2LMHeadModel + torch.optim.AdamW, eager.
  hf_compile    the same under torch.compile.
  nano          a minimal nanoGPT-style PyTorch GPT written below (nn.Linear, fused qkv,
                F.scaled_dot_product_attention(is_causal=True)), eager; nanoGPT's leaner model.
  nano_compile  the same under torch.compile.

Each runner runs in its own process (two thread pools in one process slow PyTorch down), and the
processes take turns: every round starts one process per runner in order, which builds and warms
up its runner and times --steps steps; a runner's time is the median of its rounds, ratios are
per round (peer time / gptjax time) and their median is reported, so load from other processes
hits both sides of a ratio alike. Each side runs as its users run it: the gptjax process as
train.py sets up its host (gptjax.train.hostmem: freed memory kept mapped, inline CPU dispatch),
the PyTorch processes with glibc's default malloc as nanoGPT's users have it
(--torch_keep_freed_memory gives them the malloc setting too). --same_process keeps the old
mode, every runner in one process, labelled as such in the output. The load average before and after is printed with the numbers.
With --torch_threads 0,1 each torch runner also runs with one intra-op thread: on a loaded
machine torch's OpenMP threads stall whenever another process holds a core, and a ratio against
that alone would flatter gptjax.

MFU is model FLOPs/s (GPTConfig.flops_per_token: 6N + 12 L d_attn T, backward included) over
the device's peak: always a measured dense-matmul peak on this device (gptjax.train.metrics), and the
datasheet peak where the device is known. Every runner shares one process and so one malloc:
by default glibc's, as a PyTorch user runs; --keep_freed_memory first calls
gptjax.train.hostmem.prepare_host_for_training(), as gptjax's training does: glibc keeps freed memory
mapped, so XLA:CPU's per-step buffer is not page-faulted in again every step (this applies to
the torch runners too), and JAX runs single-device CPU steps on the main thread, whose heap
keeps buffers over 64 MB (this one only to gptjax). Nothing here imports ml_collections or
tensorflow datasets, so it runs on a machine with only jax, flax, optax, torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptjax import GPTConfig  # noqa: E402
from gptjax.nn.model import init_params  # noqa: E402
from gptjax.train.hostmem import prepare_host_for_training  # noqa: E402
from gptjax.train.metrics import datasheet_peak, measured_peak  # noqa: E402
from gptjax.train.step import TrainState, make_train_step  # noqa: E402

# name: (n_layer, n_embd, n_head, seq_len, default batch, vocab). The two character-level
# shapes use Tiny Shakespeare's 65 symbols as nanoGPT's shakespeare_char recipes do; GPT-2 uses
# its vocabulary padded to a multiple of 128 (50304), as nanoGPT does.
SHAPES = {
    "nano_4x128_T64": (4, 128, 4, 64, 12, 65),       # nanoGPT's shakespeare_char CPU recipe
    "6x384_T256": (6, 384, 6, 256, 8, 65),          # nanoGPT's shakespeare_char GPU model
    "gpt2_T256": (12, 768, 12, 256, 4, 50304),      # GPT-2 small at a short context
    "gpt2_1024": (12, 768, 12, 1024, 8, 50304),     # GPT-2 small at its full context (GPUs)
    "tiny_smoke": (2, 64, 2, 32, 2, 128),           # --smoke, here and in device_check.sh
}
RUNNERS = ("gptjax", "hf", "hf_compile", "nano", "nano_compile")
DEFAULT_RUNNERS = RUNNERS
TORCH_DTYPES = {"float32": None, "bfloat16": "bfloat16"}
# --smoke: the defaults it replaces (explicit flags still win). Eager torch runners only:
# torch.compile alone takes minutes on a CPU.
SMOKE = dict(shapes="tiny_smoke", runners="gptjax,hf,nano", steps=1, rounds=2,
             warmup=1)


def model_cfg(name: str, dtype: str, vocab: int = 0, attention_impl: str = "xla") -> GPTConfig:
    L, C, H, T, _, V = SHAPES[name]
    return GPTConfig.preset("gpt2", n_layer=L, n_embd=C, n_head=H, n_ctx=T,
                            vocab_size=vocab or V, embd_pdrop=0.0, attn_pdrop=0.0,
                            resid_pdrop=0.0, dtype=dtype, attention_impl=attention_impl)


# ===================================================================================== gptjax
def jax_setup(cfg: GPTConfig, batch: int, layer_stats: bool = False):
    """The benchmarked gptjax train step: (jitted step, initial state, batch, rng); with
    `layer_stats`, the step that also returns per-layer statistics (bench/layer_stats.py)."""
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.1))
    params = init_params(cfg, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(cfg, tx, lambda s: 3e-4, layer_stats=layer_stats),
                   donate_argnames=("state",))
    x = jax.random.randint(jax.random.key(1), (batch, cfg.n_ctx + 1), 0, cfg.vocab_size)
    return step, state, {"inputs": x[:, :-1], "targets": x[:, 1:]}, jax.random.key(2)


def jax_runner(cfg: GPTConfig, batch: int):
    """A closure running one gptjax train step (compiled and warmed up by the caller)."""
    step, state, b, rng = jax_setup(cfg, batch)
    box = {"state": state}

    def run(n: int) -> float:
        m = None
        for _ in range(n):
            box["state"], m = step(box["state"], b, rng)
        return float(m["loss"])  # waits for the last step

    return run


# ===================================================================================== torch
def _nano_gpt(cfg: GPTConfig):
    """A minimal nanoGPT-style GPT-2 (karpathy/nanoGPT model.py, re-typed here, bias=True)."""
    import torch  # optional: torch, only for the PyTorch runners
    from torch import nn  # optional: torch
    from torch.nn import functional as F  # optional: torch

    C, H = cfg.n_embd, cfg.n_head

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, C)
            self.wpe = nn.Embedding(cfg.n_ctx, C)
            self.h = nn.ModuleList([Block() for _ in range(cfg.n_layer)])
            self.ln_f = nn.LayerNorm(C)
            for p in self.parameters():
                if p.dim() >= 2:
                    torch.nn.init.normal_(p, std=0.02)

        def forward(self, idx):
            pos = torch.arange(idx.shape[1], device=idx.device)
            x = self.wte(idx) + self.wpe(pos)
            for block in self.h:
                x = block(x)
            return F.linear(self.ln_f(x), self.wte.weight)  # tied head

    return GPT()


def torch_runner(kind: str, cfg: GPTConfig, batch: int, dtype: str):
    """A closure running one PyTorch train step of `kind` (hf / hf_compile / nano / nano_compile)."""
    import torch  # optional: torch, only for the PyTorch runners

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    if kind.startswith("hf"):
        from transformers import GPT2Config, GPT2LMHeadModel  # optional: transformers (hf runners)

        hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        model = GPT2LMHeadModel(hf).to(dev).train()

        def forward(inp):
            return model(inp).logits
    else:
        model = _nano_gpt(cfg).to(dev).train()
        forward = model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=3e-4)
    if kind.endswith("_compile"):
        forward = torch.compile(forward)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.n_ctx + 1), generator=g).to(dev)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    amp = TORCH_DTYPES[dtype] is not None

    def one():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            logits = forward(inp)
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                 tgt.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def run(n: int) -> float:
        loss = None
        for _ in range(n):
            loss = one()
        return float(loss.item())  # synchronises a GPU

    return run


# ===================================================================================== timing
def _label(kind: str, threads: int) -> str:
    return kind if threads == 0 or kind.startswith("gptjax") else f"{kind}@{threads}t"


def _check_runner(name: str) -> None:
    base, _, impl = name.partition(":")
    if base not in RUNNERS or (impl and base != "gptjax"):
        raise ValueError(f"runner {name!r}: allowed are {list(RUNNERS)} and gptjax:IMPL")


def bench_shape(name: str, *, batch: int = 0, dtype: str = "float32", runners=DEFAULT_RUNNERS,
                torch_threads=(0,), steps: int = 2, warmup: int = 2, rounds: int = 3,
                vocab: int = 0, attention_impl: str = "xla", peak_measured: float = 0.0,
                peak_datasheet=None, log=print) -> dict:
    """Times every runner on one shape in alternating rounds; returns one result row (a dict).

    A runner that fails to build or compile (e.g. torch.compile without a C++ compiler, an
    attention kernel this device lacks) is reported under `skipped` with its one-line reason.
    """
    import torch  # optional: torch, for the PyTorch runners and their thread count

    cfg = model_cfg(name, dtype, vocab, attention_impl)
    batch = batch or SHAPES[name][4]
    tokens = batch * cfg.n_ctx
    fpt = cfg.flops_per_token(cfg.n_ctx)
    default_threads = torch.get_num_threads()
    plan, skipped = [], {}
    for kind in runners:
        _check_runner(kind)
        for th in ((0,) if kind.startswith("gptjax") else torch_threads):
            label = _label(kind, th)
            try:
                if th:
                    torch.set_num_threads(th)
                if kind.startswith("gptjax"):
                    impl = kind.partition(":")[2] or attention_impl
                    fn = jax_runner(model_cfg(name, dtype, vocab, impl), batch)
                else:
                    fn = torch_runner(kind, cfg, batch, dtype)
                t = time.perf_counter()
                loss = fn(warmup)  # compiles
                log(f"  {name} {label}: warmup {time.perf_counter() - t:.1f}s, loss {loss:.3f}")
                plan.append((label, th, fn))
            except Exception as e:  # noqa: BLE001 - a runner that cannot run is reported
                skipped[label] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log(f"  {name} {label}: skipped ({skipped[label]})")
            finally:
                torch.set_num_threads(default_threads)
    times = {label: [] for label, _, _ in plan}
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    for _ in range(rounds):
        for label, th, fn in plan:
            if th:
                torch.set_num_threads(th)
            t = time.perf_counter()
            fn(steps)
            times[label].append((time.perf_counter() - t) / steps)
            torch.set_num_threads(default_threads)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    shortest = min(min(ts) * steps for ts in times.values())
    if shortest < 0.5:
        log(f"  warning: a round took {shortest:.2f} s; rounds under 0.5 s are noisy on a shared "
            f"CPU, raise --steps (now {steps}) for shape {name}")
    row = dict(shape=name, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
               seq=cfg.n_ctx, vocab=cfg.vocab_size, batch=batch, dtype=dtype,
               attention_impl=attention_impl, flops_per_token=fpt, steps_per_round=steps,
               rounds=rounds, load_before=load_before, load_after=load_after,
               runners={}, skipped=skipped)
    for label, ts in times.items():
        t = statistics.median(ts)
        r = dict(step_s=t, step_s_rounds=ts, tok_s=tokens / t,
                 mfu_measured=tokens / t * fpt / peak_measured if peak_measured else None,
                 mfu_datasheet=tokens / t * fpt / peak_datasheet if peak_datasheet else None)
        ref = next((k for k in times if k.startswith("gptjax")), None)
        if ref is not None and not label.startswith("gptjax"):
            # > 1 means gptjax (the first gptjax runner) is faster than this peer.
            r["gptjax_speedup"] = statistics.median(p / j for p, j in zip(ts, times[ref]))
        row["runners"][label] = r
    return row


def _child_row(name: str, kind: str, threads: int, a, keep: bool) -> dict:
    """One round of one runner, timed in a process of its own (this script with --child)."""
    import subprocess  # optional: only the isolated mode starts processes
    import tempfile  # optional: only the isolated mode starts processes

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--shapes", name,
               "--runners", kind, "--torch_threads", str(threads), "--rounds", "1",
               "--steps", str(a.steps), "--warmup", str(a.warmup), "--dtype", a.dtype,
               "--batch", str(a.batch), "--vocab", str(a.vocab), "--attention_impl",
               a.attention_impl, "--json", out] + (["--keep_freed_memory"] if keep else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            return {"skipped": {_label(kind, threads): (proc.stderr.strip().splitlines()
                                                       or ["failed"])[-1][:200]}}
        with open(out) as fh:
            return json.load(fh)["rows"][0]


def bench_shape_isolated(name: str, a, runners, threads, peak_measured: float,
                         peak_datasheet, log=print) -> dict:
    """bench_shape's row, each runner timed in its own process, the processes alternating."""
    plan = [(k, th) for k in runners for th in ((0,) if k.startswith("gptjax") else threads)]
    times, skipped, row = {}, {}, None
    load_before = os.getloadavg()[0]
    for i in range(a.rounds):
        for kind, th in plan:
            keep = kind.startswith("gptjax") or a.torch_keep_freed_memory
            r = _child_row(name, kind, th, a, keep)
            label = _label(kind, th)
            if label in r.get("skipped", {}):
                skipped[label] = r["skipped"][label]
                continue
            row = row or r
            times.setdefault(label, []).append(r["runners"][label]["step_s"])
            log(f"  {name} round {i} {label}: {r['runners'][label]['step_s'] * 1e3:.1f} ms/step, "
                f"load {os.getloadavg()[0]:.2f}")
    if row is None:
        raise RuntimeError(f"no runner ran on {name}: {skipped}")
    tokens = row["batch"] * row["seq"]
    row.update(rounds=a.rounds, load_before=load_before, load_after=os.getloadavg()[0],
               runners={}, skipped=skipped, isolation="own process per runner, alternating")
    ref = next((k for k in times if k.startswith("gptjax")), None)
    for label, ts in times.items():
        t = statistics.median(ts)
        x = dict(step_s=t, step_s_rounds=ts, tok_s=tokens / t,
                 mfu_measured=tokens / t * row["flops_per_token"] / peak_measured
                 if peak_measured else None,
                 mfu_datasheet=tokens / t * row["flops_per_token"] / peak_datasheet
                 if peak_datasheet else None)
        if ref is not None and not label.startswith("gptjax") and len(ts) == len(times[ref]):
            x["gptjax_speedup"] = statistics.median(p / j for p, j in zip(ts, times[ref]))
        row["runners"][label] = x
    return row


def markdown(rows, peak_measured, peak_datasheet, device) -> str:
    """A markdown table: one line per shape and runner."""
    out = [f"device: {device}; measured matmul peak {peak_measured / 1e9:,.1f} GFLOP/s; "
           f"datasheet peak "
           f"{'n/a' if not peak_datasheet else f'{peak_datasheet / 1e12:.0f} TFLOP/s'}", "",
           "| shape | batch x seq | dtype | runner | tok/s | MFU (measured peak) | "
           "MFU (datasheet) | gptjax speedup | load |",
           "|---|---|---|---|---|---|---|---|---|"]
    out[0] += f"; {rows[0].get('isolation', '')}" if rows else ""
    for r in rows:
        load = f"{r['load_before']:.1f}-{r['load_after']:.1f}" if r["load_before"] is not None \
            else "n/a"
        for label, x in r["runners"].items():
            mm = f"{100 * x['mfu_measured']:.1f}%" if x["mfu_measured"] else "n/a"
            md = f"{100 * x['mfu_datasheet']:.1f}%" if x["mfu_datasheet"] else "n/a"
            sp = f"{x['gptjax_speedup']:.2f}x" if "gptjax_speedup" in x else "-"
            out.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['dtype']} | {label} | "
                       f"{x['tok_s']:,.0f} | {mm} | {md} | {sp} | {load} |")
        for label, why in r["skipped"].items():
            out.append(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['dtype']} | {label} | "
                       f"skipped: {why} | | | | |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="nano_4x128_T64,6x384_T256,gpt2_T256",
                    help=f"comma-separated, from {list(SHAPES)}")
    ap.add_argument("--batch", type=int, default=0, help="override every shape's batch")
    ap.add_argument("--vocab", type=int, default=0, help="override every shape's vocabulary")
    ap.add_argument("--dtype", default="float32", choices=sorted(TORCH_DTYPES))
    ap.add_argument("--runners", default=",".join(RUNNERS), help=f"subset of {list(RUNNERS)}")
    ap.add_argument("--torch_threads", default="0",
                    help="comma-separated torch intra-op thread counts per torch runner "
                         "(0 = torch's default)")
    ap.add_argument("--attention_impl", default="xla")
    ap.add_argument("--steps", type=int, default=2, help="steps per runner per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--keep_freed_memory", action="store_true",
                    help="call gptjax.train.hostmem.prepare_host_for_training() first, as gptjax's "
                         "training does (its malloc setting applies to every runner in the "
                         "process, its inline CPU dispatch to gptjax's)")
    ap.add_argument("--same_process", action="store_true",
                    help="every runner in this one process (the old mode; torch runs slower "
                         "next to JAX's thread pool, so its ratios flatter gptjax)")
    ap.add_argument("--torch_keep_freed_memory", action="store_true",
                    help="isolated mode: the PyTorch processes keep freed memory mapped too")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--smoke", action="store_true",
                    help="end to end in seconds: shape tiny_smoke, runners gptjax,hf,"
                         "nano, 1 step x 2 rounds after 1 warm-up step (shows the script works; "
                         "the numbers mean nothing); explicit flags still win")
    a = ap.parse_args(argv)
    if a.smoke:
        ap.set_defaults(**SMOKE)
        a = ap.parse_args(argv)
    host = (prepare_host_for_training() if a.keep_freed_memory else
            {"keep_freed_memory": False, "inline_cpu_dispatch": False})
    kept = host["keep_freed_memory"]
    shapes = a.shapes.split(",")
    runners = a.runners.split(",")
    for s in shapes:
        if s not in SHAPES:
            sys.exit(f"--shapes: {s!r} is not one of {list(SHAPES)}")
    for r in runners:
        try:
            _check_runner(r)
        except ValueError as e:
            sys.exit(f"--runners: {e}")
    threads = tuple(int(t) for t in a.torch_threads.split(","))
    peak_meas = 0.0 if a.child else measured_peak(a.dtype)  # the parent reports MFU
    peak_ds = datasheet_peak()
    dev = jax.devices()[0]
    device = f"{dev.device_kind} ({dev.platform}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()})"
    rows = []
    in_process = a.same_process or a.child
    for name in shapes:
        if in_process:
            row = bench_shape(name, batch=a.batch, dtype=a.dtype, runners=runners,
                              torch_threads=threads, steps=a.steps, warmup=a.warmup,
                              rounds=a.rounds, vocab=a.vocab, attention_impl=a.attention_impl,
                              peak_measured=peak_meas, peak_datasheet=peak_ds)
            row["isolation"] = "one process, every runner (--same_process)"
        else:
            row = bench_shape_isolated(name, a, runners, threads, peak_meas, peak_ds)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(markdown(rows, peak_meas, peak_ds, device))
    if not in_process:
        malloc = ("freed memory kept mapped (gptjax.train.hostmem) in every process"
                  if a.torch_keep_freed_memory else "gptjax's process as train.py sets it up "
                  "(gptjax.train.hostmem); the PyTorch processes with glibc's default")
    elif kept:
        malloc = "freed memory kept mapped (gptjax.train.hostmem), every runner in this process"
    else:
        malloc = "glibc default, every runner in this process"
    dispatch = ("inline, on the main thread" if host["inline_cpu_dispatch"] or not in_process
                else "asynchronous (JAX default)")
    print(f"\nhost malloc: {malloc}; gptjax's CPU dispatch: {dispatch}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(device=device, peak_measured=peak_meas, peak_datasheet=peak_ds,
                           argv=sys.argv, keep_freed_memory=kept,
                           inline_cpu_dispatch=host["inline_cpu_dispatch"], jax=jax.__version__,
                           rows=rows), fh, indent=2)


if __name__ == "__main__":
    main()
