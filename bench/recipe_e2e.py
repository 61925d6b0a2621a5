"""nanoGPT's Tiny Shakespeare CPU recipe end to end: train.py against a nanoGPT-style PyTorch loop.

  python bench/recipe_e2e.py --data ../shared/data/tinyshakespeare/input.txt --rounds 2
  python bench/recipe_e2e.py --smoke --data ../shared/data/tinyshakespeare/input.txt

Each side runs in its own process, alternating (gptjax, torch, gptjax, torch, ...), timed from
the process's start to its exit, as a user's `time python train.py` would be:
  gptjax  `python train.py --config configs/shakespeare_char.py --workdir <fresh dir>`: data,
          compiles, 2000 steps, evaluation every 250 steps over 20 batches of train and val,
          checkpoints, the whole-split validation loss, a sample and the loss plot. Each round
          gets a fresh work directory; --cache_dir (default: a fresh one per round, i.e. a
          user's first run) is JAX's persistent compilation cache, so --warm_cache reuses one
          directory across rounds (a user's second run).
  torch   this file with --side torch: what nanoGPT's train.py does on this recipe (its model
          re-typed: 4 x 128, 4 heads, context 64, no biases, exact GELU, tied head; AdamW
          lr 1e-3, betas (0.9, 0.99), weight decay 0.1 on >= 2-D tensors, clip 1.0, 100 warmup
          iterations, cosine to 1e-4 at 2000; batch 12 of random offsets; every 250 iterations
          20 batches each of train and val, and a checkpoint when validation improves), with
          glibc's default malloc and torch's default threads, as nanoGPT's users run it.
Both then report the loss on the *whole* validation split in non-overlapping 64-character
windows (the torch side computes it after its timed loop; train.py computes it inside its run).
Prints one line per process and a summary with medians, the ratio and the load average; --json
writes everything.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = dict(n_layer=4, n_head=4, n_embd=128, block=64, batch=12, iters=2000, lr=1e-3,
              min_lr=1e-4, warmup=100, decay=2000, beta2=0.99, wd=0.1, clip=1.0,
              eval_interval=250, eval_iters=20)


# ================================================================================ torch side
def _torch_model(vocab: int, r: dict):
    """nanoGPT's model.py at bias=False, dropout 0, re-typed."""
    import torch  # optional: the torch side only
    from torch import nn  # optional: the torch side only
    from torch.nn import functional as F  # optional: the torch side only

    C, H = r["n_embd"], r["n_head"]

    class LayerNorm(nn.Module):  # nanoGPT's: LayerNorm with an optional bias (off here)
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(C))

        def forward(self, x):
            return F.layer_norm(x, (C,), self.weight, None, 1e-5)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.ln_2 = LayerNorm(), LayerNorm()
            self.c_attn = nn.Linear(C, 3 * C, bias=False)
            self.attn_proj = nn.Linear(C, C, bias=False)
            self.c_fc = nn.Linear(C, 4 * C, bias=False)
            self.mlp_proj = nn.Linear(4 * C, C, bias=False)

        def forward(self, x):
            B, T, _ = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, H, C // H).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe = nn.Embedding(vocab, C), nn.Embedding(r["block"], C)
            self.h = nn.ModuleList([Block() for _ in range(r["n_layer"])])
            self.ln_f = LayerNorm()
            for name, p in self.named_parameters():
                if p.dim() >= 2:
                    std = 0.02 / math.sqrt(2 * r["n_layer"]) if name.endswith("proj.weight") \
                        else 0.02
                    torch.nn.init.normal_(p, std=std)

        def forward(self, idx, targets):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            logits = F.linear(self.ln_f(x), self.wte.weight)
            return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return GPT()


def _lr(it: int, r: dict) -> float:
    """nanoGPT's get_lr: linear warmup, cosine to min_lr at lr_decay_iters."""
    if it < r["warmup"]:
        return r["lr"] * (it + 1) / (r["warmup"] + 1)
    if it > r["decay"]:
        return r["min_lr"]
    ratio = (it - r["warmup"]) / (r["decay"] - r["warmup"])
    return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r["lr"] - r["min_lr"])


def torch_side(data: str, out_dir: str, r: dict, seed: int = 1337) -> dict:
    """nanoGPT's train.py loop on the recipe; returns its whole-split validation loss."""
    import numpy as np  # optional: the torch side only
    import torch  # optional: the torch side only

    torch.manual_seed(seed)
    text = open(data, encoding="utf-8").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], np.int64)
    n = int(0.9 * len(ids))
    splits = {"train": ids[:n], "val": ids[n:]}

    def get_batch(split):
        d = splits[split]
        ix = torch.randint(len(d) - r["block"], (r["batch"],))
        x = torch.stack([torch.from_numpy(d[i:i + r["block"]]) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1:i + 1 + r["block"]]) for i in ix])
        return x, y

    model = _torch_model(len(chars), r)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["wd"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r["lr"],
                            betas=(0.9, r["beta2"]))
    best = float("inf")
    for it in range(r["iters"] + 1):
        for g in opt.param_groups:
            g["lr"] = _lr(it, r)
        if it % r["eval_interval"] == 0:
            model.eval()
            with torch.no_grad():
                losses = {s: torch.stack([model(*get_batch(s)) for _ in range(r["eval_iters"])])
                          .mean().item() for s in ("train", "val")}
            model.train()
            if losses["val"] < best and it > 0:
                best = losses["val"]
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "iter_num": it, "best_val_loss": best},
                           os.path.join(out_dir, "ckpt.pt"))
        if it == r["iters"]:
            break
        loss = model(*get_batch("train"))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
    t_loop = time.perf_counter()
    model.eval()
    val = torch.from_numpy(splits["val"])
    w = (len(val) - 1) // r["block"]
    with torch.no_grad():
        x = val[: w * r["block"]].view(w, r["block"])
        y = val[1: w * r["block"] + 1].view(w, r["block"])
        whole = torch.stack([model(x[i:i + 256], y[i:i + 256]) * len(x[i:i + 256])
                             for i in range(0, w, 256)]).sum().item() / w
    return {"val_loss": whole, "whole_split_eval_s": time.perf_counter() - t_loop}


# ================================================================================ the driver
def _load() -> float:
    return os.getloadavg()[0]


def _warmup(iters: int) -> int:
    return min(RECIPE["warmup"], iters // 2)


def _eval_interval(iters: int) -> int:
    return min(RECIPE["eval_interval"], max(iters // 2, 1))


def run_gptjax(data: str, iters: int, cache_dir: str) -> dict:
    with tempfile.TemporaryDirectory() as wd:
        cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
               os.path.join(REPO, "configs/shakespeare_char.py"), "--workdir", wd,
               f"--config.data.path={data}", f"--config.train.steps={iters}",
               f"--config.optim.decay_steps={iters}",
               f"--config.optim.warmup_steps={_warmup(iters)}",
               f"--config.train.eval_every={_eval_interval(iters)}", "--no_progress"]
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir)
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError("train.py failed: " + proc.stderr[-2000:])
        with open(os.path.join(wd, "summary.json")) as fh:
            summary = json.load(fh)
    return {"side": "gptjax", "wall_s": wall, "val_loss": summary["val_loss"]}


def run_torch(data: str, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        res_path = os.path.join(out, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--side", "torch", "--data", data,
               "--iters", str(iters), "--result", res_path]
        t = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - t
        if proc.returncode:
            raise RuntimeError("torch side failed: " + proc.stderr[-2000:])
        with open(res_path) as fh:
            res = json.load(fh)
    # The whole-split loss is this bench's addition to nanoGPT's loop: not part of its time.
    return {"side": "torch", "wall_s": wall - res["whole_split_eval_s"], **res}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data",
                                                   "tinyshakespeare", "input.txt"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--iters", type=int, default=RECIPE["iters"])
    ap.add_argument("--warm_cache", action="store_true",
                    help="one compilation cache for every gptjax round (a user's second run)")
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true", help="one round of 20 iterations")
    ap.add_argument("--side", choices=["torch"], help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not os.path.isfile(args.data):
        sys.exit(f"error: --data {args.data!r} is not a file (Tiny Shakespeare's input.txt)")
    if args.side == "torch":
        r = dict(RECIPE, iters=args.iters, decay=args.iters, warmup=_warmup(args.iters),
                 eval_interval=_eval_interval(args.iters))
        with tempfile.TemporaryDirectory() as out:
            res = torch_side(args.data, out, r)
        with open(args.result, "w") as fh:
            json.dump(res, fh)
        return
    rounds, iters = (1, 20) if args.smoke else (args.rounds, args.iters)
    shared_cache = tempfile.mkdtemp(prefix="jax_cache_")
    rows = []
    for i in range(rounds):
        cache = shared_cache if args.warm_cache else tempfile.mkdtemp(prefix="jax_cache_")
        for run in (lambda: run_gptjax(args.data, iters, cache), lambda: run_torch(args.data,
                                                                                    iters)):
            load0 = _load()
            row = dict(run(), round=i, load_before=load0, load_after=_load())
            rows.append(row)
            print(f"round {i} {row['side']:6s} wall {row['wall_s']:7.1f} s  val_loss "
                  f"{row['val_loss']:.4f}  load {load0:.2f}-{row['load_after']:.2f}", flush=True)
    med = {s: statistics.median(r["wall_s"] for r in rows if r["side"] == s)
           for s in ("gptjax", "torch")}
    print(f"median wall: gptjax {med['gptjax']:.1f} s, nanoGPT-style torch {med['torch']:.1f} s; "
          f"gptjax speed = {med['torch'] / med['gptjax']:.2f}x the torch loop's "
          f"({'warm' if args.warm_cache else 'cold'} compilation cache)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "iters": iters, "rows": rows,
                       "median_wall_s": med}, fh, indent=2)


if __name__ == "__main__":
    main()
