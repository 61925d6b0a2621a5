"""Load test of the completions server: N concurrent clients on loopback for a bounded time.

  python bench/serve_load.py          # random-init GPT-2-small-shaped body (12x768), char vocab
  python bench/serve_load.py --workdir runs/x --concurrency 1,4,8,16 --duration 30
  python bench/serve_load.py --smoke   # end to end in under a minute

The server (gptjax.inference.serving, uvicorn in a thread) runs in this process; the clients run in a
separate process (httpx, asyncio) so they do not share the server's GIL. Each client sends
the next request as soon as the previous one is answered. Reported per concurrency: requests/s,
completion tokens/s, p50/p99 latency, failed (non-200 or transport error) and lost (sent, never
answered) requests, and the throughput ratio against the first (lowest) concurrency. Batching
works when 8 clients get well over 1 client's throughput (the issue asks >= 3x).
"""

import argparse
import asyncio
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import jax
import uvicorn

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from gptjax import GPTConfig, init_params  # noqa: E402
from gptjax.data.tokenizers import CharTokenizer  # noqa: E402
from gptjax.inference import serving  # noqa: E402
from gptjax.train.workdir import load_pretrained  # noqa: E402


# ---------------------------------------------------------------------------- client process
async def _client_main(url, concurrency, duration, max_tokens, prompt, temperature):
    import httpx  # optional: httpx (test extras), only in the client process

    lat, toks, stats = [], [0], {"sent": 0, "ok": 0, "failed": 0, "errors": []}
    stop_at = time.perf_counter() + duration
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300.0, limits=limits) as client:
        async def worker(w):
            i = 0
            while time.perf_counter() < stop_at:
                body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                        "seed": w * 100000 + i}
                i += 1
                stats["sent"] += 1
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json=body)
                except Exception as e:  # counted, not raised: the run must finish
                    stats["failed"] += 1
                    stats["errors"].append(f"{type(e).__name__}: {e}"[:200])
                    continue
                if r.status_code != 200:
                    stats["failed"] += 1
                    stats["errors"].append(f"HTTP {r.status_code}: {r.text[:200]}")
                    continue
                lat.append(time.perf_counter() - t0)
                toks[0] += r.json()["usage"]["completion_tokens"]
                stats["ok"] += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")

    return {"concurrency": concurrency, "wall_s": wall, "sent": stats["sent"], "ok": stats["ok"],
            "failed": stats["failed"], "lost": stats["sent"] - stats["ok"] - stats["failed"],
            "req_per_s": stats["ok"] / wall, "tok_per_s": toks[0] / wall,
            "p50_s": pct(0.50), "p99_s": pct(0.99), "errors": stats["errors"][:5]}


def _run_clients(url, concurrency, args) -> dict:
    cmd = [sys.executable, __file__, "--client", url, "--concurrency", str(concurrency),
           "--duration", str(args.duration), "--max_tokens", str(args.max_tokens),
           "--prompt", args.prompt, "--temperature", str(args.temperature)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 600)
    if r.returncode != 0:
        raise RuntimeError(f"client process failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- server side
def _model(args):
    if args.workdir or args.hf_dir:
        return load_pretrained(workdir=args.workdir, hf_dir=args.hf_dir,
                               tokenizer_path=args.tokenizer)
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    cfg = GPTConfig.preset("tiny", vocab_size=len(chars), n_ctx=args.n_ctx, n_layer=args.n_layer,
                           n_head=args.n_embd // 64, n_embd=args.n_embd)
    return cfg, init_params(cfg, jax.random.key(0)), CharTokenizer(chars)


def _parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir")
    p.add_argument("--hf_dir")
    p.add_argument("--tokenizer")
    p.add_argument("--n_layer", type=int, default=12, help="default random model: layers")
    p.add_argument("--n_embd", type=int, default=768, help="default random model: width")
    p.add_argument("--n_ctx", type=int, default=128, help="default random model: context")
    p.add_argument("--concurrency", default="1,8", help="client counts, comma-separated")
    p.add_argument("--duration", type=float, default=45.0, help="seconds per concurrency")
    p.add_argument("--max_tokens", type=int, default=32)
    p.add_argument("--prompt", default="To be, or not")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--batch_sizes", default="1,8")
    p.add_argument("--prompt_buckets", default="16,128")
    p.add_argument("--batch_window_ms", type=float, default=50.0)
    p.add_argument("--smoke", action="store_true",
                   help="end to end in under a minute: a 1 x 64 random model, 1 and 2 clients for "
                        "3 s each, 4 tokens per request (shows the script works, not the speed)")
    p.add_argument("--client", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        args.n_layer, args.n_embd, args.n_ctx = 1, 64, 64
        args.concurrency, args.duration, args.max_tokens = "1,2", 3.0, 4
        args.batch_sizes, args.prompt_buckets = "1,2", "16,64"
    return args


def _start_server(app):
    """uvicorn serving `app` on a free loopback port in a thread: (server, thread, url)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.05)
    return srv, th, f"http://127.0.0.1:{port}"


def _load_test(url, args) -> list:
    results = []
    for c in (int(x) for x in args.concurrency.split(",")):
        r = _run_clients(url, c, args)
        results.append(r)
        print(f"clients {c:3d}: {r['req_per_s']:7.2f} req/s {r['tok_per_s']:8.1f} tok/s  "
              f"p50 {r['p50_s'] * 1e3:7.1f} ms  p99 {r['p99_s'] * 1e3:7.1f} ms  "
              f"ok {r['ok']} failed {r['failed']} lost {r['lost']}  "
              f"x{r['tok_per_s'] / results[0]['tok_per_s']:.2f} vs {results[0]['concurrency']}"
              f" client(s)  load {os.getloadavg()[0]:.2f}", flush=True)
        for e in r["errors"]:
            print("   error:", e)
    return results


def main():
    args = _parse()
    if args.client:
        print(json.dumps(asyncio.run(_client_main(
            args.client, int(args.concurrency), args.duration, args.max_tokens, args.prompt,
            args.temperature))))
        return

    cfg, params, tok = _model(args)
    t0 = time.perf_counter()
    app, batcher, engine = serving.build_server(
        cfg, params, tok, batch_sizes=tuple(int(x) for x in args.batch_sizes.split(",")),
        prompt_buckets=tuple(int(x) for x in args.prompt_buckets.split(",")),
        max_queue=256, batch_window_s=args.batch_window_ms / 1000, request_timeout_s=600.0,
        model_name="bench")
    warm = time.perf_counter() - t0
    srv, th, url = _start_server(app)
    compiles0 = serving.compilations()
    print(f"model: {cfg.n_layer} layers x {cfg.n_embd}, vocab {cfg.vocab_size}, n_ctx {cfg.n_ctx};"
          f" device {jax.devices()[0].device_kind}; warm-up {warm:.1f} s; "
          f"{args.max_tokens} tokens per request, prompt {len(tok.encode(args.prompt))} tokens")
    print(f"load average before: {os.getloadavg()[0]:.2f} (cores: {os.cpu_count()})")
    try:
        results = _load_test(url, args)
    finally:
        srv.should_exit = True
        th.join(timeout=10)
        batcher.stop()
    st = dict(batcher.stats)
    print(f"waves {st.get('waves', 0)}, rows {st.get('rows', 0)} (mean batch "
          f"{st.get('rows', 0) / max(1, st.get('waves', 1)):.2f}), compilations after warm-up "
          f"{serving.compilations() - compiles0}")
    bad = sum(r["failed"] + r["lost"] for r in results)
    if bad or serving.compilations() != compiles0:
        sys.exit(1)


if __name__ == "__main__":
    main()
