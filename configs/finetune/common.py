"""The shared finetuning config: GPT-1's finetuning recipe (Radford et al. 2018, section 4.1).

"We add dropout to the classifier with a rate of 0.1. For most tasks, we use a learning rate of
6.25e-5 and a batchsize of 32. Our model finetunes quickly and 3 epochs of training was
sufficient for most cases. We use a linear learning rate decay schedule with warmup over 0.2% of
training. lambda was set to 0.5." Adam (b1 0.9, b2 0.999), weight decay 0.01 on all non-bias,
non-gain weights, and gradient clipping at norm 1 follow GPT-1's released finetuning code; the
decoder keeps its pretraining dropout (GPT-1: 0.1).

Every task config is `finetune_config(task, path)` plus its own docstring; every field is
overridable on the command line, e.g.
  python finetune.py --config configs/finetune/sst2.py --workdir runs/ft_sst2 \
      --config.init.kind=workdir --config.init.path=runs/pretrain --config.train.epochs=1

GPT-1's analysis (Figure 2) of a train.py run: SST-2 dev accuracy for 0..n_layer transferred
layers, and zero-shot accuracy at every pretraining checkpoint; writes analysis.md/.png/.json:
  python finetune.py --config configs/finetune/sst2.py --workdir runs/analysis --mode=analysis \
      --config.init.path=runs/pretrain --config.task.train_examples=4000 \
      "--config.analysis.zero_shot_tasks=('sst2=../shared/data/glue/SST-2',
                                           'story_cloze=../shared/data/story_cloze')"
"""

import ml_collections
from ml_collections import config_dict

from configs.common import model_config


def finetune_config(task: str, path: str = "", **task_fields) -> ml_collections.ConfigDict:
    """GPT-1's finetuning recipe for `task` (a gptjax.tasks.TASKS name) read from `path`."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.task = ml_collections.ConfigDict()
    c.task.name = task
    c.task.path = path                   # directory in the task's standard file layout
    c.task.data_dir = ""                 # a tfds data_dir holding the task (glue/sst2, ...);
                                         # when set, it is read instead of path
    c.task.subset = ""                   # RACE 'high'/'middle', MCTest 'mc160'/'mc500'
    c.task.max_len = 0                   # longest transformed input; 0 = the model's n_ctx
    c.task.train_examples = 0            # > 0: a fixed random subset of the training split
    c.task.eval_examples = 0             # > 0: a fixed random subset of each dev split
    c.task.update(task_fields)

    # Where the decoder comes from: 'workdir' (a train.py work directory), 'hf' (a transformers
    # GPT-2 / OpenAI-GPT directory, or OpenAI's TF checkpoint), or 'scratch' (random init).
    c.init = ml_collections.ConfigDict()
    c.init.kind = "workdir"
    c.init.path = ""
    c.init.tokenizer_path = ""           # hf: GPT-2 BPE files (default: init.path) or a gptjax
                                         # tokenizer directory
    c.init.transfer_layers = -1          # pretrained blocks kept (-1 = all; GPT-1 Figure 2)
    c.init.transfer_embeddings = True

    # Used only by init.kind='scratch' (the architecture and tokenizer of a random-init model).
    c.model = model_config("tiny", vocab_size=0)
    c.model_vocab_multiple = 1
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "gpt2_bpe"        # 'gpt2_bpe' | 'char' | 'sentencepiece' (trained on
    c.tokenizer.path = "../shared/data/gpt2_bpe"  # the task's training texts)
    c.tokenizer.vocab_size = 2048

    # Decoder dropout (embd/attn/resid): < 0 keeps the pretrained model's own rates, as GPT-1
    # finetuned with its pretraining dropout (0.1; HF GPT-2 / OpenAI-GPT configs say 0.1 too).
    # (A new 0.1 mask on a model pretrained without dropout perturbs the features it learned.)
    c.model_dropout = -1.0

    c.head = ml_collections.ConfigDict()
    c.head.lm_coef = 0.5                 # lambda in L3 = L2 + lambda * L1
    c.head.dropout = 0.1                 # on the extracted features

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 6.25e-5
    c.optim.warmup_fraction = 0.002      # warmup over 0.2% of training
    c.optim.warmup_steps = 0             # used when warmup_fraction < 0
    c.optim.decay_steps = 0              # set to the run's total steps
    c.optim.schedule = "linear"
    c.optim.min_lr = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.grad_clip = 1.0
    c.optim.decay_embeddings = True

    c.train = ml_collections.ConfigDict()
    c.train.epochs = 3
    c.train.batch_size = 32
    c.train.max_steps = 0                # > 0 stops early (quick checks)
    c.train.eval_batch_size = 64
    c.train.log_every = 10
    c.train.length_bucket = 16           # batch lengths round up to this (fewer compilations)
    c.train.predict_test = True          # write the test splits' predictions (GLUE format)

    # finetune.py --mode=zero_shot: the task scored by the LM alone (SST-2, multiple choice).
    c.zero_shot = ml_collections.ConfigDict()
    c.zero_shot.split = ""               # '' = the first dev split
    c.zero_shot.max_examples = 0
    c.zero_shot.normalize = "mean"       # multiple choice: mean (GPT-1) or sum of token log-probs
    c.zero_shot.batch_size = 32

    # finetune.py --mode=analysis: GPT-1 Figure 2 for init.path.
    c.analysis = ml_collections.ConfigDict()
    c.analysis.layers = config_dict.placeholder(tuple)   # None = 0..n_layer
    c.analysis.zero_shot_tasks = ()      # 'task=path' or 'glue/sst2=tfds_data_dir' entries
    c.analysis.zero_shot_examples = 0
    return c
