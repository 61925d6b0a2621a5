"""GPT-2 pretraining as the paper states it (Radford et al. 2019, section 2.3 and Table 2).

The paper gives the architecture (Table 2: 124M/355M/774M/1.5B as gpt2, gpt2-medium, gpt2-large,
gpt2-xl), a 1024-token context, a batch of 512 sequences (here 512 x 1024 = 524,288 tokens per
update, the paper's batch exactly) and the 50,257-token byte BPE (padded to 50,304, a multiple of
64, for a faster output matmul and an evenly shardable vocab axis).

NOT published, so ASSUMED here: the optimizer and the token budget. "The learning rate of each
model was manually tuned" is all the paper says. Assumed: AdamW betas (0.9, 0.95), eps 1e-8,
weight decay 0.1, clipping 1.0, 2000 warmup updates, cosine decay to 10% of the peak at the last
update, dropout 0; the peak learning rate of the GPT-3 model of the nearest size (Table 2.1 of
Brown et al. 2020: 6e-4, 3e-4, 2.5e-4, 2e-4); a budget of 300B tokens (GPT-3's, and about
nanoGPT's 600k x 491,520 = 295B), i.e. 572,205 updates of 524,288 tokens. For nanoGPT's exact
reproduction recipe (480 x 1024, lr 6e-4, 600k iterations) use configs/gpt2_nanogpt.py.

Pods (POD below), remat 'dots', fsdp over every chip. Compiled with `--dry_run --topology`
(libtpu, no TPU; bench/pod_compile.py) with attention_impl auto (splash), per chip of 95 GiB:
gpt2 39.22 GiB, gpt2-medium 32.77, gpt2-large 22.70, gpt2-xl 15.39; with the XLA attention path
gpt2 and gpt2-xl do not fit (176 / 677 GB of temporaries). The slices:
  gpt2: v5p:2x2x2 (8 chips, fsdp=8), gpt2-medium: v5p:2x2x4 (16 chips, fsdp=16),
  gpt2-large: v5p:2x4x4 (32 chips, fsdp=32), gpt2-xl: v5p:4x4x4 (64 chips, fsdp=64);
  data=1, tensor=1; 512 sequences divide by every one of them.

Not run in CI. Run on a pod/cluster with OpenWebText (or any text files) and GPT-2's BPE files:
  python train.py --config configs/gpt2.py:gpt2 --workdir gs://bucket/runs/gpt2 \\
      --config.data.path='/data/openwebtext/*.txt' --config.tokenizer.path=/data/gpt2_bpe
Sizes: gpt2, gpt2-medium, gpt2-large, gpt2-xl (the argument after the colon).
Expected: OpenAI's released GPT-2 small scores ~3.11 nats/token on OpenWebText's validation split
(nanoGPT's measurement); a run of this config should land near it (the corpus differs from WebText).
"""

import math

from gptjax.defaults import base_config, model_config

CONTEXT = 1024
BATCH = 512                       # sequences per update (paper, section 2.3)
TOKEN_BUDGET = 300e9              # ASSUMED (not published)
WARMUP_STEPS = 2000               # ASSUMED
# Peak learning rate: ASSUMED, GPT-3 Table 2.1's for the nearest size.
LEARNING_RATE = {"gpt2": 6e-4, "gpt2-medium": 3e-4, "gpt2-large": 2.5e-4, "gpt2-xl": 2e-4}
# The slice each size is meant for: topology name, mesh axis sizes, remat policy.
POD = {
    "gpt2": {"topology": "v5p:2x2x2", "mesh": {"data": 1, "fsdp": 8, "tensor": 1},
             "remat": "dots"},
    "gpt2-medium": {"topology": "v5p:2x2x4", "mesh": {"data": 1, "fsdp": 16, "tensor": 1},
                    "remat": "dots"},
    "gpt2-large": {"topology": "v5p:2x4x4", "mesh": {"data": 1, "fsdp": 32, "tensor": 1},
                   "remat": "dots"},
    "gpt2-xl": {"topology": "v5p:4x4x4", "mesh": {"data": 1, "fsdp": 64, "tensor": 1},
                "remat": "dots"},
}


def get_config(size: str = "gpt2"):
    if size not in LEARNING_RATE:
        raise ValueError(f"size={size!r}: allowed values are {sorted(LEARNING_RATE)}")
    lr, pod = LEARNING_RATE[size], POD[size]
    c = base_config()
    c.model = model_config(size, vocab_size=50304, embd_pdrop=0.0, attn_pdrop=0.0,
                           resid_pdrop=0.0, dtype="bfloat16", scan_layers=True,
                           remat=pod["remat"],
                           attention_impl="auto")  # splash on TPU: no T x T scores held
    c.data.dataset = "local_text"
    c.data.path = "openwebtext/*.txt"
    c.data.validation_fraction = 0.0005
    c.data.sampling = "random_offset"
    c.tokenizer.kind = "gpt2_bpe"
    c.tokenizer.path = "gpt2_bpe"
    steps = math.ceil(TOKEN_BUDGET / (BATCH * CONTEXT))
    c.optim.learning_rate = lr
    c.optim.warmup_steps = WARMUP_STEPS
    c.optim.decay_steps = 0                  # 0 = the run's last update
    c.optim.schedule = "cosine"
    c.optim.min_lr = 0.1 * lr
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.steps = steps
    c.train.batch_size = BATCH
    c.train.eval_every = 1000
    c.train.eval_batches = 200
    c.train.save_every = 2000
    c.mesh.data = 1
    c.mesh.fsdp = -1                         # every chip (POD's fsdp on its slice)
    c.mesh.tensor = pod["mesh"]["tensor"]
    return c
