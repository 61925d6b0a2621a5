"""Finetune a pretrained GPT on new text: full, LoRA at two ranks, and from scratch, at CPU scale.

  python bench/finetune_lm.py --workdir runs/bench_finetune_lm \
      --data ../shared/data/tinyshakespeare/input.txt          # 16 min on a busy 2-core CPU
  python bench/finetune_lm.py --smoke --workdir /tmp/ft_lm \
      --data ../shared/data/tinyshakespeare/input.txt          # end to end, ~40 s

1. The pretrained model is train.py's default run (configs/default.py: a 4 x 128 GPT, context
   128, a 1,024-piece SentencePiece BPE, 600 steps on the Python standard library's source),
   run by `python train.py` into WORKDIR/pretrain unless --pretrained_workdir names one.
2. Four arms train on --data (Tiny Shakespeare: first 90% train, last 10% validation) for the
   same steps and tokens (--steps x --batch_size x 128), each with train.py's own loop
   (gptjax.train.loop.train_and_evaluate) and the pretrained run's tokenizer and architecture:
     full      init.kind='workdir': every weight trained (lr --lr_full)
     lora_rA   the same start, LoRA rank A on every block matrix, the base frozen (lr --lr_lora)
     lora_rB   the same at rank B
     scratch   init.kind='scratch': random weights, the pretraining lr (--lr_scratch)
   Each arm runs in its own process; with --rounds N the arms run N times in turn (full, lora,
   lora, scratch, full, ...; the order rotates each round), as this machine's other benchmarks
   do: the losses are the same every round (a run is deterministic), the tokens/s is the median
   of the rounds'.
3. Reported per arm: the validation loss every --eval_every steps and on the whole split at the
   end (one plot, --plot), the optimizer state's bytes (summed over the leaves of the run's
   final `state.opt_state`) and the trainable parameters (the leaves of Adam's first moment),
   and tokens/s (the median of the loop's logged windows after the first, which holds the
   compilation). Writes results.json and results.md to --workdir.

The pretraining run is reused when its directory holds summary.json; an arm runs only when its
directory lacks arm.json.

Measured 2026-12-06 (2-core CPU, load 4.5-6.4 from other jobs; 400 steps x 16 x 128 tokens, two
rounds), validation loss on the whole split / optimizer state / tokens/s:
  full finetuning (lr 1e-3)   3.3955   7.526 MB   14,147 / 13,355
  LoRA rank 4 (lr 3e-3)       3.9812   0.262 MB    7,522 /  6,999
  LoRA rank 16 (lr 3e-3)      3.8237   1.049 MB    6,167 /  6,547
  from scratch (lr 2e-3)      3.5686   7.526 MB   15,041 / 13,084
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
DEFAULT_DATA = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare", "input.txt")

# --smoke: the defaults it replaces (explicit flags still win): a 1 x 32 GPT with context 32
# pretrained for 2 steps on 200 kB of the stdlib, 3 finetuning steps per arm on the first 64 kB
# of --data, one round.
SMOKE = dict(steps=3, batch_size=4, eval_every=2, log_every=1, ranks="2,4", rounds=1,
             data_bytes=65536)
SMOKE_MODEL = {"model.n_layer": 1, "model.n_head": 2, "model.n_embd": 32, "model.n_ctx": 32,
               "tokenizer.vocab_size": 512, "data.max_train_bytes": 200_000,
               "train.steps": 2, "train.batch_size": 4, "train.eval_every": 0,
               "train.save_every": 2, "optim.warmup_steps": 1, "sample.max_new_tokens": 0}


def _set(config, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[leaf] = value


def default_config(smoke: bool):
    """configs/default.py's config (the pretrained run's), with --smoke's shrunken model."""
    spec = importlib.util.spec_from_file_location("_default_config",
                                                  os.path.join(REPO, "configs", "default.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config()
    for k, v in (SMOKE_MODEL.items() if smoke else ()):
        _set(c, k, v)
    return c


def arms(args) -> dict:
    """name -> (init kind, LoRA rank, peak learning rate)."""
    out = {"full": ("workdir", 0, args.lr_full)}
    for r in (int(x) for x in args.ranks.split(",")):
        out[f"lora_r{r}"] = ("workdir", r, args.lr_lora)
    out["scratch"] = ("scratch", 0, args.lr_scratch)
    return out


def arm_config(args, name: str, pre_dir: str, arm_dir: str):
    """The arm's train.py config: the pretrained run's architecture, --data, the arm's init."""
    kind, rank, lr = arms(args)[name]
    c = default_config(args.smoke)
    c.data.dataset = "local_text"
    c.data.path = data_path(args)
    c.data.validation_fraction = 0.1
    c.data.max_train_bytes = 0
    c.data.cache_dir = os.path.join(os.path.abspath(args.workdir), "cache")  # every arm's tokens
    c.init.kind = kind
    c.init.path = pre_dir if kind == "workdir" else ""
    c.lora.rank = rank
    if rank:
        c.lora.alpha = 2.0 * rank  # the branch's scale alpha / r = 2 at either rank
        c.lora.targets = args.lora_targets
    c.optim.learning_rate = lr
    c.optim.min_lr = lr / 10
    c.optim.warmup_steps = max(args.steps // 20, 1)
    c.train.steps = args.steps
    c.train.batch_size = args.batch_size
    c.train.log_every = args.log_every
    c.train.eval_every = args.eval_every
    c.train.eval_batches = -1  # the whole validation split at every evaluation
    c.train.save_every = args.steps
    c.sample.max_new_tokens = 0
    return c


def data_path(args) -> str:
    """--data, or (--data_bytes) a copy of its first bytes in the work directory."""
    if not args.data_bytes:
        return os.path.abspath(args.data)
    path = os.path.join(os.path.abspath(args.workdir), f"data_head_{args.data_bytes}.txt")
    if not os.path.exists(path):
        with open(args.data, "rb") as fh:
            head = fh.read(args.data_bytes)
        with open(path, "wb") as fh:
            fh.write(head.decode("utf-8", errors="ignore").encode("utf-8"))
    return path


def _tree_bytes(tree) -> int:
    import jax  # heavy: only the arm's own process uses JAX
    return int(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))


def _adam_first_moment(opt_state):
    """The `mu` tree of the first Adam state in `opt_state` (the trainable parameters' shape)."""
    import jax  # heavy: only the arm's own process uses JAX
    for node in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu")):
        if hasattr(node, "mu"):
            return node.mu
    raise ValueError("no Adam state (a `mu` field) in the optimizer state")


def run_arm(args, name: str, rnd: int) -> dict:
    """Train one arm in this process; returns (and writes) its row."""
    import jax  # heavy: only the arm's own process uses JAX
    from gptjax.cli import quiet_libraries
    from gptjax.train.compile_cache import enable_compilation_cache
    from gptjax.train.hostmem import prepare_host_for_training
    from gptjax.train.loop import train_and_evaluate

    prepare_host_for_training()  # the process edge and the compilation cache, as in train.py
    enable_compilation_cache()
    quiet_libraries()
    wd = os.path.abspath(args.workdir)
    pre_dir = pretrained_dir(args)
    arm_dir = os.path.join(wd, f"round{rnd}", name)
    if arms(args)[name][0] == "scratch" and not os.path.exists(os.path.join(arm_dir,
                                                                            "tokenizer")):
        # The same tokenizer as the pretrained arms: the run loads the one its directory holds.
        shutil.copytree(os.path.join(pre_dir, "tokenizer"), os.path.join(arm_dir, "tokenizer"))
    t0 = time.time()
    result = train_and_evaluate(arm_config(args, name, pre_dir, arm_dir), arm_dir,
                                progress=False)
    wall = time.time() - t0
    lines = [json.loads(x) for x in open(os.path.join(arm_dir, "metrics.jsonl"))]
    tps = [x["tokens_per_sec"] for x in lines if "tokens_per_sec" in x][1:]
    mu = _adam_first_moment(result.state.opt_state)
    row = dict(arm=name, round=rnd, val=[(x["step"], x["val_loss"]) for x in lines
                                         if "val_loss" in x],
               val_loss=result.val_loss, train_loss=result.train_loss,
               tok_s=statistics.median(tps) if tps else float("nan"), tok_s_windows=tps,
               opt_state_bytes=_tree_bytes(result.state.opt_state),
               trainable_params=int(sum(x.size for x in jax.tree.leaves(mu))),
               state_params_bytes=_tree_bytes(result.state.params), wall_s=wall,
               tokens=args.steps * args.batch_size * result.model_config.n_ctx)
    with open(os.path.join(arm_dir, "arm.json"), "w") as fh:
        json.dump(row, fh, indent=2)
    return row


def pretrained_dir(args) -> str:
    return os.path.abspath(args.pretrained_workdir or os.path.join(args.workdir, "pretrain"))


def pretrain(args) -> float:
    """Runs `python train.py` (configs/default.py) into the pretrained directory unless it holds
    a finished run; returns the wall seconds spent (0 when reused)."""
    pre_dir = pretrained_dir(args)
    if os.path.exists(os.path.join(pre_dir, "summary.json")):
        return 0.0
    if args.pretrained_workdir:
        sys.exit(f"error: --pretrained_workdir {pre_dir}: no finished run there (summary.json); "
                 "allowed: a train.py work directory of configs/default.py's architecture")
    flags = [f"--config.{k}={v}" for k, v in (SMOKE_MODEL.items() if args.smoke else ())]
    t0 = time.time()
    _run([sys.executable, os.path.join(REPO, "train.py"), "--workdir", pre_dir, "--no_progress",
          *flags])
    return time.time() - t0


def _run(cmd: list) -> None:
    """Runs `cmd` (its output goes to this process's); exits with one line if it fails."""
    rc = subprocess.run(cmd).returncode
    if rc:
        sys.exit(f"error: {' '.join(cmd[1:3])} ... exited with status {rc} (its output above)")


def run_rounds(args) -> list:
    """Every arm in its own process, --rounds times, the order rotating; their rows."""
    names, rows = list(arms(args)), []
    for rnd in range(args.rounds):
        order = names[rnd % len(names):] + names[:rnd % len(names)]
        for name in order:
            path = os.path.join(os.path.abspath(args.workdir), f"round{rnd}", name, "arm.json")
            if not os.path.exists(path):
                _run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--arm", name,
                      "--round", str(rnd)])
            rows.append(json.load(open(path)))
            print(f"round {rnd} {name}: val_loss {rows[-1]['val_loss']:.4f}, "
                  f"{rows[-1]['tok_s']:,.0f} tok/s, load {os.getloadavg()[0]:.1f}", flush=True)
    return rows


def summarise(args, rows: list, pre_wall: float, load: tuple) -> dict:
    """One entry per arm: round 0's curve and losses, the median tokens/s of the rounds."""
    out = {}
    for name in arms(args):
        mine = [r for r in rows if r["arm"] == name]
        first = mine[0]
        out[name] = dict(first, tok_s_rounds=[r["tok_s"] for r in mine],
                         tok_s=statistics.median(r["tok_s"] for r in mine))
        out[name].pop("tok_s_windows")
    return dict(arms=out, pretrain_wall_s=pre_wall, load_before=load[0], load_after=load[1],
                args={k: v for k, v in vars(args).items() if k not in ("arm", "round")})


def plot(results: dict, path: str) -> None:
    import matplotlib  # heavy: only the summary draws
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt  # heavy: only the summary draws

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=100)
    for name, r in results["arms"].items():
        steps, losses = zip(*r["val"])
        ax.plot(steps, losses, marker="o", markersize=3, label=_label(name))
    ax.set_xlabel(f"step ({results['args']['batch_size']} sequences each)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Finetuning on Tiny Shakespeare from a model pretrained on Python source",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _label(name: str) -> str:
    if name == "full":
        return "full finetuning"
    if name == "scratch":
        return "from scratch"
    return f"LoRA rank {name.split('_r')[1]}"


def markdown(results: dict) -> str:
    a = results["args"]
    md = ["| arm | start | trained | val loss (whole split) | optimizer state | "
          "trainable parameters | tokens/s |",
          "|---|---|---|---:|---:|---:|---:|"]
    for name, r in results["arms"].items():
        start = "random init" if name == "scratch" else "pretrained"
        trained = ("all weights" if name in ("full", "scratch") else
                   f"adapters ({a['lora_targets']}), base frozen")
        rates = " / ".join(f"{t:,.0f}" for t in r["tok_s_rounds"])
        md.append(f"| {_label(name)} | {start} | {trained} | {r['val_loss']:.4f} | "
                  f"{r['opt_state_bytes'] / 1e6:.3f} MB | {r['trainable_params']:,} | "
                  f"{rates} |")
    r0 = next(iter(results["arms"].values()))
    md.append("")
    md.append(f"{a['steps']} steps x {a['batch_size']} sequences ({r0['tokens']:,} tokens) "
              f"per arm; lr full {a['lr_full']}, LoRA {a['lr_lora']}, scratch "
              f"{a['lr_scratch']} (cosine, 5% warmup); load {results['load_before']:.1f} -> "
              f"{results['load_after']:.1f}")
    return "\n".join(md)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="runs/bench_finetune_lm")
    p.add_argument("--data", default=DEFAULT_DATA, help="the text to finetune on")
    p.add_argument("--data_bytes", type=int, default=0,
                   help="finetune on the first N bytes of --data only (0: all of it)")
    p.add_argument("--pretrained_workdir", default="",
                   help="a finished train.py run of configs/default.py (default: run one into "
                        "WORKDIR/pretrain)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--eval_every", type=int, default=40)
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--ranks", default="4,16", help="the two LoRA ranks")
    p.add_argument("--lora_targets", default="all",
                   help="LoRA targets (gptjax.nn.lora: attn.c_attn, attn.c_proj, mlp.c_fc, "
                        "mlp.c_proj, all)")
    p.add_argument("--lr_full", type=float, default=1e-3)
    p.add_argument("--lr_lora", type=float, default=3e-3)
    p.add_argument("--lr_scratch", type=float, default=2e-3,
                   help="from scratch: the pretraining run's own peak rate")
    p.add_argument("--rounds", type=int, default=2, help="times each arm runs (tokens/s)")
    p.add_argument("--plot", default="", help="the plot's path (default WORKDIR/finetune_lm.png)")
    p.add_argument("--smoke", action="store_true",
                   help="end to end in seconds: a 1 x 32 GPT pretrained 2 steps, 3 steps per arm "
                        "(shows the script works; the numbers mean nothing)")
    p.add_argument("--arm", default="", help=argparse.SUPPRESS)  # one arm, in this process
    p.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.smoke:
        p.set_defaults(**SMOKE)
        args = p.parse_args()
    if len(args.ranks.split(",")) != 2 or not all(r.strip().isdigit() and int(r) > 0
                                                  for r in args.ranks.split(",")):
        sys.exit(f"error: --ranks {args.ranks!r}: allowed: two positive ranks, e.g. 4,16")
    if not os.path.isfile(args.data):
        sys.exit(f"error: --data {args.data}: no such file; allowed: a text file")
    if args.arm:
        run_arm(args, args.arm, args.round)
        return
    load_before = os.getloadavg()[0]
    os.makedirs(os.path.abspath(args.workdir), exist_ok=True)
    data_path(args)  # (written once, before the arms run)
    pre_wall = pretrain(args)
    rows = run_rounds(args)
    results = summarise(args, rows, pre_wall, (load_before, os.getloadavg()[0]))
    wd = os.path.abspath(args.workdir)
    plot(results, args.plot or os.path.join(wd, "finetune_lm.png"))
    with open(os.path.join(wd, "results.json"), "w") as fh:
        json.dump(results, fh, indent=2)
    md = markdown(results)
    with open(os.path.join(wd, "results.md"), "w") as fh:
        fh.write(md + "\n")
    print(md, flush=True)


if __name__ == "__main__":
    main()
