"""The default run: a small GPT on the embedded corpus (the Python standard library's source).

Needs no data and no network: the corpus is the .py files of the running Python's own standard
library, split into train and validation by file. A 1024-piece SentencePiece BPE is trained on
the train split and saved with the run.

Run:
  python train.py --workdir runs/default          (this config is the default)

Expected on a 2-core CPU: done in under 5 minutes (3m40s measured, including preparing the
corpus and training the tokenizer); the loss falls from ~6.9 (ln 1024) to a validation loss of
about 3.7 on the whole validation split, and the final sample looks like Python source
(indentation, `def`, `self.`, `return`).
"""

from gptjax.defaults import base_config, model_config


def get_config():
    c = base_config()
    c.model = model_config("tiny", vocab_size=0, n_layer=4, n_head=4, n_embd=128, n_ctx=128,
                           embd_pdrop=0.0, attn_pdrop=0.0, resid_pdrop=0.0)
    c.data.dataset = "python_stdlib"
    c.data.max_train_bytes = 3_000_000
    c.tokenizer.kind = "sentencepiece"
    c.tokenizer.vocab_size = 1024
    c.optim.learning_rate = 2e-3
    c.optim.min_lr = 2e-4
    c.optim.warmup_steps = 50
    c.train.steps = 600
    c.train.batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = 200
    c.train.eval_batches = 10
    c.train.save_every = 300
    c.sample.prompt = "def "
    c.sample.max_new_tokens = 120
    return c
