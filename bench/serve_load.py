"""Load test of the completions server under a fixed mixed workload, against static batching.

  python bench/serve_load.py                 # random-init 6 x 384 GPT-2-shaped model, n_ctx 1024
  python bench/serve_load.py --servers continuous,static --duration 60 --requests 96
  python bench/serve_load.py --smoke         # end to end in about a minute (not the speed)

Workload (seeded, so runs compare): in every 8 requests, 7 ask for 8-32 tokens and 1 for 256-512;
prompts are 4-32 random token ids; half the requests stream; temperature 0.8, a seed each.
Each server runs in its own process (`--serve KIND`), the clients (httpx, asyncio) in this one:
  (b) throughput: closed loop, 16 clients, tokens received per second over `--duration`;
  (a) latency: open-loop Poisson arrivals at 70% of the static server's phase-(b) throughput
      (in requests/s for this workload), reporting end-to-end latency, time to first token and
      time per output token (streamed requests) p50/p95/p99 for short and long requests; then
      the same arrival times with the long requests left out ("no long" baseline).
Servers: `continuous` (the gptjax server: 8 decode slots, a paged KV cache), `static` (a
baseline kept here, not in the product: requests arriving within 50 ms, up to 8, decoded as one
wave by `sampling.generate` with the batch padded to 8 rows and max_tokens rounded up to a power
of two, so its few shapes compile at warm-up; streamed answers come in one chunk at the end) and
`hf`, a minimal transformers server (one request at a time, the same weights; phase b only).
Prints one line per (server, phase, size), the warm-up compilations, and, with --json, writes
every number.
"""

import argparse
import asyncio
import json
import os
import pathlib
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHORT, LONG = (8, 32), (256, 512)


# ---------------------------------------------------------------------------- workload
def workload(n: int, seed: int, vocab: int, short=SHORT, long=LONG) -> list:
    """n requests: in each block of 8 one long one at a random place, half of all streaming."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 8 == 0:
            long_at = i + rng.randrange(8)
        is_long = i == long_at
        lo, hi = long if is_long else short
        out.append({"prompt": [rng.randrange(vocab) for _ in range(rng.randint(4, 32))],
                    "max_tokens": rng.randint(lo, hi), "stream": rng.random() < 0.5,
                    "seed": i, "size": "long" if is_long else "short"})
    return out


async def _send(client, req, log, stop_at=None) -> None:
    """One request; appends {size, stream, ok, e2e, ttft, tpot, tokens} to log. Streamed tokens
    count as they arrive (before `stop_at`, for the throughput phase)."""
    body = {"prompt": req["prompt"], "max_tokens": req["max_tokens"], "temperature": 0.8,
            "seed": req["seed"], "stream": req["stream"]}
    rec = {"size": req["size"], "stream": req["stream"], "ok": False, "tokens": 0,
           "ttft": None, "tpot": None}
    log.append(rec)
    t0 = time.perf_counter()
    try:
        if req["stream"]:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and (stop_at is None
                                                       or time.perf_counter() < stop_at):
                        text = json.loads(line[6:])["choices"][0]["text"]
                        if text and rec["ttft"] is None:
                            rec["ttft"] = time.perf_counter() - t0
                        rec["tokens"] += len(text)  # a character vocabulary: one token each
                rec["ok"] = r.status_code == 200
        else:
            r = await client.post("/v1/completions", json=body)
            rec["ok"] = r.status_code == 200
            if rec["ok"] and (stop_at is None or time.perf_counter() < stop_at):
                rec["tokens"] = r.json()["usage"]["completion_tokens"]
    except Exception as e:  # counted, not raised: the run must finish
        rec["error"] = f"{type(e).__name__}: {e}"[:200]
    rec["e2e"] = time.perf_counter() - t0
    if rec["ttft"] is not None and rec["tokens"] > 1:
        rec["tpot"] = (rec["e2e"] - rec["ttft"]) / (rec["tokens"] - 1)


async def closed_loop(url, reqs, clients: int, duration: float) -> dict:
    import httpx  # optional: httpx (test extras), only in the client process

    log, it = [], iter(reqs * 100)
    stop_at = time.perf_counter() + duration
    async with httpx.AsyncClient(base_url=url, timeout=600.0,
                                 limits=httpx.Limits(max_connections=clients + 4)) as c:
        async def worker():
            while time.perf_counter() < stop_at:
                await _send(c, next(it), log, stop_at)
        tasks = [asyncio.ensure_future(worker()) for _ in range(clients)]
        await asyncio.sleep(duration)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    done = [r for r in log if "e2e" in r]
    return {"tok_s": sum(r["tokens"] for r in log) / duration, "requests": len(done),
            "failed": sum(not r["ok"] for r in done)}


async def open_loop(url, reqs, at: list) -> list:
    """Send reqs[i] at at[i] seconds from now, whatever is still running (open loop)."""
    import httpx  # optional: httpx (test extras), only in the client process

    log = []
    async with httpx.AsyncClient(base_url=url, timeout=600.0,
                                 limits=httpx.Limits(max_connections=len(reqs) + 4)) as c:
        t0 = time.perf_counter()

        async def fire(req, when):
            await asyncio.sleep(max(0.0, t0 + when - time.perf_counter()))
            await _send(c, req, log)
        await asyncio.gather(*(fire(r, w) for r, w in zip(reqs, at)))
    return log


def arrivals(reqs, rate, seed) -> list:
    """Poisson arrival times of the full workload (the baseline keeps the short ones' times)."""
    rng, t, out = random.Random(seed), 0.0, []
    for _ in reqs:
        t += rng.expovariate(rate)
        out.append(t)
    return out


def summarize(log) -> dict:
    def pct(xs, q):
        xs = sorted(x for x in xs if x is not None)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")
    out = {}
    for size in ("short", "long"):
        rs = [r for r in log if r["size"] == size]
        if rs:
            out[size] = {"n": len(rs), "failed": sum(not r["ok"] for r in rs), **{
                f"{m}_p{q}": pct([r[m] for r in rs], q / 100)
                for m in ("e2e", "ttft", "tpot") for q in (50, 95, 99)}}
    return out


# ---------------------------------------------------------------------------- server processes
def _model(args):
    import jax  # heavy: only in a server process

    from gptjax import GPTConfig, init_params
    from gptjax.data.tokenizers import CharTokenizer

    chars = [chr(c) for c in range(33, 33 + args.vocab)]
    cfg = GPTConfig.preset("tiny", vocab_size=len(chars), n_ctx=args.n_ctx, n_layer=args.n_layer,
                           n_head=max(1, args.n_embd // 64), n_embd=args.n_embd)
    return cfg, init_params(cfg, jax.random.key(0)), CharTokenizer(chars)


def _answer(body, text):
    """A whole completion as the baselines answer it: JSON, or one streamed chunk."""
    from fastapi.responses import StreamingResponse  # heavy: only in a server process

    if body.get("stream"):
        chunk = json.dumps({"choices": [{"text": text, "index": 0}]})
        return StreamingResponse(iter([f"data: {chunk}\n\n", "data: [DONE]\n\n"]))
    return {"choices": [{"text": text}], "usage": {"completion_tokens": len(text)}}


def _hf_app(cfg, params, tok):
    import torch  # heavy: the transformers server only
    from fastapi import FastAPI, Request
    from transformers import GPT2LMHeadModel

    from gptjax.nn.convert import to_hf

    torch.set_num_threads(os.cpu_count())
    model = GPT2LMHeadModel.from_pretrained(to_hf(cfg, params, tempfile.mkdtemp())).eval()
    lock, app = threading.Lock(), FastAPI()

    def run(b):
        with lock, torch.no_grad():
            torch.manual_seed(b.get("seed", 0))
            ids = torch.tensor([b["prompt"]])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=b.get("temperature", 1.0), top_k=0,
                                 max_new_tokens=b["max_tokens"], min_new_tokens=b["max_tokens"],
                                 pad_token_id=0)
        return tok.decode(out[0, ids.shape[1]:].tolist())

    @app.post("/v1/completions")
    async def completions(request: Request):
        b = await request.json()
        text = await asyncio.to_thread(run, b)
        return _answer(b, text)

    @app.get("/health")
    async def health():
        return {"status": "ok"}
    return app


def _static_app(cfg, params, tok, args):
    """The static-batching baseline: waves of up to 8 requests through `sampling.generate`."""
    import jax  # heavy: only in a server process
    import numpy as np
    from fastapi import FastAPI, Request

    from gptjax.inference import sampling, serving

    serving.start_compile_counter()
    params = sampling.prepare_for_decoding(cfg, params)
    rows, cv, waiting, app = 8, threading.Condition(), [], FastAPI()

    def wave(prompts, max_tokens):
        budget = max(16, 1 << (max(max_tokens) - 1).bit_length())
        padded = prompts + [prompts[0]] * (rows - len(prompts))
        out = sampling.generate(cfg, params, padded, max_new_tokens=budget, temperature=0.8,
                                rng=jax.random.key(len(waiting)), prompt_bucket=32)
        return [np.asarray(out.tokens[i][:m]).tolist() for i, m in enumerate(max_tokens)]

    def loop():
        while True:
            with cv:
                while not waiting:
                    cv.wait()
                cv.wait(timeout=0.05)
                batch = [waiting.pop(0) for _ in range(min(rows, len(waiting)))]
            for (b, fut, lp), ids in zip(batch, wave([b["prompt"] for b, _, _ in batch],
                                                     [b["max_tokens"] for b, _, _ in batch])):
                lp.call_soon_threadsafe(fut.set_result, tok.decode(ids))

    for budget in (16, 32, 64, 128, 256, 512):  # warm-up: every shape a request reaches
        if budget <= max(args.sizes[1]) * 2:
            wave([[1] * 4], [budget])
    compiles_at_start = serving.compilations()
    threading.Thread(target=loop, daemon=True).start()

    @app.post("/v1/completions")
    async def completions(request: Request):
        b = await request.json()
        fut = asyncio.get_running_loop().create_future()
        with cv:
            waiting.append((b, fut, asyncio.get_running_loop()))
            cv.notify()
        text = await fut
        return _answer(b, text)

    @app.get("/health")
    async def health():
        return {"status": "ok",
                "compilations_after_warmup": serving.compilations() - compiles_at_start}
    return app


def serve_main(args) -> None:
    import uvicorn  # heavy: only in a server process

    from gptjax.inference import serving

    cfg, params, tok = _model(args)
    if args.serve == "hf":
        app = _hf_app(cfg, params, tok)
    elif args.serve == "static":
        app = _static_app(cfg, params, tok, args)
    else:
        app, _, _ = serving.build_server(
            cfg, params, tok, slots=args.slots, page_size=args.page_size,
            prompt_buckets=tuple(int(x) for x in args.prompt_buckets.split(",")),
            max_queue=1024, request_timeout_s=3600.0, model_name="bench",
            log=lambda *a: print(*a, file=sys.stderr, flush=True))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def _spawn(kind, args):
    """Start a server process; returns (process, url) once /health answers."""
    import httpx  # optional: httpx (test extras)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = [f"--{k}={getattr(args, k)}" for k in ("n_layer", "n_embd", "n_ctx", "vocab", "slots",
                                                   "page_size", "prompt_buckets")]
    flags += ["--smoke"] if args.smoke else []
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, f"--port={port}", *flags],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url, t0 = f"http://127.0.0.1:{port}", time.perf_counter()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)


def _stop(proc, url) -> tuple:
    """Stop a server; returns its compilations at and after warm-up (-1 where it does not say)."""
    import httpx  # optional: httpx (test extras)

    h = httpx.get(url + "/health", timeout=10).json()
    proc.terminate()
    proc.wait(timeout=60)
    return h.get("compilations_at_warmup", -1), h.get("compilations_after_warmup", -1)


# ---------------------------------------------------------------------------- the run
def _line(server, phase, size, r) -> str:
    ms = {k: v * 1e3 for k, v in r.items() if k not in ("n", "failed")}
    return (f"{server:10s} {phase:14s} {size:5s} n {r['n']:3d} failed {r['failed']}  "
            f"e2e p50/p95/p99 {ms['e2e_p50']:7.0f} {ms['e2e_p95']:7.0f} {ms['e2e_p99']:7.0f} ms  "
            f"ttft {ms['ttft_p50']:6.0f} {ms['ttft_p95']:6.0f} {ms['ttft_p99']:6.0f} ms  "
            f"tpot {ms['tpot_p50']:6.1f} {ms['tpot_p95']:6.1f} {ms['tpot_p99']:6.1f} ms")


def _run_server(kind, args, results, reqs, rate_holder):
    proc, url, warm = _spawn(kind, args)
    res = results.setdefault(kind, {"warmup_s": warm})
    try:
        b = asyncio.run(closed_loop(url, workload(512, args.seed + 1, args.vocab, *args.sizes),
                                    args.clients, args.duration))
        res["throughput"] = b
        print(f"{kind:10s} throughput     {args.clients} clients: {b['tok_s']:8.1f} tok/s  "
              f"requests {b['requests']} failed {b['failed']}  "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        if kind == "hf":
            return
        if "rate" not in rate_holder:  # 70% of the first (static) server's saturation
            mean = sum(r["max_tokens"] for r in reqs) / len(reqs)
            rate_holder["rate"] = 0.7 * b["tok_s"] / mean
            print(f"open-loop rate: {rate_holder['rate']:.3f} req/s (0.7 x {b['tok_s']:.1f} tok/s"
                  f" / {mean:.1f} tokens per request)", flush=True)
        at = arrivals(reqs, rate_holder["rate"], args.seed + 2)
        short = [i for i, r in enumerate(reqs) if r["size"] == "short"]
        for phase, idx in (("latency", range(len(reqs))), ("latency-nolong", short)):
            log = asyncio.run(open_loop(url, [reqs[i] for i in idx], [at[i] for i in idx]))
            res[phase] = summarize(log)
            for size, r in res[phase].items():
                print(_line(kind, phase, size, r), flush=True)
    finally:
        res["compilations_at_warmup"], res["compilations_after_warmup"] = _stop(proc, url)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n_layer", type=int, default=6)
    p.add_argument("--n_embd", type=int, default=384)
    p.add_argument("--n_ctx", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=94, help="characters in the vocabulary")
    p.add_argument("--servers", default="static,continuous,hf",
                   help="the first gptjax one sets the open-loop rate (static: as the issue asks)")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--page_size", type=int, default=16)
    p.add_argument("--prompt_buckets", default="32,1024")
    p.add_argument("--clients", type=int, default=16, help="phase b: closed-loop clients")
    p.add_argument("--duration", type=float, default=60.0, help="phase b: seconds")
    p.add_argument("--requests", type=int, default=96, help="phase a: requests")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write every number here")
    p.add_argument("--smoke", action="store_true",
                   help="end to end in about a minute: a 1 x 64 model, 6-8 / 24-32 token "
                        "requests, 4 clients for 3 s, 16 requests (shows the script works)")
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.sizes = (SHORT, LONG)
    if args.smoke:
        args.n_layer, args.n_embd, args.n_ctx, args.vocab = 1, 64, 128, 32
        args.prompt_buckets = "32,128"
        args.clients, args.duration, args.requests, args.slots = 4, 3.0, 16, 4
        args.sizes = ((6, 8), (24, 32))
    return args


def main():
    args = _parse()
    if args.serve:
        return serve_main(args)
    import jax  # heavy: only to name the device

    reqs = workload(args.requests, args.seed, args.vocab, *args.sizes)
    print(f"model: {args.n_layer} layers x {args.n_embd}, vocab {args.vocab}, n_ctx {args.n_ctx}; "
          f"device {jax.devices()[0].device_kind}; {args.slots} slots, page size "
          f"{args.page_size}; load average {os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)",
          flush=True)
    results, rate = {}, {}
    for kind in args.servers.split(","):
        _run_server(kind, args, results, reqs, rate)
    results["rate_req_s"] = rate.get("rate")
    if "static" in results and "continuous" in results:
        c, s = results["continuous"], results["static"]
        print(f"continuous / static: throughput x{c['throughput']['tok_s'] / s['throughput']['tok_s']:.2f}; "
              f"short p95 latency with long requests / without: continuous "
              f"x{c['latency']['short']['e2e_p95'] / c['latency-nolong']['short']['e2e_p95']:.2f}, "
              f"static x{s['latency']['short']['e2e_p95'] / s['latency-nolong']['short']['e2e_p95']:.2f}",
              flush=True)
    print(f"compilations at / after warm-up: "
          f"{ {k: (v.get('compilations_at_warmup'), v.get('compilations_after_warmup')) for k, v in results.items() if isinstance(v, dict)} }; "
          f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    bad = [k for k, v in results.items() if isinstance(v, dict) and (
        v.get("compilations_after_warmup", 0) > 0 or v.get("throughput", {}).get("failed")
        or any(r.get("failed") for ph in ("latency", "latency-nolong")
               for r in v.get(ph, {}).values()))]
    if bad:
        print(f"failed requests or compilations after warm-up: {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
