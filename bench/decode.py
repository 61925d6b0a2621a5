"""Decode throughput: gptjax.inference.sampling.generate against transformers' GPT2LMHeadModel.generate.

    python bench/decode.py --batch_sizes 1 --prompt_len 32 --new_tokens 128 --rounds 2
    python bench/decode.py --quality /tmp/q_default        # + perplexity / greedy agreement

GPT-2 small (124M, random init, transformers' own init; gptjax imports the same weights with
`gptjax.from_hf`), greedy, every row generating exactly --new_tokens tokens (no EOS;
transformers gets min_new_tokens=new_tokens), on this machine's CPU. Each side runs alone in its
own process (a fresh interpreter: build, warm up, best of --repeats timed runs), and the
processes alternate (gptjax fp32, bf16, int8, transformers, ..., then again) for --rounds
rounds, so load from other processes hits every side alike; the load average is printed with
each run. --same_process times every side in turns inside one process (labelled as such).
transformers runs with torch's default thread count (as users run it) and with one thread,
because on a shared machine torch's OpenMP threads stall whenever another process holds a core.

gptjax decodes with parameters prepared once by `prepare_for_decoding(config, params,
weights=W)` for W in --weights: fp32 (the c_proj kernels copied to [out, in]), bf16 or int8
(per-output-channel scales; gptjax.nn.quant), which GPT's own call reads. Reports generated
tokens/s (prefill included), the ratio gptjax / transformers per round, the fraction of the
memory-bandwidth roofline (steps/s x the bytes of the prepared parameters / a large numpy copy's
bandwidth), and XLA's own count of the bytes one compiled decode step accesses (cost
analysis): with int8 weights it is about a quarter of fp32's, i.e. the int8 kernels are streamed
as int8, not through a dequantized fp32 copy.

Why the int8 matmul is a multiply-and-reduce (gptjax.nn.quant.matmul): on this CPU (Xeon with
AVX-512/VNNI, XLA:CPU in jax 0.10.2), all 49 GPT-2 small matrices at batch 1, ms per step,
alone on the machine: fp32 dot [out, in] 43.9, fp32 dot [in, out] 66.2; int8 converted then
dotted 218-260 (the convert writes an fp32 copy first); int8 x int8 -> int32 dot with dynamic
activation scales 206-222 (XLA:CPU's generic integer dot); bf16 dot 215-229; bf16
multiply-and-reduce over [out, in] rows 14.6; int8 multiply-and-reduce 24.4; the same reduce
over [in, out] columns >1000.

--quality WORKDIR loads a trained gptjax run (e.g. `python train.py --workdir /tmp/q_default`)
and prints, for each weight format, perplexity on the run's validation split and on WikiText-2
(../shared/data/wikitext2_tokens/valid.txt, detokenized) with the weights the format holds (the
dequantized numbers, which the quantized decode computes to fp32 rounding, as
tests/test_quant.py checks), and greedy continuations of validation prompts generated with the
quantized decode compared token for token with fp32's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gptjax import GPTConfig, from_hf  # noqa: E402
from gptjax.inference.decoding import decode_step, init_cache  # noqa: E402
from gptjax.inference.sampling import WEIGHT_FORMATS, generate, prepare_for_decoding  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = {"gptjax": "gptjax fp32", "gptjax_bf16": "gptjax bf16", "gptjax_int8": "gptjax int8",
         "transformers": "transformers", "transformers_1thread": "transformers (1 thread)"}


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


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _hf_model(smoke: bool):
    """transformers' GPT2LMHeadModel, GPT-2 small (or tiny) shaped, seed 0 init."""
    import torch  # optional: torch, only for the transformers side and its weights
    import transformers  # optional: transformers, likewise

    torch.manual_seed(0)
    shape = (dict(vocab_size=256, n_positions=64, n_embd=32, n_layer=2, n_head=2) if smoke
             else dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12))
    cfg = transformers.GPT2Config(**shape, bos_token_id=shape["vocab_size"] - 1,
                                  eos_token_id=shape["vocab_size"] - 1)
    return transformers.GPT2LMHeadModel(cfg).eval()


def _weights_of(name: str) -> str:
    return name.split("_", 1)[1] if "_" in name else "fp32"


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


def step_bytes(cfg, prepared, batch: int, max_len: int) -> dict:
    """XLA's cost analysis of one compiled decode step: bytes accessed, and the params' bytes."""
    cache = init_cache(cfg, batch, max_len)
    tok = jax.numpy.zeros((batch,), jax.numpy.int32)
    step = jax.jit(lambda p, t, c: decode_step(cfg, p, t, t, c))
    cost = step.lower(prepared, tok, cache).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    leaves = jax.tree_util.tree_leaves(prepared)
    return dict(step_bytes_accessed=float(cost.get("bytes accessed", 0.0)),
                param_bytes=int(sum(x.size * x.dtype.itemsize for x in leaves)))


def _runner(name: str, hf, args, prompts: np.ndarray) -> tuple:
    """(run, info) for one side: gptjax in a weight format, or transformers."""
    if name.startswith("transformers"):
        import torch  # optional: torch, only for the transformers comparison

        threads = 1 if name.endswith("1thread") else torch.get_num_threads()
        n = sum(p.numel() * p.element_size() for p in hf.parameters())
        return (transformers_runner(hf, prompts, args.new_tokens, threads),
                dict(threads=threads, param_bytes=int(n)))
    cfg, params = from_hf(hf)
    t0 = time.perf_counter()
    prepared = jax.block_until_ready(prepare_for_decoding(cfg, params,
                                                          weights=_weights_of(name)))
    info = dict(prepare_s=time.perf_counter() - t0,
                **step_bytes(cfg, prepared, len(prompts), args.prompt_len + args.new_tokens))
    return gptjax_runner(cfg, prepared, prompts, args.new_tokens), info


def _prompts(args, vocab: int, batch: int) -> np.ndarray:
    return np.random.RandomState(0).randint(0, vocab, (batch, args.prompt_len))


def worker(args) -> dict:
    """One side alone in this process: warm up, then the best of --repeats timed runs."""
    hf = _hf_model(args.smoke)
    run, info = _runner(args.worker, hf, args, _prompts(args, hf.config.vocab_size, args.batch))
    run() if args.worker.startswith("gptjax") else run(4)  # compile / warm up
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    best = min(times)
    return dict(info, name=args.worker, batch=args.batch, load=load(),
                tokens_per_s=args.batch * args.new_tokens / best,
                ms_per_step=1e3 * best / args.new_tokens)


def _spawn(name: str, batch: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--batch", str(batch),
           "--prompt_len", str(args.prompt_len), "--new_tokens", str(args.new_tokens),
           "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
    before = load()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker {name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    res["load_before"] = before
    print(f"  {NAMES[name]:24s} batch {batch}: {res['tokens_per_s']:8.1f} tok/s "
          f"{res['ms_per_step']:6.1f} ms/step  (load {before} -> {res['load']})", flush=True)
    return res


def _same_process(names: list, batch: int, args) -> list:
    """Every side in this one process, in turns (the old mode; labelled same_process)."""
    hf = _hf_model(args.smoke)
    prompts = _prompts(args, hf.config.vocab_size, batch)
    built = {n: _runner(n, hf, args, prompts) for n in names}
    for n, (run, _) in built.items():
        run() if n.startswith("gptjax") else run(4)
    rounds = []
    for _ in range(args.rounds):
        row = {}
        for n, (run, info) in built.items():
            best = min(_timed(run) for _ in range(args.repeats))
            row[n] = dict(info, name=n, batch=batch, load=load(), load_before=load(),
                          tokens_per_s=batch * args.new_tokens / best,
                          ms_per_step=1e3 * best / args.new_tokens)
        rounds.append(row)
    return rounds


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _row(batch: int, rounds: list, bandwidth: float) -> dict:
    """One table row from the rounds: best tok/s per side, per-round ratios gptjax / peer."""
    row = dict(batch=batch, rounds=rounds)
    names = list(rounds[0])
    for n in names:
        best = max(r[n]["tokens_per_s"] for r in rounds)
        row[f"{n}_tokens_per_s"] = best
        row[f"{n}_ms_per_step"] = 1e3 / (best / batch)
        if n.startswith("gptjax"):
            info = rounds[0][n]
            row[f"{n}_roofline_fraction"] = best / batch * info["param_bytes"] / bandwidth
            row[f"{n}_step_bytes_accessed"] = info["step_bytes_accessed"]
            row[f"{n}_param_bytes"] = info["param_bytes"]
    for g in [n for n in names if n.startswith("gptjax")]:
        for t in [n for n in names if n.startswith("transformers")]:
            ratios = [r[g]["tokens_per_s"] / r[t]["tokens_per_s"] for r in rounds]
            row[f"ratio_{g}_vs_{t}"] = ratios
    if "gptjax" in names:
        row["roofline_fraction"] = row["gptjax_roofline_fraction"]
        for t in [n for n in names if n.startswith("transformers")]:
            row[f"ratio_vs_{t}"] = min(row[f"ratio_gptjax_vs_{t}"])
    return row


def _print_table(result: dict) -> None:
    print(f"\n{result['model']}; {result['mode']}; prompt {result['prompt_len']}, "
          f"{result['new_tokens']} new tokens, greedy, best of {result['repeats']} per process, "
          f"{result['rounds']} alternating rounds; copy bandwidth "
          f"{result['copy_bandwidth_GBps']:.1f} GB/s; load at start {result['load_start']}\n")
    print("| batch | side | tok/s (best round) | ms/step | roofline fraction | XLA bytes/step "
          "| vs transformers, per round | vs transformers 1 thread, per round |")
    print("|---:|---|---:|---:|---:|---:|---|---|")
    for r in result["rows"]:
        for n in r["rounds"][0]:
            cells = [str(r["batch"]), NAMES[n], f"{r[n + '_tokens_per_s']:.1f}",
                     f"{r[n + '_ms_per_step']:.1f}"]
            if n.startswith("gptjax"):
                cells += [f"{r[n + '_roofline_fraction']:.2f}",
                          _megabytes(r[n + '_step_bytes_accessed'])]
                for t in ("transformers", "transformers_1thread"):
                    rs = r.get(f"ratio_{n}_vs_{t}")
                    cells.append(", ".join(f"{x:.2f}x" for x in rs) if rs else "")
            else:
                cells += ["", "", "", ""]
            print("| " + " | ".join(cells) + " |")


def _megabytes(n: float) -> str:
    """Bytes as MB, with decimals below 10 MB (the --smoke model's step is ~0.1 MB)."""
    return f"{n / 1e6:.0f} MB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def quality(args) -> dict:
    """Perplexity (run's validation split, WikiText-2) and greedy agreement, per weight format."""
    from gptjax.data import load_texts
    from gptjax.eval.perplexity import perplexity, wikitext_detokenize
    from gptjax.nn.quant import dequantize_params, quantize_params
    from gptjax.runs.pretrained import load_pretrained

    config, params, tok = load_pretrained(workdir=args.quality)
    with open(os.path.join(args.quality, "config.json")) as fh:
        data = json.load(fh)["data"]
    val = "\n\n".join(load_texts(data["dataset"], data.get("val_split") or "validation",
                                  data.get("data_dir") or None))[:args.quality_chars]
    wiki_path = os.path.join(args.shared, "wikitext2_tokens", "valid.txt")
    with open(wiki_path, encoding="utf-8") as fh:
        wiki = wikitext_detokenize(fh.read()[:args.quality_chars])
    ids = np.asarray(tok.encode(val))
    starts = np.linspace(0, len(ids) - 64, args.agree_prompts).astype(int)
    prompts = [ids[s:s + 32].tolist() for s in starts]
    ctx = min(config.n_ctx, 256)

    def greedy(p):
        return generate(config, p, prompts, max_new_tokens=args.agree_tokens, temperature=0).tokens

    ref = greedy(prepare_for_decoding(config, params))
    out = {}
    for w in args.weights.split(","):
        p_eval = params if w == "fp32" else dequantize_params(
            config, quantize_params(config, params, w))
        got = greedy(prepare_for_decoding(config, params, weights=w))
        same = got == ref
        prefix = [int(np.argmin(r)) if not r.all() else len(r) for r in same]
        out[w] = dict(
            val_ppl=perplexity(config, p_eval, tok, val, context=ctx).as_dict()["token_perplexity"],
            wiki_ppl=perplexity(config, p_eval, tok, wiki, context=ctx).as_dict()["token_perplexity"],
            agreement=float(same.mean()), identical_rows=int(same.all(axis=1).sum()),
            mean_prefix=float(np.mean(prefix)))
    print(f"\nquality of {args.quality} ({config.n_layer} x {config.n_embd}); perplexity per token, "
          f"first {args.quality_chars} characters, context {ctx}; greedy: {len(prompts)} prompts "
          f"of 32 validation tokens x {args.agree_tokens} new tokens vs fp32\n")
    print("| weights | validation ppl | vs fp32 | WikiText-2 ppl | vs fp32 | greedy tokens equal "
          "| rows identical | mean tokens before first difference |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    f = out.get("fp32")
    for w, r in out.items():
        dv = f"{100 * (r['val_ppl'] / f['val_ppl'] - 1):+.2f}%" if f else ""
        dw = f"{100 * (r['wiki_ppl'] / f['wiki_ppl'] - 1):+.2f}%" if f else ""
        print(f"| {w} | {r['val_ppl']:.3f} | {dv} | {r['wiki_ppl']:.3f} | {dw} | "
              f"{100 * r['agreement']:.1f}% | {r['identical_rows']}/{len(prompts)} | "
              f"{r['mean_prefix']:.1f} |")
    return out


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch_sizes", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--prompt_len", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per process (best is kept)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of processes")
    p.add_argument("--weights", default=",".join(WEIGHT_FORMATS),
                   help=f"gptjax weight formats to run, from {','.join(WEIGHT_FORMATS)}")
    p.add_argument("--same_process", action="store_true",
                   help="time every side in turns inside this one process (labelled so)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--skip_transformers", action="store_true")
    p.add_argument("--quality", default=None, metavar="WORKDIR",
                   help="also measure perplexity and greedy agreement of a trained gptjax run")
    p.add_argument("--quality_chars", type=int, default=200_000)
    p.add_argument("--agree_prompts", type=int, default=16)
    p.add_argument("--agree_tokens", type=int, default=64)
    p.add_argument("--shared", default=os.environ.get(
        "GPTJAX_SHARED_DATA", os.path.join(REPO, "..", "shared", "data")))
    p.add_argument("--smoke", action="store_true",
                   help="end to end in seconds: a tiny model, batch 1, 8 prompt + 8 new tokens, "
                        "one round of one timed run (shows the script works; numbers mean nothing)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for w in args.weights.split(","):
        if w not in WEIGHT_FORMATS:
            p.error(f"--weights: {w!r} is not one of {list(WEIGHT_FORMATS)}")
    if args.smoke:
        args.batch_sizes, args.prompt_len, args.new_tokens = "1", 8, 8
        args.repeats, args.rounds, args.agree_tokens = 1, 1, 8
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return {}
    names = [("gptjax" if w == "fp32" else f"gptjax_{w}") for w in args.weights.split(",")]
    if not args.skip_transformers:
        import torch  # optional: torch, only for the transformers comparison

        names.append("transformers")
        if torch.get_num_threads() != 1:
            names.append("transformers_1thread")
    load_start = load()
    bandwidth = measure_bandwidth(1 << 24 if args.smoke else 1 << 30)
    rows = []
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        if args.same_process:
            rounds = _same_process(names, batch, args)
        else:
            rounds = [{n: _spawn(n, batch, args) for n in names} for _ in range(args.rounds)]
        rows.append(_row(batch, rounds, bandwidth))
    result = dict(
        model=("tiny (smoke)" if args.smoke else "gpt2 (124M, random init)"),
        mode="same process, sides in turns" if args.same_process else
        "each side alone in its own process, alternating",
        prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
        rounds=args.rounds, load_start=load_start, load_end=load(),
        copy_bandwidth_GBps=bandwidth / 1e9, cpu_count=os.cpu_count(),
        machine=platform.processor() or platform.machine(), jax=jax.__version__,
        device=str(jax.devices()[0]), rows=rows,
        param_bytes=rows[0].get("gptjax_param_bytes", 0))
    _print_table(result)
    if args.quality:
        result["quality"] = quality(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
