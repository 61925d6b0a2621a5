"""Every pretraining config compiled for the TPU pod its docstring names, as BENCHMARKS.md's table.

  python bench/pod_compile.py                          # all 14 rows, ~30-60 min on a 2-core CPU
  python bench/pod_compile.py --only gpt3-small,gpt1   # some rows
  python bench/pod_compile.py --smoke                  # GPT-1's pod, a 2-layer model: ~30 s

Each row runs `train.py --config <config> --dry_run --topology <its POD topology>` in its own
process (libtpu's deviceless compile, no TPU; see gptjax.train.topology) and reads the report:
the mesh, the remat policy, XLA's memory per chip against the chip's HBM, the `fits:` line, the
compile time, and the step time at 40% MFU of the chip's datasheet peak, from which the days to
the config's token budget follow (train.steps x batch x sequence length; GPT-1 trains for 100
epochs of its corpus, whose size is not fixed, so its row gives no days). Writes the markdown
table to stdout and, with --out, the rows as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# (row name, config file argument, overrides). GPT-1's vocabulary comes from a tokenizer trained
# on its corpus; the dry run takes GPT-1's size (40,478) instead of training one.
ROWS = [("gpt1", "configs/gpt1.py", ["--config.model.vocab_size=40478"])]
ROWS += [(s, f"configs/gpt2.py:{s}", []) for s in ("gpt2", "gpt2-medium", "gpt2-large",
                                                      "gpt2-xl")]
ROWS += [("gpt2-nanogpt", "configs/gpt2_nanogpt.py", [])]
ROWS += [(s, f"configs/gpt3.py:{s}", []) for s in (
    "gpt3-small", "gpt3-medium", "gpt3-large", "gpt3-xl", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b",
    "gpt3-175b")]
# --smoke: GPT-1's config and pod at a size that compiles in seconds (it shows the script works).
SMOKE_OVERRIDES = ["--config.model.n_layer=2", "--config.train.batch_size=8",
                   "--config.model.vocab_size=512", "--config.data.seq_len=128",
                   "--config.model.embd_pdrop=0", "--config.model.attn_pdrop=0",
                   "--config.model.resid_pdrop=0"]


def _module(config_arg: str):
    """(the config module, its size argument or '')."""
    path, _, size = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("_pod_config", os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, size


def pod_of(config_arg: str) -> dict:
    """The POD dict of a config module (with its size, when the module keys POD by size)."""
    mod, size = _module(config_arg)
    return mod.POD[size] if size and size in mod.POD else mod.POD


def token_budget(config_arg: str) -> float | None:
    """Tokens the config trains on (None when it counts epochs of a corpus of unknown size)."""
    mod, size = _module(config_arg)
    c = mod.get_config(size) if size else mod.get_config()
    if c.train.get("epochs", 0) > 0:
        return None
    seq = c.data.seq_len or c.model.get("n_ctx", 0) or 1024
    return float(c.train.steps) * c.train.batch_size * seq


def parse_report(text: str) -> dict:
    """The table's fields from a `train.py --dry_run --topology` report."""
    row: dict = {}
    m = re.search(r"compile for (\S+) x \d+ slice\(s\): (\d+) .* mesh (\{.*?\}): ([\d.]+) s", text)
    if m:
        row.update(chips=int(m.group(2)), mesh=m.group(3), compile_s=float(m.group(4)))
    m = re.search(r"remat (\w+)", text)
    row["remat"] = m.group(1) if m else "?"
    m = re.search(r"total ([\d.]+) (GiB|MiB) of ([\d.]+) GiB HBM", text)
    if m:
        row["gib_per_chip"] = float(m.group(1)) / (1024 if m.group(2) == "MiB" else 1)
        row["hbm_gib"] = float(m.group(3))
    m = re.search(r"at 40% MFU .*?: ([\d.e+]+) ms/step, ([\d.e+]+) tokens/day", text)
    if m:
        row.update(step_ms_40=float(m.group(1)), tokens_per_day_40=float(m.group(2)))
    fits = [ln for ln in text.splitlines() if ln.startswith("fits: ")]
    row["fits"] = fits[-1][len("fits: "):] if fits else "no report"
    return row


def run_row(name: str, config_arg: str, overrides: list, timeout: float) -> dict:
    pod = pod_of(config_arg)
    with tempfile.TemporaryDirectory() as workdir:
        cmd = [sys.executable, os.path.join(REPO, "train.py"), "--config",
               os.path.join(REPO, config_arg), "--workdir", workdir, "--dry_run",
               "--topology", pod["topology"], *overrides]
        t = time.perf_counter()
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=timeout)
    row = dict(name=name, config=config_arg, topology=pod["topology"],
               wall_s=time.perf_counter() - t, **parse_report(proc.stdout))
    if proc.returncode:
        row["fits"] = "error: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    budget = token_budget(config_arg)
    row["token_budget"] = budget
    if budget and row.get("tokens_per_day_40"):
        row["days_40"] = budget / row["tokens_per_day_40"]
    return row


def markdown(rows: list) -> str:
    out = ["| config | topology | mesh | remat | memory per chip | fits | compile | step at 40% MFU "
           "| days to budget at 40% MFU |", "|---|---|---|---|---:|---|---:|---:|---:|"]
    for r in rows:
        mem = f"{r['gib_per_chip']:.2f} of {r['hbm_gib']:.0f} GiB" if "gib_per_chip" in r else "-"
        step = f"{r['step_ms_40']:.3g} ms" if "step_ms_40" in r else "-"
        days = (f"{r['days_40']:.1f} ({r['token_budget'] / 1e9:.0f}B tokens)" if "days_40" in r
                else "- (epochs of the corpus)" if r.get("token_budget") is None else "-")
        fits = r["fits"].split(" (")[0] if r["fits"].startswith("yes") else r["fits"]
        out.append(f"| {r['name']} | {r['topology']} | {r.get('mesh', '-')} | {r['remat']} | "
                   f"{mem} | {fits} | {r.get('compile_s', float('nan')):.0f} s | {step} | "
                   f"{days} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per compile")
    ap.add_argument("--smoke", action="store_true", help="GPT-1's pod with a 2-layer model")
    args = ap.parse_args()
    rows = ROWS
    if args.smoke:
        rows = [(n, c, o + SMOKE_OVERRIDES) for n, c, o in ROWS[:1]]
    elif args.only:
        want = set(args.only.split(","))
        unknown = want - {n for n, _, _ in ROWS}
        if unknown:
            sys.exit(f"error: --only {sorted(unknown)}: allowed rows are {[n for n, *_ in ROWS]}")
        rows = [r for r in ROWS if r[0] in want]
    results = []
    for name, config_arg, overrides in rows:
        results.append(run_row(name, config_arg, overrides, args.timeout))
        r = results[-1]
        print(f"{name}: {r['fits']} ({r['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    print(markdown(results))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "rows": results}, fh, indent=2)


if __name__ == "__main__":
    main()
