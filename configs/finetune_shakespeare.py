"""nanoGPT's config/finetune_shakespeare.py: GPT-2 XL's weights, trained on as a language model
over Tiny Shakespeare.

As nanoGPT: init from GPT-2 XL (here a local transformers directory, init.kind='hf'), the
pretrained model's own GPT-2 BPE tokenizer, dropout 0.0 (nanoGPT sets 0 when it loads GPT-2),
a constant learning rate of 3e-5 (decay_lr=False: no warmup, no decay), AdamW with nanoGPT's
beta2 0.95, weight decay 0.1 and gradient clipping at 1.0, batch 1 x 32 accumulation steps x
1024 tokens (train.batch_size=32 rows split into train.accum_steps=32 micro-batches of 1) =
32,768 tokens per iteration, 20 iterations, nanoGPT's random-offset windows, and an evaluation
every 5 iterations over 40 batches of 1 sequence (its eval_interval=5, eval_iters=40).

Where it differs from nanoGPT:
  - data: the text file is split as shakespeare_char's is (the first 90% of its characters for
    training, the last 10% for validation; nanoGPT's data/shakespeare/prepare.py splits the same
    way) and tokenized with the BPE files of the model directory (init.path, or
    init.tokenizer_path) instead of tiktoken's copy of the same GPT-2 vocabulary;
  - checkpoints: every 5 iterations and at the end, the last 3 kept (nanoGPT saves only when
    the validation loss improves, always_save_checkpoint=False); the evaluation every 5
    iterations reads the first 40 windows of the validation split (nanoGPT: 40 random batches)
    and the final one the whole split;
  - precision: fp32 parameters and compute by default (nanoGPT autocasts to bfloat16 where the
    GPU has it): add dtype=bfloat16 to init.execution for that;
  - the weights come from a local directory (nothing is downloaded), e.g. one written by
    `transformers.GPT2LMHeadModel.from_pretrained("gpt2-xl").save_pretrained(DIR)` and
    `transformers.AutoTokenizer.from_pretrained("gpt2-xl").save_pretrained(DIR)` elsewhere (the
    tokenizer as vocab.json + merges.txt, or transformers' tokenizer.json);
    any GPT-2 size works (the architecture is read from DIR/config.json).

Run:
  python train.py --config configs/finetune_shakespeare.py --workdir runs/ft_shakespeare \
      --config.init.path=/path/to/gpt2-xl \
      --config.data.path=../shared/data/tinyshakespeare/input.txt

LoRA instead of full finetuning (adapters only train; the base may be held in int8):
  ... --config.lora.rank=8 --config.lora.targets=all --config.optim.learning_rate=3e-4

Memory without weights: add --dry_run (--topology rtx4090 for a 24 GB GPU).

Expected: the validation loss falls below the pretrained model's within the 20 iterations; not
measured here (there are no GPT-2 XL weights on this machine). tests/test_lm_finetune.py runs
this config on a tiny random GPT-2 directory.
"""

from gptjax.defaults import base_config


def get_config():
    c = base_config()
    c.init.kind = "hf"
    c.init.path = ""                     # give --config.init.path (a GPT-2 directory)
    c.init.execution = "embd_pdrop=0.0,attn_pdrop=0.0,resid_pdrop=0.0"
    c.data.dataset = "local_text"
    c.data.path = "../shared/data/tinyshakespeare/input.txt"
    c.data.validation_fraction = 0.1
    c.data.sampling = "random_offset"
    c.data.seq_len = 0                   # the model's context: GPT-2's 1024 (nanoGPT's block_size)
    c.optim.learning_rate = 3e-5
    c.optim.schedule = "constant"
    c.optim.warmup_steps = 0
    c.optim.min_lr = 3e-5
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.1
    c.optim.grad_clip = 1.0
    c.train.steps = 20
    c.train.batch_size = 32
    c.train.accum_steps = 32
    c.train.log_every = 1
    c.train.eval_every = 5
    c.train.eval_batches = 40
    c.train.eval_batch_size = 1
    c.train.save_every = 5
    c.sample.prompt = "\n"
    c.sample.max_new_tokens = 200
    return c
