"""Decode throughput: gptjax.inference.sampling.generate against transformers' GPT2LMHeadModel.generate.

    python bench/decode.py --batch_sizes 1,8 --prompt_len 32 --new_tokens 128 --repeats 3

GPT-2 small (124M, random init: speed does not depend on the weights), greedy, every row
generating exactly --new_tokens tokens (no EOS; transformers gets min_new_tokens=new_tokens), both
on this machine's CPU in the same run, timed in turns (gptjax, transformers, ...) so that load
from other processes hits both alike; the best of --repeats runs is kept. transformers runs twice:
with torch's default thread count (as users run it) and with one thread, because on a shared
machine torch's OpenMP threads stall whenever another process holds a core (an 8x slowdown
was seen here), and a ratio against that alone would flatter gptjax.

Reports generated tokens/s (prefill included, as a user sees it), the ratio gptjax /
transformers, and the fraction of the memory-bandwidth roofline:
a decode step must read every parameter once, so steps/s x parameter bytes / measured bandwidth
(a large numpy copy, counting the bytes read and written) says how close a step is to the
hardware limit. At batch 8 the same weights serve 8 rows, so the fraction is per step, not per
token.

gptjax decodes with parameters prepared once by `gptjax.inference.sampling.prepare_for_decoding` (what
sample.py and the server do after loading; its one-off cost is printed), and also, as the
"plain params" column, with the parameters as trained, which is what a bare `generate(config,
params, ...)` call gets.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptjax import GPTConfig, init_params  # noqa: E402
from gptjax.inference.sampling import generate, prepare_for_decoding  # noqa: E402


def measure_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Copy bandwidth in bytes/s (read + write), best of `repeats` copies of an n_bytes array."""
    src = np.ones(n_bytes // 8, np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def gptjax_runner(cfg, params, prompts_BxT: np.ndarray, new_tokens: int):
    # params: plain or prepared by prepare_for_decoding; generate takes either.
    B = len(prompts_BxT)

    def run(n=new_tokens):
        out = generate(cfg, params, prompts_BxT.tolist(), max_new_tokens=n, temperature=0)
        assert out.tokens.shape == (B, n) and (out.lengths == n).all()

    return run


def transformers_runner(model, prompts_BxT: np.ndarray, new_tokens: int, threads: int):
    import torch  # optional: torch, only for the transformers comparison

    ids = torch.tensor(prompts_BxT, dtype=torch.long)
    mask = torch.ones_like(ids)

    def run(n=new_tokens):
        torch.set_num_threads(threads)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                 min_new_tokens=n, pad_token_id=0)
        assert out.shape == (len(prompts_BxT), prompts_BxT.shape[1] + n)

    return run


def _transformers_model(cfg):
    """transformers' GPT2LMHeadModel of cfg's shape (random init) and torch's thread count."""
    import torch  # optional: torch, only for the transformers comparison
    import transformers  # optional: transformers, only for the comparison

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx,
                                     n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                                     bos_token_id=cfg.vocab_size - 1,
                                     eos_token_id=cfg.vocab_size - 1)
    return transformers.GPT2LMHeadModel(hf_cfg).eval(), torch.get_num_threads()


def _measure(runners: dict, batch: int, new_tokens: int, repeats: int) -> dict:
    """Best-of-`repeats` time of each runner, taken in turns, as tokens/s and ratios."""
    # Warm-up: gptjax compiles for these exact shapes; torch needs only a short run.
    for name, run in runners.items():
        run() if name.startswith("gptjax") else run(4)
    best = {name: float("inf") for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            best[name] = min(best[name], _timed(run))
    row = dict(batch=batch)
    for name, t in best.items():
        row[f"{name}_tokens_per_s"] = batch * new_tokens / t
        row[f"{name}_ms_per_step"] = 1e3 * t / new_tokens
        if name != "gptjax":
            row[f"ratio_vs_{name}"] = t / best["gptjax"]
    return row


def _print_table(result: dict, args) -> None:
    rows, torch_threads = result["rows"], result["torch_threads"]
    print(f"{result['model']}, {result['n_params'] / 1e6:.1f}M params "
          f"({result['param_bytes'] / 1e6:.0f} MB fp32), prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, greedy, best of {args.repeats}; copy bandwidth "
          f"{result['copy_bandwidth_GBps']:.1f} GB/s -> roofline "
          f"{result['roofline_steps_per_s']:.1f} steps/s; prepare_for_decoding took "
          f"{result['prepare_s']:.2f} s once\n")
    peers = [k[len("ratio_vs_"):] for k in rows[0] if k.startswith("ratio_vs_")]
    names = {"gptjax_plain": "gptjax, plain params",
             "transformers": f"transformers ({torch_threads} threads)",
             "transformers_1thread": "transformers (1 thread)"}
    head = ["batch", "gptjax tok/s", "gptjax ms/step", "roofline fraction"]
    for peer in peers:
        head += [f"{names[peer]} tok/s", f"gptjax / {names[peer]}"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---:|" * len(head))
    for r in rows:
        cells = [str(r["batch"]), f"{r['gptjax_tokens_per_s']:.1f}",
                 f"{r['gptjax_ms_per_step']:.1f}", f"{r['roofline_fraction']:.2f}"]
        for peer in peers:
            cells += [f"{r[peer + '_tokens_per_s']:.1f}", f"{r['ratio_vs_' + peer]:.2f}x"]
        print("| " + " | ".join(cells) + " |")


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per setting (best is kept)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--skip_transformers", action="store_true")
    p.add_argument("--smoke", action="store_true",
                   help="end to end in seconds: a tiny model, batch 1, 8 prompt + 8 new tokens, "
                        "one timed run (shows the script works; the numbers mean nothing)")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_sizes, args.prompt_len, args.new_tokens, args.repeats = "1", 8, 8, 1
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cfg = GPTConfig.preset("tiny" if args.smoke else "gpt2")
    params = init_params(cfg, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(params))
    prompts = np.random.RandomState(0).randint(0, cfg.vocab_size, (max(batch_sizes),
                                                                   args.prompt_len))
    bandwidth = measure_bandwidth(1 << 24 if args.smoke else 1 << 30)
    t0 = time.perf_counter()
    prepared = jax.block_until_ready(prepare_for_decoding(cfg, params))
    prepare_s = time.perf_counter() - t0
    hf, torch_threads = (None, None) if args.skip_transformers else _transformers_model(cfg)

    rows = []
    for batch in batch_sizes:
        runners = {"gptjax": gptjax_runner(cfg, prepared, prompts[:batch], args.new_tokens),
                   "gptjax_plain": gptjax_runner(cfg, params, prompts[:batch], args.new_tokens)}
        if hf is not None:
            runners["transformers"] = transformers_runner(hf, prompts[:batch], args.new_tokens,
                                                          torch_threads)
            if torch_threads != 1:
                runners["transformers_1thread"] = transformers_runner(
                    hf, prompts[:batch], args.new_tokens, 1)
        row = _measure(runners, batch, args.new_tokens, args.repeats)
        row["roofline_fraction"] = (row["gptjax_tokens_per_s"] / batch * param_bytes
                                    / bandwidth)
        rows.append(row)

    result = dict(
        model=("tiny (smoke)" if args.smoke else "gpt2 (124M, fp32, random init)"),
        n_params=int(n_params), param_bytes=int(param_bytes), prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, repeats=args.repeats, prepare_s=prepare_s,
        torch_threads=torch_threads, copy_bandwidth_GBps=bandwidth / 1e9,
        roofline_steps_per_s=bandwidth / param_bytes, cpu_count=os.cpu_count(),
        machine=platform.processor() or platform.machine(), jax=jax.__version__,
        device=str(jax.devices()[0]), rows=rows)
    _print_table(result, args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
