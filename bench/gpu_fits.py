"""What fits on which GPU: the largest batch per model, precision and GPU, from XLA's GPU compiler.

  python bench/gpu_fits.py                        # 6 models x 2 precisions: ~30 min on a 2-core CPU
  python bench/gpu_fits.py --only gpt2,gpt2-xl    # some models
  python bench/gpu_fits.py --smoke                # a 2-layer model, 128 tokens: ~1 min

Needs the CUDA plugin (`pip install -e ".[gpu-aot]"`), no GPU. Each model's full train step
(AdamW with fp32 master weights and moments, global-norm clipping, gptjax.train.setup) is compiled
for a deviceless H200 (gptjax.train.gpus; the largest memory, so XLA's own rematerialisation pass,
which only acts on a program over the device's memory, does not change it) at batch 1, 8 and 32
of the model's context. XLA's memory per device (arguments + outputs - aliased + temporaries) is
the larger of two peaks: the optimizer update's (fixed) and the backward pass's (linear in the
batch), so it is modelled as max(M(1), a + b x batch) with the line through batch 8 and 32;
it interpolates between the compiled batches and extrapolates the line above 32. The largest
power-of-two batch whose memory is within JAX's share of each GPU's memory
(XLA_PYTHON_CLIENT_MEM_FRACTION, .75 by default) is the table's entry; 0 means batch 1 does not
fit. Precisions: 'fp32' (fp32 compute, XLA attention) and 'bf16' (bf16 compute
with fp32 master weights, cuDNN attention). remat='full' (the most that fits), no dropout.
Writes the markdown table to stdout and, with --out, the rows as JSON.

  python bench/gpu_fits.py --finetune             # GPT-2 XL LM finetuning on an RTX 4090: ~6 min

--finetune answers "does finetuning GPT-2 XL fit my 24 GB GPU" with the dry run users run,
`train.py --dry_run --topology rtx4090` (gptjax.train.memory.dry_run), over a GPT-2 XL
transformers directory that holds only config.json and GPT-2's BPE files (the dry run reads no
weights): nanoGPT's finetune_shakespeare shape (32 sequences of 1024 tokens per update, one per
microbatch: train.accum_steps=32), remat 'full', no dropout, fp32 AdamW; full finetuning and
LoRA (rank 16 on the attention's input and output projections) over an fp32, bf16 or int8 base.
Each row is XL's memory per device against JAX's share of the RTX 4090 and the `fits:` line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gptjax.defaults import base_config, complete  # noqa: E402
from gptjax.train import gpus  # noqa: E402
from gptjax.train import topology as topo  # noqa: E402
from gptjax.train.experiment import model_config_from  # noqa: E402
from gptjax.train.setup import Setup  # noqa: E402

GIB = 1024 ** 3
MODELS = {"gpt2": "configs/gpt2.py:gpt2", "gpt2-medium": "configs/gpt2.py:gpt2-medium",
          "gpt2-large": "configs/gpt2.py:gpt2-large", "gpt2-xl": "configs/gpt2.py:gpt2-xl",
          "gpt3-xl": "configs/gpt3.py:gpt3-xl", "gpt3-2.7b": "configs/gpt3.py:gpt3-2.7b"}
PRECISIONS = {"fp32": ("float32", "xla"), "bf16": ("bfloat16", "cudnn")}
PROBE_BATCHES = (1, 8, 32)
COMPILE_FOR = "h200"
SHARED = os.path.join(REPO, "..", "shared", "data")
# --finetune: GPT-2 XL LM finetuning on one 24 GB card, nanoGPT's finetune_shakespeare shape.
FINETUNE_GPU = "rtx4090"
FINETUNE_BATCH, FINETUNE_ACCUM, FINETUNE_SEQ = 32, 32, 1024   # 1 x 1024 tokens per microbatch
FINETUNE_TARGETS = "attn.c_attn,attn.c_proj"
FINETUNE_RANK = 16
FINETUNE_ROWS = (("full", 0, "fp32"), ("lora", FINETUNE_RANK, "fp32"),
                 ("lora", FINETUNE_RANK, "bf16"), ("lora", FINETUNE_RANK, "int8"))
XL_SHAPE = dict(n_layer=48, n_embd=1600, n_head=25)
SMOKE_SHAPE = dict(n_layer=2, n_embd=64, n_head=2)


def load_config(config_arg: str, smoke: bool):
    path, _, size = config_arg.partition(":")
    spec = importlib.util.spec_from_file_location("_fits_config", os.path.join(REPO, path))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = complete(mod.get_config(size) if size else mod.get_config(), base_config())
    if smoke:
        c.model.n_layer, c.model.vocab_size, c.model.n_ctx, c.data.seq_len = 2, 512, 128, 128
    return c


def step_bytes(config, dtype: str, impl: str, batch: int, devices) -> tuple:
    """(XLA's bytes per device for one train step at `batch`, compile seconds)."""
    c = config.copy_and_resolve_references()
    c.model.dtype, c.model.attention_impl, c.model.remat = dtype, impl, "full"
    c.model.embd_pdrop = c.model.attn_pdrop = c.model.resid_pdrop = 0.0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    c.mesh.dcn.data = c.mesh.dcn.fsdp = c.mesh.dcn.tensor = 1
    c.train.batch_size, c.train.accum_steps = batch, 1
    mc = model_config_from(c)
    setup = Setup(c, mc, c.train.steps, devices=devices)
    res = topo.compile_step(setup, batch, c.data.seq_len or mc.n_ctx)
    if "error" in res:
        raise RuntimeError(res["error"])
    ma = res["compiled"].memory_analysis()
    used = (ma.argument_size_in_bytes + ma.output_size_in_bytes - ma.alias_size_in_bytes
            + ma.temp_size_in_bytes)
    return int(used), res["seconds"]


def largest_batch(m1: float, a: float, b: float, budget: float, cap: int = 4096) -> int:
    """The largest power of two n <= cap with max(m1, a + b * n) <= budget (0: none fits)."""
    n = 0
    while (2 * n or 1) <= cap and max(m1, a + b * (2 * n or 1)) <= budget:
        n = 2 * n or 1
    return n


def run_row(name: str, precision: str, smoke: bool, devices) -> dict:
    config = load_config(MODELS[name], smoke)
    dtype, impl = PRECISIONS[precision]
    seq = config.data.seq_len or config.model.n_ctx
    row = dict(model=name, precision=precision, seq_len=seq, remat="full", attention=impl,
               batch={})
    measured = {}
    for b in PROBE_BATCHES:
        try:
            measured[b] = step_bytes(config, dtype, impl, b, devices)
        except RuntimeError as e:  # XLA refused to compile: the row says why, no batch entry
            row["error"] = f"batch {b}: {str(e).splitlines()[0][:160]}"
            row["batch"] = {g: None for g in gpus.GPUS}
            return row
    (m1, _), (m8, _), (m32, _) = (measured[b] for b in PROBE_BATCHES)
    per_row = (m32 - m8) / (PROBE_BATCHES[2] - PROBE_BATCHES[1])
    fixed = m8 - per_row * PROBE_BATCHES[1]
    row.update(gib_batch1=m1 / GIB, gib_batch8=m8 / GIB, gib_batch32=m32 / GIB,
               gib_fixed=fixed / GIB, gib_per_sequence=per_row / GIB,
               compile_s=sum(s for _, s in measured.values()))
    for gpu in gpus.GPUS:
        budget = gpus.device_memory(gpu) * gpus.allocator_fraction()
        row["batch"][gpu] = largest_batch(m1, fixed, per_row, budget)
    return row


def hf_config_dir(d: str, shape: dict, shared: str) -> str:
    """`d` as a transformers GPT-2 directory without weights: config.json (GPT-2's vocabulary and
    context, `shape`) and GPT-2's BPE files, all `train.py --dry_run` reads of a model."""
    import transformers  # heavy: only --finetune writes a model config

    transformers.GPT2Config(vocab_size=50257, n_positions=1024, **shape).save_pretrained(d)
    shutil.copy(os.path.join(shared, "gpt2_bpe", "encoder.json"), os.path.join(d, "vocab.json"))
    shutil.copy(os.path.join(shared, "gpt2_bpe", "vocab.bpe"), os.path.join(d, "merges.txt"))
    return d


def finetune_config(model_dir: str, rank: int, base: str):
    """LM finetuning from `model_dir` (init.kind='hf'), full (rank 0) or LoRA, as train.py's."""
    c = base_config()
    c.init.kind, c.init.path = "hf", model_dir
    c.init.execution = "remat=full,embd_pdrop=0.0,attn_pdrop=0.0,resid_pdrop=0.0"
    c.lora.rank, c.lora.base_weights = rank, base
    if rank:
        c.lora.targets, c.lora.alpha = FINETUNE_TARGETS, 2.0 * rank
    c.data.seq_len = FINETUNE_SEQ
    c.train.batch_size, c.train.accum_steps = FINETUNE_BATCH, FINETUNE_ACCUM
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 1, 1
    return c


def _gib_in(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+) (GiB|MiB)", text).groups()
    return float(value) / (1024 if unit == "MiB" else 1)


def finetune_row(model_dir: str, kind: str, rank: int, base: str, model: str) -> dict:
    """One --finetune row from `train.py --dry_run --topology rtx4090`'s report."""
    from gptjax.train.memory import dry_run  # heavy: the dry run's machinery

    t0 = time.time()
    with tempfile.TemporaryDirectory() as wd:
        report = dry_run(finetune_config(model_dir, rank, base), wd, topology=FINETUNE_GPU)
    fits = report.strip().splitlines()[-1]
    m = re.search(r"total ([\d.]+ [GM]iB) of ([\d.]+ [GM]iB) usable", report)
    params = re.match(r"model: ([\d,]+) parameters", report)
    lora = re.search(r"^LoRA \(rank (\d+), .*; ([\d,]+) trained parameters\)", report, re.M)
    if not fits.startswith("fits: ") or m is None or params is None or bool(lora) != bool(rank):
        raise RuntimeError(f"unexpected dry-run report: {report[-600:]}")
    n = int(params.group(1).replace(",", ""))
    return dict(model=model, kind=kind, lora_rank=rank, lora_targets=FINETUNE_TARGETS if rank
                else "", base_weights=base, gpu=FINETUNE_GPU, batch=FINETUNE_BATCH,
                accum_steps=FINETUNE_ACCUM, micro_batch=FINETUNE_BATCH // FINETUNE_ACCUM,
                seq_len=FINETUNE_SEQ, params=n,
                trained_params=int(lora.group(2).replace(",", "")) if lora else n,
                gib=_gib_in(m.group(1)), usable_gib=_gib_in(m.group(2)),
                fits=fits.split(":", 1)[1].strip(), compile_s=time.time() - t0)


def finetune_rows(smoke: bool, shared: str) -> list:
    """Every FINETUNE_ROWS row for GPT-2 XL (--smoke: a 2 x 64 model of GPT-2's vocabulary)."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model_dir = hf_config_dir(d, SMOKE_SHAPE if smoke else XL_SHAPE, shared)
        name = "gpt2 2x64" if smoke else "gpt2-xl"
        for kind, rank, base in FINETUNE_ROWS:
            rows.append(finetune_row(model_dir, kind, rank, base, name))
            r = rows[-1]
            print(f"{name} {kind} {base}: {r['gib']:.2f} GiB, fits: {r['fits']} "
                  f"({r['compile_s']:.0f} s)", file=sys.stderr, flush=True)
    return rows


def finetune_markdown(rows: list) -> str:
    out = [f"| model | training | base weights | trained parameters | batch x length "
           f"(microbatch) | GiB per device | {FINETUNE_GPU} ({rows[0]['usable_gib']:.1f} GiB) |",
           "|---|---|---|---:|---|---:|---|"]
    for r in rows:
        what = ("full finetuning" if not r["lora_rank"] else
                f"LoRA rank {r['lora_rank']} ({r['lora_targets']})")
        out.append(f"| {r['model']} | {what} | {r['base_weights']} | {r['trained_params']:,} | "
                   f"{r['batch']} x {r['seq_len']} ({r['micro_batch']} x {r['seq_len']}, "
                   f"{r['accum_steps']} accumulated) | {r['gib']:.2f} | "
                   f"fits: {r['fits'].split(' (')[0]} |")
    return "\n".join(out)


def markdown(rows: list) -> str:
    head = " | ".join(f"{g} ({gpus.device_memory(g) * gpus.allocator_fraction() / GIB:.1f} GiB)"
                      for g in gpus.GPUS)
    out = [f"| model | compute | seq | GiB at batch 1 / 8 / 32 | {head} |",
           "|---|---|---:|---:|" + "---:|" * len(gpus.GPUS)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['model']} | {r['precision']} | {r['seq_len']} | XLA error at "
                       f"{r['error'].split(':')[0]} |" + " ? |" * len(gpus.GPUS))
            continue
        cells = " | ".join(str(r["batch"][g]) if r["batch"][g] else "no" for g in gpus.GPUS)
        out.append(f"| {r['model']} | {r['precision']} | {r['seq_len']} | "
                   f"{r['gib_batch1']:.1f} / {r['gib_batch8']:.1f} / {r['gib_batch32']:.1f} | "
                   f"{cells} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help=f"comma-separated models of {list(MODELS)}")
    ap.add_argument("--out", default="", help="write the rows as JSON here")
    ap.add_argument("--finetune", action="store_true",
                    help=f"only GPT-2 XL LM finetuning (full, LoRA) on an {FINETUNE_GPU}")
    ap.add_argument("--shared", default=SHARED, help="the shared data folder (GPT-2's BPE files)")
    ap.add_argument("--smoke", action="store_true",
                    help="GPT-2 small with 2 layers, vocab 512, 128 tokens; and the --finetune "
                         "rows for a 2 x 64 GPT-2")
    args = ap.parse_args()
    names = [] if args.finetune else list(MODELS)
    if args.smoke:
        names = ["gpt2"]
    elif args.only:
        names = args.only.split(",")
        unknown = [n for n in names if n not in MODELS]
        if unknown:
            sys.exit(f"error: --only {unknown}: allowed models are {list(MODELS)}")
    if not gpus.cuda_plugin_available():
        sys.exit(f"error: {gpus.GPU_INSTALL_HINT}")
    devices = gpus.gpu_devices(COMPILE_FOR)
    rows = []
    for name in names:
        for precision in PRECISIONS:
            rows.append(run_row(name, precision, args.smoke, devices))
            r = rows[-1]
            print(f"{name} {precision}: " + (r["error"] if "error" in r else
                  f"{r['gib_batch1']:.2f} / {r['gib_batch8']:.2f} / {r['gib_batch32']:.2f} GiB "
                  f"at batch 1 / 8 / 32 ({r['compile_s']:.0f} s)"), file=sys.stderr, flush=True)
    ft = finetune_rows(args.smoke, args.shared) if args.finetune or args.smoke else []
    print("\n\n".join(([markdown(rows)] if rows else []) + ([finetune_markdown(ft)] if ft else [])))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"date": time.strftime("%Y-%m-%d"), "compiled_for": COMPILE_FOR,
                       "allocator_fraction": gpus.allocator_fraction(), "rows": rows,
                       "finetune": ft}, fh, indent=2)

if __name__ == "__main__":
    main()
