"""GPT-2 small (124M) with nanoGPT's reproduction recipe (Karpathy, nanoGPT config/train_gpt2.py).

NOT the paper's settings (those are configs/gpt2.py): nanoGPT trains on OpenWebText with
480 sequences of 1024 tokens per update (491,520 tokens: micro-batch 12 x 1024 tokens x 5
gradient-accumulation steps x 8 GPUs), lr 6e-4, 2000 warmup iterations, cosine decay to 6e-5 at
iteration 600,000 (= max_iters, ~295B tokens), AdamW betas (0.9, 0.95), weight decay 0.1,
clipping 1.0, dropout 0, biases on, vocabulary padded to 50,304.

Here: train.batch_size 480, train.accum_steps 5, mesh data=8 on its 8 devices, so each device
runs micro-batches of 12 sequences as nanoGPT's do. Pod (POD below): nanoGPT's 8 x A100 40GB
node (mesh data=8, remat 'dots'); on TPU, v5p:2x2x2 (8 chips) with the same mesh, where it
compiles and fits in 8.81 GiB of 95 GiB per chip (`--dry_run --topology v5p:2x2x2`, attention
auto = splash; bench/pod_compile.py). The A100 figure is not measured.
The batch is nanoGPT's exactly (480 x 1024); it is 6.25% under the paper's 512 x 1024.

Not run in CI. Run with OpenWebText (or any text files) and GPT-2's BPE files:
  python train.py --config configs/gpt2_nanogpt.py --workdir runs/gpt2_nanogpt \\
      --config.data.path='/data/openwebtext/*.txt' --config.tokenizer.path=/data/gpt2_bpe
Expected: nanoGPT reaches a validation loss of ~2.85 on OpenWebText for GPT-2 small (124M);
OpenAI's released checkpoint scores 3.11 on the same split before finetuning.
"""

from gptjax.defaults import base_config, model_config

POD = {"topology": "v5p:2x2x2", "gpu": "8x A100 40GB", "mesh": {"data": 8, "fsdp": 1, "tensor": 1},
       "remat": "dots"}


def get_config(size: str = "gpt2"):
    c = base_config()
    c.model = model_config(size, vocab_size=50304, embd_pdrop=0.0, attn_pdrop=0.0,
                           resid_pdrop=0.0, dtype="bfloat16", scan_layers=True,
                           remat=POD["remat"],
                           attention_impl="auto")  # splash on TPU, cuDNN on GPU
    c.data.dataset = "local_text"
    c.data.path = "openwebtext/*.txt"
    c.data.validation_fraction = 0.0005
    c.data.sampling = "random_offset"
    c.tokenizer.kind = "gpt2_bpe"
    c.tokenizer.path = "gpt2_bpe"
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 2000
    c.optim.decay_steps = 600_000
    c.optim.schedule = "cosine"
    c.optim.min_lr = 6e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.steps = 600_000
    c.train.batch_size = 480             # 12 x 5 x 8
    c.train.accum_steps = 5
    c.train.eval_every = 1000
    c.train.eval_batches = 200
    c.train.save_every = 2000
    c.mesh.data = -1                     # POD's data=8 on 8 devices; all devices elsewhere
    return c
