"""GPT-1 pretraining (Radford et al. 2018, section 4.1 "Model specifications").

12-layer decoder, 768 wide, 12 heads, 3072-wide MLP, 512 positions, GELU, learned positions,
post-LN; dropout 0.1 on residuals, embeddings and attention; N(0, 0.02) init; Adam with max lr
2.5e-4, linear warmup over the first 2000 updates then cosine annealing to 0; minibatches of 64
randomly sampled contiguous sequences of 512 tokens; L2 (decoupled weight decay) 0.01 on all
non-bias, non-gain weights; 100 epochs of BooksCorpus; a 40,000-merge BPE (here a 40,478-piece
SentencePiece BPE, GPT-1's vocabulary size, plus the 3 task tokens of the preset).

Not run in CI (it is a multi-GPU-day job). Run, with BooksCorpus-like text files:
  python train.py --config configs/gpt1.py --workdir runs/gpt1 \
      --config.data.path='/data/books/*.txt' --config.train.steps=N
where N = 100 epochs x corpus tokens / 32,768 tokens per update.
Expected: the paper reports a BooksCorpus language-modelling perplexity of 18.4.
"""

from gptjax.defaults import base_config, model_config


def get_config():
    c = base_config()
    c.model = model_config("gpt1", vocab_size=0)
    c.model_vocab_multiple = 1
    c.data.dataset = "local_text"
    c.data.path = "books/*.txt"
    c.data.sampling = "random_offset"    # "randomly sampled, contiguous sequences"
    c.tokenizer.kind = "sentencepiece"
    c.tokenizer.vocab_size = 40478
    c.optim.learning_rate = 2.5e-4
    c.optim.warmup_steps = 2000
    c.optim.schedule = "cosine"
    c.optim.min_lr = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 0.0              # the paper mentions no clipping
    c.train.steps = 1_000_000
    c.train.batch_size = 64
    c.train.eval_every = 2000
    c.train.eval_batches = 50
    c.train.save_every = 5000
    return c
