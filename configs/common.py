"""Defaults shared by the experiment configs: every field a config may override lives here."""

import dataclasses

import ml_collections
from ml_collections import config_dict

from gptjax.config import PRESETS, GPTConfig


def model_config(preset: str, **overrides) -> ml_collections.ConfigDict:
    """Every GPTConfig field of `preset`, so any of them is overridable (--config.model.X=...).

    vocab_size <= 0 means "take it from the tokenizer".
    """
    fields = dataclasses.asdict(GPTConfig.preset(preset)) if preset in PRESETS else {}
    fields.update(overrides)
    d = ml_collections.ConfigDict()
    d.preset = preset
    for k, v in fields.items():
        if v is None:  # typed placeholders, so the command line can set them
            v = config_dict.placeholder(int)
        setattr(d, k, v)
    return d


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config("tiny", vocab_size=0)
    c.model_vocab_multiple = 1

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "python_stdlib"     # or 'local_text' (with path) or any tfds name (data_dir)
    c.data.data_dir = ""                 # tfds data_dir ('' = gptjax's cache for its builders)
    c.data.path = ""                     # files / glob for local_text
    c.data.encoding = "utf-8"            # local_text: the files' encoding (e.g. 'latin-1')
    c.data.text_key = "text"
    c.data.val_split = "validation"
    c.data.validation_fraction = config_dict.placeholder(float)
    c.data.max_train_bytes = 0           # python_stdlib: cap on the train split (0 = builder default)
    c.data.seq_len = 0                   # 0 = model.n_ctx
    c.data.sampling = "packed"           # 'packed' windows or nanoGPT's 'random_offset'
    c.data.cache_dir = ""                # '' = ~/.cache/gptjax

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "sentencepiece"   # 'char' | 'sentencepiece' | 'gpt2_bpe'
    c.tokenizer.vocab_size = 1024        # sentencepiece only
    c.tokenizer.path = ""                # gpt2_bpe: directory with encoder.json + vocab.bpe

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.warmup_steps = 100
    c.optim.decay_steps = 0              # 0 = train.steps
    c.optim.schedule = "cosine"
    c.optim.min_lr = 1e-4
    c.optim.b1 = 0.9
    c.optim.b2 = 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.optim.decay_embeddings = True

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000
    c.train.batch_size = 12
    c.train.accum_steps = 1
    c.train.log_every = 10
    c.train.eval_every = 250
    c.train.eval_batches = 20            # per periodic evaluation; the final one uses the whole split
    c.train.eval_batch_size = 64
    c.train.save_every = 500
    c.train.keep_checkpoints = 3
    c.train.async_checkpointing = True
    c.train.nonfinite = "skip"           # 'skip' the update or 'halt' the run

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = config_dict.placeholder(list)

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = ""
    c.sample.max_new_tokens = 200
    c.sample.temperature = 0.8
    c.sample.top_k = 40
    return c
