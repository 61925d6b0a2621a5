"""GPT-2 pretraining (Radford et al. 2019; optimizer settings from nanoGPT's reproduction).

The paper gives the architecture (Table 2), a 1024-token context, batch size 512 and the
50,257-token byte BPE, but not the optimizer; nanoGPT's train_gpt2.py reproduces GPT-2 small on
OpenWebText with: ~0.5M tokens per update (here 480 x 1024 = 491,520), lr 6e-4, 2000 warmup
steps, cosine decay to 6e-5 over 600,000 steps, AdamW betas (0.9, 0.95), weight decay 0.1,
gradient clipping 1.0, dropout 0. The vocabulary is padded to 50,304 (a multiple of 64), as
nanoGPT does, for a faster output matmul and an evenly shardable vocab axis.

Not run in CI. Run on a pod/cluster with OpenWebText (or any text files) and GPT-2's BPE files:
  python train.py --config configs/gpt2.py:gpt2 --workdir gs://bucket/runs/gpt2 \
      --config.data.path='/data/openwebtext/*.txt' --config.tokenizer.path=/data/gpt2_bpe \
      --config.mesh.fsdp=-1 --config.mesh.data=1
Sizes: gpt2, gpt2-medium, gpt2-large, gpt2-xl (the argument after the colon).
Expected: nanoGPT reaches a validation loss of ~2.85 on OpenWebText for GPT-2 small (124M);
OpenAI's released checkpoint scores 3.11 on the same split before finetuning.
"""

from gptjax.defaults import base_config, model_config


def get_config(size: str = "gpt2"):
    c = base_config()
    c.model = model_config(size, vocab_size=50304, embd_pdrop=0.0, attn_pdrop=0.0,
                           resid_pdrop=0.0, dtype="bfloat16", scan_layers=True, remat="dots")
    c.data.dataset = "local_text"
    c.data.path = "openwebtext/*.txt"
    c.data.validation_fraction = 0.0005
    c.data.sampling = "random_offset"
    c.tokenizer.kind = "gpt2_bpe"
    c.tokenizer.path = "gpt2_bpe"
    c.optim.learning_rate = 6e-4
    c.optim.warmup_steps = 2000
    c.optim.decay_steps = 600_000
    c.optim.min_lr = 6e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.steps = 600_000
    c.train.batch_size = 480
    c.train.eval_every = 1000
    c.train.eval_batches = 200
    c.train.save_every = 2000
    c.mesh.data = -1
    return c
