"""GPT-3 pretraining (Brown et al. 2020, Table 2.1 and Appendix B).

Per size, Table 2.1 gives the batch size in tokens and the learning rate; Appendix B: Adam with
beta1 0.9, beta2 0.95, eps 1e-8; global-norm clipping at 1.0; cosine decay of the learning rate
to 10% of its value over 260B tokens, then training on at 10%; linear warmup over the first 375M
tokens; weight decay 0.1; context 2048 with documents packed into full sequences (an end-of-text
token between them); 300B training tokens in all. Alternating dense and locally banded attention
(window 256, see gptjax/config.py). Not reproduced here: the gradual batch-size ramp over the
first 4-12B tokens (the config uses the final batch size throughout).

Not run in CI. Run (size after the colon: gpt3-small, gpt3-medium, gpt3-large, gpt3-xl,
gpt3-2.7b, gpt3-6.7b, gpt3-13b, gpt3-175b):
  python train.py --config configs/gpt3.py:gpt3-xl --workdir gs://bucket/runs/gpt3-xl \
      --config.data.dataset=c4/en --config.data.data_dir=gs://bucket/tfds \
      --config.tokenizer.path=/data/gpt2_bpe --config.mesh.fsdp=-1 --config.mesh.data=1
Expected: the final validation losses of Figure 3.1 (e.g. ~2.25 nats/token for 1.3B on the
paper's mixture; other corpora give other numbers).
"""

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


def get_config(size: str = "gpt3-small"):
    if size not in TABLE_2_1:
        raise ValueError(f"size={size!r}: allowed values are {sorted(TABLE_2_1)}")
    lr, batch_tokens = TABLE_2_1[size]
    c = base_config()
    c.model = model_config(size, vocab_size=50304, embd_pdrop=0.0, attn_pdrop=0.0,
                           resid_pdrop=0.0, dtype="bfloat16", scan_layers=True, remat="dots")
    c.data.dataset = "c4/en"
    c.data.text_key = "text"
    c.data.sampling = "packed"
    c.tokenizer.kind = "gpt2_bpe"
    c.tokenizer.path = "gpt2_bpe"
    batch = int(round(batch_tokens / CONTEXT))          # sequences per update
    tokens_per_step = batch * CONTEXT
    c.optim.learning_rate = lr
    c.optim.warmup_steps = int(375e6 // tokens_per_step)
    c.optim.decay_steps = int(260e9 // tokens_per_step)
    c.optim.min_lr = 0.1 * lr
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.steps = int(300e9 // tokens_per_step)
    c.train.batch_size = batch
    c.train.eval_every = 1000
    c.train.eval_batches = 100
    c.train.save_every = 1000
    c.mesh.data = 1
    c.mesh.fsdp = -1
    return c
