"""GPT-3 pretraining (Brown et al. 2020, Table 2.1 and Appendix B).

Per size, Table 2.1 gives the batch size in tokens and the learning rate; Appendix B: Adam with
beta1 0.9, beta2 0.95, eps 1e-8; global-norm clipping at 1.0; cosine decay of the learning rate
to 10% of its value over 260B tokens, then training on at 10%; linear warmup over the first 375M
tokens; weight decay 0.1; context 2048 with documents packed into full sequences (an end-of-text
token between them); 300B training tokens in all. Warmup, decay and length are converted from
tokens into updates at this config's batch (floor for warmup and decay, ceil for the length).
Alternating dense and locally banded attention (window 256, see gptjax/config.py). Not
reproduced here: the gradual batch-size ramp over the first 4-12B tokens (the config uses the
final batch size throughout).

Batches: each size's global batch is a multiple of 256 sequences (so it divides the data-parallel
size of every mesh below) within 5% of Table 2.1's tokens per batch:
  0.5M tokens -> 256 x 2048 = 524,288 (+4.86%)   small, medium, large
  1M tokens   -> 512 x 2048 = 1,048,576 (+4.86%) xl, 2.7b
  2M tokens   -> 1024 x 2048 = 2,097,152 (+4.86%) 6.7b, 13b
  3.2M tokens -> 1536 x 2048 = 3,145,728 (-1.70%) 175b
Pods (POD below), TPU v5p (95 GiB HBM per chip), mesh data=1 with fsdp x tensor. The per-chip
memory in brackets is XLA's, from `python train.py --config configs/gpt3.py:SIZE --dry_run
--topology TOPOLOGY` (a deviceless compile with libtpu, attention_impl auto = splash; with
the XLA attention path, which holds T x T scores, small to xl did not fit, even at remat full):
  small  v5p:2x2x2 (8 chips)     fsdp=8            remat dots  [39.25 GiB]
  medium v5p:2x2x4 (16 chips)    fsdp=16           remat dots  [32.79 GiB]
  large  v5p:2x4x4 (32 chips)    fsdp=32           remat dots  [20.20 GiB]
  xl     v5p:4x4x4 (64 chips)    fsdp=64           remat dots  [21.62 GiB]
  2.7b   v5p:4x4x8 (128 chips)   fsdp=128          remat dots  [16.85 GiB]
  6.7b   v5p:4x8x8 (256 chips)   fsdp=256          remat full  [7.92 GiB]
  13b    v5p:8x8x8 (512 chips)   fsdp=256 tensor=2 remat full  [9.70 GiB]
  175b   v5p:8x8x16 (1024 chips) fsdp=256 tensor=4 remat full  [41.93 GiB]

Not run in CI. Run (size after the colon: gpt3-small, gpt3-medium, gpt3-large, gpt3-xl,
gpt3-2.7b, gpt3-6.7b, gpt3-13b, gpt3-175b):
  python train.py --config configs/gpt3.py:gpt3-xl --workdir gs://bucket/runs/gpt3-xl \
      --config.data.dataset=c4/en --config.data.data_dir=gs://bucket/tfds \
      --config.tokenizer.path=/data/gpt2_bpe
Expected: the final validation losses of Figure 3.1 (e.g. ~2.25 nats/token for 1.3B on the
paper's mixture; other corpora give other numbers).
"""

import math

from gptjax.defaults import base_config, model_config

# (learning rate, batch size in tokens) from Table 2.1.
TABLE_2_1 = {
    "gpt3-small": (6.0e-4, 0.5e6),
    "gpt3-medium": (3.0e-4, 0.5e6),
    "gpt3-large": (2.5e-4, 0.5e6),
    "gpt3-xl": (2.0e-4, 1e6),
    "gpt3-2.7b": (1.6e-4, 1e6),
    "gpt3-6.7b": (1.2e-4, 2e6),
    "gpt3-13b": (1.0e-4, 2e6),
    "gpt3-175b": (0.6e-4, 3.2e6),
}
CONTEXT = 2048
WARMUP_TOKENS = 375e6
DECAY_TOKENS = 260e9
TOTAL_TOKENS = 300e9
# Global batch in sequences: a multiple of 256 within 5% of Table 2.1's tokens per batch.
BATCH = {"gpt3-small": 256, "gpt3-medium": 256, "gpt3-large": 256, "gpt3-xl": 512,
         "gpt3-2.7b": 512, "gpt3-6.7b": 1024, "gpt3-13b": 1024, "gpt3-175b": 1536}


def _pod(topology: str, fsdp: int, tensor: int, remat: str) -> dict:
    return {"topology": topology, "mesh": {"data": 1, "fsdp": fsdp, "tensor": tensor},
            "remat": remat}


# The slice each size is meant for: topology name, mesh axis sizes, remat policy.
POD = {
    "gpt3-small": _pod("v5p:2x2x2", 8, 1, "dots"),
    "gpt3-medium": _pod("v5p:2x2x4", 16, 1, "dots"),
    "gpt3-large": _pod("v5p:2x4x4", 32, 1, "dots"),
    "gpt3-xl": _pod("v5p:4x4x4", 64, 1, "dots"),
    "gpt3-2.7b": _pod("v5p:4x4x8", 128, 1, "dots"),
    "gpt3-6.7b": _pod("v5p:4x8x8", 256, 1, "full"),
    "gpt3-13b": _pod("v5p:8x8x8", 256, 2, "full"),
    "gpt3-175b": _pod("v5p:8x8x16", 256, 4, "full"),
}


def get_config(size: str = "gpt3-small"):
    if size not in TABLE_2_1:
        raise ValueError(f"size={size!r}: allowed values are {sorted(TABLE_2_1)}")
    lr, _ = TABLE_2_1[size]
    pod = POD[size]
    c = base_config()
    c.model = model_config(size, vocab_size=50304, embd_pdrop=0.0, attn_pdrop=0.0,
                           resid_pdrop=0.0, dtype="bfloat16", scan_layers=True,
                           remat=pod["remat"],
                           attention_impl="auto")  # splash on TPU: no T x T scores held
    c.data.dataset = "c4/en"
    c.data.text_key = "text"
    c.data.sampling = "packed"
    c.tokenizer.kind = "gpt2_bpe"
    c.tokenizer.path = "gpt2_bpe"
    batch = BATCH[size]                                 # sequences per update
    tokens_per_step = batch * CONTEXT
    c.optim.learning_rate = lr
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = int(WARMUP_TOKENS // tokens_per_step)
    c.optim.decay_steps = int(DECAY_TOKENS // tokens_per_step)
    c.optim.min_lr = 0.1 * lr
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.steps = math.ceil(TOTAL_TOKENS / tokens_per_step)
    c.train.batch_size = batch
    c.train.eval_every = 1000
    c.train.eval_batches = 100
    c.train.save_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1                                    # POD's fsdp on its slice
    c.mesh.tensor = pod["mesh"]["tensor"]
    return c
