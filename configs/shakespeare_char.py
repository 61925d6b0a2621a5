"""nanoGPT's CPU recipe for character-level Tiny Shakespeare, exactly.

4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 iterations, lr 1e-3 with 100 warmup
steps and cosine decay to 1e-4 at 2000, beta2 0.99, weight decay 0.1, grad clip 1.0, dropout 0,
no biases (nanoGPT's bias=False: none in Linear or LayerNorm layers), exact-erf GELU (nanoGPT's
nn.GELU()), nanoGPT's random-offset batches; characters; the first 90% of the text for training
and the last 10% for validation.

Run:
  python train.py --config configs/shakespeare_char.py --workdir runs/shakespeare_char \
      --config.data.path=../shared/data/tinyshakespeare/input.txt

Expected: validation loss <= 1.90 on the whole validation split (non-overlapping 64-character
windows) after 2000 iterations; nanoGPT's own model scores 1.898 this way on a 2-core CPU
(see README, "Benchmarks").
"""

from gptjax.defaults import base_config, model_config


def get_config():
    c = base_config()
    c.model = model_config("tiny", vocab_size=0, n_layer=4, n_head=4, n_embd=128, n_ctx=64,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0, use_bias=False,
                           activation="gelu")  # nanoGPT's nn.GELU() is the exact (erf) GELU
    c.data.dataset = "local_text"
    c.data.path = "../shared/data/tinyshakespeare/input.txt"
    c.data.validation_fraction = 0.1
    c.data.sampling = "random_offset"
    c.tokenizer.kind = "char"
    c.optim.learning_rate = 1e-3
    c.optim.min_lr = 1e-4
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 2000
    c.optim.b2 = 0.99
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.steps = 2000
    c.train.batch_size = 12
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.eval_batches = 20
    c.train.save_every = 1000
    c.sample.prompt = "\n"
    c.sample.max_new_tokens = 300
    return c
