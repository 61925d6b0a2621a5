"""Every default of an experiment config, written once: configs/ builds on these trees.

`base_config()` is the pretraining experiment (train.py), `finetune_config()` GPT-1's finetuning
recipe (finetune.py); `model_config()` gives every GPTConfig field of a preset so that each is
overridable from the command line. The library reads config fields directly (no
`cfg.get(key, default)`); `complete()` fills a partial config (a test's, a library caller's) from
the matching tree first.
"""

from __future__ import annotations

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


def optim_config(*, learning_rate: float, warmup_steps: int, schedule: str, min_lr: float,
                 b2: float, weight_decay: float) -> ml_collections.ConfigDict:
    """AdamW with warmup, decay and gradient clipping (gptjax.train.optim.make_optimizer).

    The fields pretraining and finetuning set differently are arguments; the others are shared.
    """
    o = ml_collections.ConfigDict()
    o.learning_rate = learning_rate      # the peak
    o.warmup_steps = warmup_steps
    o.decay_steps = 0                    # 0 = the run's total steps
    o.schedule = schedule                # see gptjax.train.optim.SCHEDULES
    o.min_lr = min_lr
    o.b1 = 0.9
    o.b2 = b2
    o.eps = 1e-8
    o.weight_decay = weight_decay
    o.grad_clip = 1.0                    # global gradient norm
    o.decay_embeddings = True
    return o


def _data_config() -> ml_collections.ConfigDict:
    """The `data` block of a pretraining config: the corpus, its splits and batching."""
    d = ml_collections.ConfigDict()
    d.dataset = "python_stdlib"     # or 'local_text' (with path), 'prompt_completion' (with
                                    # path) or any tfds name (data_dir)
    d.data_dir = ""                 # tfds data_dir ('' = gptjax's cache for its builders)
    d.path = ""                     # files / glob for local_text; JSONL files / glob for
                                    # prompt_completion (comma-separated for several)
    d.encoding = "utf-8"            # local_text: the files' encoding (e.g. 'latin-1')
    d.text_key = "text"
    d.val_split = "validation"
    d.validation_fraction = config_dict.placeholder(float)  # None = 0.1 (local_text and
                                    # prompt_completion without val_path)
    # prompt_completion (gptjax.data.prompt_completion): one JSON object per line with a prompt
    # and a completion; prompt and completion are tokenized separately and concatenated, then
    # the tokenizer's end-of-text id (GPT-2's <|endoftext|>) when it has one. The loss counts
    # completion tokens only: batches carry `weights`, 1 where the target is a completion (or
    # end-of-text) token, 0 on prompt and padding (transformers' labels=-100). Validation: the
    # rows of val_path, else validation_fraction of path's rows (a fixed seed-0 choice); its
    # loss is completion-only too. A row may have at most seq_len + 1 tokens.
    d.prompt_key = "prompt"
    d.completion_key = "completion"
    d.val_path = ""                 # JSONL file / glob of validation rows ('' = a fraction)
    # 'pad': one row per sequence, right-padded (weight 0); 'pack': rows concatenated in file
    # order and cut into windows like plain text (a row then attends to the earlier rows in
    # its window unless data.document_mask). data.sampling applies to both ('pad': 'packed' = each
    # row once per epoch in a permutation, 'random_offset' = rows drawn with replacement).
    d.pc_layout = "pad"
    d.max_train_bytes = 0           # python_stdlib: cap on the train split (0 = builder default)
    d.seq_len = 0                   # 0 = model.n_ctx
    d.sampling = "packed"           # 'packed' windows or nanoGPT's 'random_offset'
    d.cache_dir = ""                # '' = ~/.cache/gptjax
    # 'single': one process tokenizes each split into one cached file that every process reads
    # (small corpora); 'sharded': each process reads and tokenizes only its virtual shards of the
    # train split, with data.workers grain worker processes, into its own data.cache_dir
    # (gptjax.data.sharded; pods with no shared disk). The global batch is the same for any
    # number of processes in both.
    d.pipeline = "single"
    d.virtual_shards = 1024         # sharded: documents i -> shard i mod this; fixed per run
    d.workers = 2                   # sharded: grain tokenizer processes (0 = in-process)
    d.prefetch = 2                  # batches built ahead on a thread (0 = on demand)
    # Document-masked packing (gptjax.data.documents): each token attends only within its own
    # document of a packed window (documents are split at the end-of-text token, which opens
    # the next one); works with every pipeline, sampling and pc_layout, and in evaluation.
    d.document_mask = False
    d.position_restart = True       # with document_mask: positions restart at each document
    # Weighted corpora (gptjax.data.mixture); () = the one corpus above. One string per corpus,
    # 'name=web;weight=0.7;dataset=local_text;path=web/*.txt': it takes the data.* fields it
    # names (dataset, path, data_dir, encoding, text_key, validation_fraction, max_train_bytes)
    # and the run's for the others, and keeps its own token cache / shards. A row's corpus is a
    # pure function of (seed, step, row); weights are normalized.
    d.mixture = ()
    # Weight changes: 'step:name=w,name=w' entries (from that step on; corpora not named keep
    # their weight; 1 <= step < train.steps). Changing weights retokenizes nothing.
    d.mixture_schedule = ()
    return d


def base_config() -> ml_collections.ConfigDict:
    """The pretraining experiment (train.py): every field a config may override, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Where the first step starts from (train_init). With kind 'hf' or 'workdir' the architecture
    # and the tokenizer are the pretrained model's: `model` (but its execution, see
    # init.execution) and `tokenizer` are then not used.
    c.init = train_init()
    c.model = model_config("tiny", vocab_size=0)
    c.model_vocab_multiple = 1
    c.lora = lora_config()

    c.data = _data_config()

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "sentencepiece"   # a gptjax.data.tokenizers.KINDS name
    c.tokenizer.vocab_size = 1024        # sentencepiece only
    c.tokenizer.path = ""                # gpt2_bpe: directory with encoder.json + vocab.bpe
    c.tokenizer.user_defined_symbols = ()  # sentencepiece: strings kept as single pieces
    # Documents the tokenizer is built from: 0 = all of its split(s); N = N evenly spaced ones
    # (a pod-scale corpus: process 0 trains SentencePiece on a sample, every host reads it from
    # the run directory). Keep 0 for 'char', where a sample can miss a character.
    c.tokenizer.train_docs = 0

    c.optim = optim_config(learning_rate=1e-3, warmup_steps=100, schedule="cosine", min_lr=1e-4,
                           b2=0.99, weight_decay=0.1)

    c.train = _train_config()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.mesh.rules = config_dict.placeholder(list)   # None = gptjax.sharding.DEFAULT_RULES
    c.mesh.dcn = ml_collections.ConfigDict()       # axis sizes across slices/hosts (DCN);
    c.mesh.dcn.data = 1                            # all ones = a single slice
    c.mesh.dcn.fsdp = 1
    c.mesh.dcn.tensor = 1

    c.sample = ml_collections.ConfigDict()
    c.sample.prompt = ""
    c.sample.max_new_tokens = 200
    c.sample.temperature = 0.8
    c.sample.top_k = 40
    return c


def _train_config() -> ml_collections.ConfigDict:
    """The `train` block of base_config: steps, batch, evaluation, checkpoints, faults."""
    t = ml_collections.ConfigDict()
    t.steps = 1000
    t.epochs = 0.0                 # > 0: train.steps := ceil(epochs x train-split tokens /
                                   # (batch_size x seq_len)), experiment.resolve_steps
    t.batch_size = 12
    t.accum_steps = 1
    # Resumed on another number of devices or processes than its checkpoint was saved on, keep
    # the global batch and the per-device micro-batch: accum_steps becomes batch_size /
    # (data-parallel size x the saved micro-batch), one line says so, and it goes back down when
    # the devices return (gptjax.train.elastic). False: the config's accum_steps on any devices.
    t.elastic = False
    t.log_every = 10
    t.eval_every = 250
    t.eval_batches = 20            # per periodic evaluation; the final one uses the whole split
    t.eval_batch_size = 64
    # In-training evaluation (gptjax.train.evals): 'kind:key=value;key=value' strings, kinds
    # fewshot, zeroshot, perplexity, lm_eval (gptjax.eval.in_training), run every evals_every
    # steps (0 = eval_every) and at the last on the live parameters; each number is logged as
    # eval/<name>/<metric>, and evals.png plots them against the step.
    t.evals = ()
    t.evals_every = 0
    t.save_every = 500
    t.keep_checkpoints = 3
    t.async_checkpointing = True
    # The local checkpoint tier (gptjax.runs.local_tier): every local_save_every steps each
    # process also saves the shards it holds under local_dir (a host's own disk: node-local SSD),
    # in <local_dir>/<run name>-<run id>/process_<i>/, keeping the last local_keep; a restart takes
    # the newest intact step of both tiers (a local one only if every process has it, on the same
    # layout). '' = off: checkpoints go to the run directory only (train.save_every).
    t.local_dir = ""
    t.local_save_every = 100
    t.local_keep = 2
    t.nonfinite = "skip"           # 'skip' the update or 'halt' the run
    t.max_consecutive_skips = 20   # 'skip': so many skipped steps in a row stop the run
                                   # (a state that no longer updates); 0 = never stop
    # The loss-spike guard (gptjax.train.spikes): 'median' skips a step whose loss is above
    # spike_threshold x the median of the last spike_window trained steps' losses, 'zscore' one
    # above their mean + spike_threshold standard deviations; each spike is recorded in
    # spikes.jsonl (skipped again on resume); spike_max of them within spike_window steps stop
    # the run (0 = never stop). 'off': the train step's program is main's; 'zscore' with these
    # defaults leaves `python train.py`'s metrics bit for bit as they were (README, Reliability).
    t.spike_guard = "zscore"
    t.spike_threshold = 6.0
    t.spike_window = 128
    t.spike_max = 4
    # Per-layer statistics (gptjax.train.layer_stats): every layer_stats_every steps the step also
    # returns each layer's parameter, gradient and update norms, update/parameter ratio and
    # block-output RMS, logged as layers/<i>/<name> (metrics.jsonl, TensorBoard, layers.png); a
    # second compiled step. 0 = off: the train step's program is the one without them.
    t.layer_stats_every = 0
    return t


def train_init() -> ml_collections.ConfigDict:
    """The `init` block of a train.py config: the weights the first step starts from.

    kind 'scratch' (random init of `model`, a tokenizer built as `tokenizer` says), 'hf' (a local
    transformers GPT-2 / OpenAI-GPT directory at `path`) or 'workdir' (a train.py work directory
    at `path`). With 'hf'/'workdir' the run's architecture and tokenizer are the pretrained
    model's (saved into the run's tokenizer/ and model_config.json; `model` and `tokenizer` are
    not used); a resumed run continues from its own checkpoint (gptjax.train.start).
    """
    i = ml_collections.ConfigDict()
    i.kind = "scratch"
    i.path = ""
    i.step = -1                          # workdir: its checkpoint step; <= 0 = the latest
    i.tokenizer_path = ""                # hf: GPT-2 BPE files (default: init.path) or a gptjax
                                         # tokenizer directory
    i.execution = ""                     # hf/workdir: the execution to train with, e.g.
                                         # 'remat=full,attn_pdrop=0.0' (gptjax.config
                                         # .parse_execution); '' = the pretrained model's
    return i


def lora_config() -> ml_collections.ConfigDict:
    """The `lora` block of a train.py config (gptjax.nn.lora): rank 0 trains every parameter.

    rank > 0 trains only the adapters of `targets` over the frozen pretrained base (init.kind
    'hf' or 'workdir'), held in `base_weights` ('fp32', or weight-only 'bf16'/'int8': QLoRA-style).
    """
    lo = ml_collections.ConfigDict()
    lo.rank = 0                          # 0 = off (full finetuning)
    lo.alpha = 16.0                      # the branch is scaled by alpha / rank
    lo.dropout = 0.0                     # on the branch's input, while training
    lo.targets = "attn.c_attn"           # comma-separated: attn.c_attn, attn.c_proj, mlp.c_fc,
                                         # mlp.c_proj (or PEFT's c_attn, c_proj, c_fc; all)
    lo.base_weights = "fp32"             # the frozen base: fp32, bf16 or int8 (gptjax.nn.quant)
    return lo


def finetune_config(task: str, path: str = "", **task_fields) -> ml_collections.ConfigDict:
    """GPT-1's finetuning recipe (Radford et al. 2018, section 4.1) for `task` (a
    gptjax.data.tasks.TASKS name) read from `path`.

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
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.task = _finetune_task(task, path, task_fields)

    c.init = _finetune_init()

    # Used only by init.kind='scratch' (the architecture and tokenizer of a random-init model).
    c.model = model_config("tiny", vocab_size=0)
    c.model_vocab_multiple = 1
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.kind = "gpt2_bpe"        # a gptjax.data.tokenizers.KINDS name (char and
    c.tokenizer.path = "../shared/data/gpt2_bpe"  # sentencepiece: built from the task's texts)
    c.tokenizer.vocab_size = 2048

    # Decoder dropout (embd/attn/resid): < 0 keeps the pretrained model's own rates, as GPT-1
    # finetuned with its pretraining dropout (0.1; HF GPT-2 / OpenAI-GPT configs say 0.1 too).
    # (A new 0.1 mask on a model pretrained without dropout perturbs the features it learned.)
    c.model_dropout = -1.0

    c.head = ml_collections.ConfigDict()
    c.head.lm_coef = 0.5                 # lambda in L3 = L2 + lambda * L1
    c.head.dropout = 0.1                 # on the extracted features

    # rank > 0 freezes the decoder and trains LoRA adapters, the three task-token rows and the
    # head (gptjax.finetune.lora); the same fields as train.py's.
    c.lora = lora_config()

    c.optim = optim_config(learning_rate=6.25e-5, warmup_steps=0, schedule="linear", min_lr=0.0,
                           b2=0.999, weight_decay=0.01)
    c.optim.warmup_fraction = 0.002      # warmup over 0.2% of training (warmup_steps if < 0)

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


def _finetune_task(task: str, path: str, task_fields: dict) -> ml_collections.ConfigDict:
    """The `task` block of a finetuning config: which task, where its files are, which subset."""
    t = ml_collections.ConfigDict()
    t.name = task
    t.path = path                        # directory in the task's standard file layout
    t.data_dir = ""                      # a tfds data_dir holding the task (glue/sst2, ...);
                                         # when set, it is read instead of path
    t.subset = ""                        # RACE 'high'/'middle', MCTest 'mc160'/'mc500'
    t.max_len = 0                        # longest transformed input; 0 = the model's n_ctx
    t.train_examples = 0                 # > 0: a fixed random subset of the training split
    t.eval_examples = 0                  # > 0: a fixed random subset of each dev split
    t.update(task_fields)
    return t


def _finetune_init() -> ml_collections.ConfigDict:
    """The `init` block of a finetuning config: where the decoder comes from.

    kind 'workdir' (a train.py work directory), 'hf' (a transformers GPT-2 / OpenAI-GPT
    directory, or OpenAI's TF checkpoint), or 'scratch' (random init).
    """
    i = ml_collections.ConfigDict()
    i.kind = "workdir"
    i.path = ""
    i.tokenizer_path = ""                # hf: GPT-2 BPE files (default: init.path) or a gptjax
                                         # tokenizer directory
    i.transfer_layers = -1               # pretrained blocks kept (-1 = all; GPT-1 Figure 2)
    i.transfer_embeddings = True
    i.execution = ""                     # workdir/hf: execution overrides of the pretrained
                                         # decoder, e.g. 'attention_impl=xla,remat=full'
    return i


def complete(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict
             ) -> ml_collections.ConfigDict:
    """`defaults` with every field that `config` sets taken from `config` (a new ConfigDict).

    Fields of `config` that `defaults` lacks are kept too (the experiment checks name unknown
    keys), so a partial config gets every default and a full one is returned unchanged.
    """
    out = ml_collections.ConfigDict(defaults.to_dict(), type_safe=False)
    _merge(out, config)
    return out


def _merge(into: ml_collections.ConfigDict, src: ml_collections.ConfigDict) -> None:
    for key, value in src.items():
        if isinstance(value, ml_collections.ConfigDict) and isinstance(
                into.get(key), ml_collections.ConfigDict) and key != "model":
            _merge(into[key], value)
        else:
            into[key] = value
