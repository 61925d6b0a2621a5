"""Train-step throughput and MFU of gptjax next to transformers' GPT2LMHeadModel, same machine.

  python bench/train_throughput.py                         # the three CPU shapes
  python bench/train_throughput.py --shapes gpt2_1024 --dtype bfloat16 --batch 16   # a GPU

Both sides run the same architecture (no dropout), AdamW, gradient clipping 1.0, fp32 unless
--dtype says otherwise (bf16 autocast on the torch side). MFU is model FLOPs/s
(GPTConfig.flops_per_token: 6N + 12 L d_attn T) over the device's peak: the datasheet where the
device is known, and always over a measured dense-matmul peak on this device.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp

from gptjax import GPTConfig
from gptjax.metrics import datasheet_peak, measured_peak

SHAPES = {
    # name: (n_layer, n_embd, n_head, seq_len, cpu batch)
    "nano_4x128_T64": (4, 128, 4, 64, 12),       # nanoGPT's shakespeare_char CPU recipe
    "6x384_T256": (6, 384, 6, 256, 8),
    "gpt2_T256": (12, 768, 12, 256, 4),
    "gpt2_1024": (12, 768, 12, 1024, 8),
}


def model_cfg(name, vocab, dtype):
    L, C, H, T, _ = SHAPES[name]
    return GPTConfig.preset("gpt2", n_layer=L, n_embd=C, n_head=H, n_ctx=T, vocab_size=vocab,
                            embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, dtype=dtype)


def bench_jax(cfg, batch, steps, warmup):
    import optax

    from gptjax.model import init_params
    from gptjax.trainer import TrainState, make_train_step

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-4, weight_decay=0.1))
    params = init_params(cfg, jax.random.key(0))
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    step = jax.jit(make_train_step(cfg, tx, lambda s: 3e-4), donate_argnames=("state",))
    x = jax.random.randint(jax.random.key(1), (batch, cfg.n_ctx + 1), 0, cfg.vocab_size)
    b = {"inputs": x[:, :-1], "targets": x[:, 1:]}
    rng = jax.random.key(2)
    for _ in range(warmup):
        state, m = step(state, b, rng)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, b, rng)
    jax.block_until_ready(m)
    return (time.perf_counter() - t) / steps


def bench_torch(cfg, batch, steps, warmup, compile_, dtype):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    hf = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                    attn_pdrop=0.0)
    model = GPT2LMHeadModel(hf).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)
    fwd = torch.compile(model) if compile_ else model
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.n_ctx + 1), device=dev)
    inp, tgt = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    amp = dtype == "bfloat16"

    def one():
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            logits = fwd(inp).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)),
                                                 tgt.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(warmup):
        one()
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        loss = one()
    loss.item()
    return (time.perf_counter() - t) / steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="nano_4x128_T64,6x384_T256,gpt2_T256")
    ap.add_argument("--batch", type=int, default=0, help="override every shape's batch")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--torch", type=int, default=1, help="also run transformers (0/1)")
    ap.add_argument("--torch_compile", type=int, default=0)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    peak_meas = measured_peak("float32" if a.dtype == "float32" else a.dtype)
    peak_ds = datasheet_peak()
    rows = []
    for name in a.shapes.split(","):
        cfg = model_cfg(name, a.vocab, a.dtype)
        batch = a.batch or SHAPES[name][4]
        tok = batch * cfg.n_ctx
        fpt = cfg.flops_per_token(cfg.n_ctx)
        tj = bench_jax(cfg, batch, a.steps, a.warmup)
        row = dict(shape=name, batch=batch, seq=cfg.n_ctx, dtype=a.dtype,
                   jax_tok_s=tok / tj, jax_mfu_measured=tok / tj * fpt / peak_meas,
                   jax_mfu_datasheet=(tok / tj * fpt / peak_ds) if peak_ds else None)
        if a.torch:
            tt = bench_torch(cfg, batch, a.steps, a.warmup, bool(a.torch_compile), a.dtype)
            row.update(torch_tok_s=tok / tt, ratio=tt / tj)
        rows.append(row)
        print(json.dumps(row), flush=True)
    dev = jax.devices()[0]
    print(f"\ndevice: {dev.device_kind} ({dev.platform}); measured matmul peak "
          f"{peak_meas / 1e9:,.1f} GFLOP/s ({a.dtype}); datasheet peak "
          f"{'n/a' if not peak_ds else f'{peak_ds / 1e12:.0f} TFLOP/s'}")
    print("| shape | batch x seq | gptjax tok/s | MFU (measured peak) | transformers tok/s | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} x {r['seq']} | {r['jax_tok_s']:,.0f} | "
              f"{100 * r['jax_mfu_measured']:.1f}% | "
              f"{r.get('torch_tok_s', float('nan')):,.0f} | {r.get('ratio', float('nan')):.2f}x |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(device=dev.device_kind, rows=rows), fh, indent=2)


if __name__ == "__main__":
    main()
