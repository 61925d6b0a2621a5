"""GPT-1 pretraining (Radford et al. 2018, section 4.1 "Model specifications").

12-layer decoder, 768 wide, 12 heads, 3072-wide MLP, 512 positions, GELU, learned positions,
post-LN; dropout 0.1 on residuals, embeddings and attention; N(0, 0.02) init; Adam with max lr
2.5e-4, linear warmup over the first 2000 updates then cosine annealing to 0; minibatches of 64
randomly sampled contiguous sequences of 512 tokens; L2 (decoupled weight decay) 0.01 on all
non-bias, non-gain weights; 100 epochs of BooksCorpus; a 40,000-merge BPE (here a 40,478-piece
SentencePiece BPE, GPT-1's vocabulary size, plus the 3 task tokens of the preset).

The 100 epochs are `train.epochs = 100`: train.py resolves them into optimizer updates from the
training split's token count (gptjax.train.experiment.resolve_steps: ceil(100 x tokens / (64 x
512))); `train.steps` is then ignored, and the cosine decays to 0 at that last update
(optim.decay_steps = 0 = the run's length).

Pod (POD below): TPU v5e:2x2 (4 chips), mesh data=4, fsdp=1, tensor=1, remat 'none', global
batch 64 sequences (16 per chip): the paper's batch exactly. Compiled there with `--dry_run
--topology v5e:2x2 --config.model.vocab_size=40478` (libtpu, no TPU; bench/pod_compile.py): fits
in 8.52 GiB of a v5e chip's 16 GiB.

Not run in CI (it is a multi-GPU-day job). Run, with BooksCorpus-like text files:
  python train.py --config configs/gpt1.py --workdir runs/gpt1 \
      --config.data.path='/data/books/*.txt'
Expected: the paper reports a BooksCorpus language-modelling perplexity of 18.4.
"""

from gptjax.defaults import base_config, model_config


# The slice this config is meant for: topology name, mesh axis sizes, remat policy.
POD = {"topology": "v5e:2x2", "mesh": {"data": 4, "fsdp": 1, "tensor": 1}, "remat": "none"}


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
    c.optim.decay_steps = 0              # 0 = cosine to min_lr at the run's last update
    c.optim.min_lr = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 0.0              # the paper mentions no clipping
    c.train.epochs = 100.0               # resolved into steps from the training split's size
    c.train.steps = 1_000_000            # (ignored while train.epochs > 0)
    c.train.batch_size = 64
    c.train.eval_every = 2000
    c.train.eval_batches = 50
    c.train.save_every = 5000
    c.model.remat = POD["remat"]
    c.mesh.data = -1                     # POD's data=4 on its 4 chips; all devices elsewhere
    return c
