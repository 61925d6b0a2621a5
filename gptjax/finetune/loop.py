"""Finetuning (GPT-1 section 3.2), zero-shot evaluation (section 5) and the layer-transfer analysis.

`finetune(config, workdir)` trains one pretrained decoder plus a linear head on a task with
L3 = L2 + lambda * L1 (see gptjax.finetune.heads), evaluates the dev split(s) after every epoch, keeps the
best checkpoint and writes the test predictions in the GLUE submission format. The decoder comes
from a train.py work directory, an imported Hugging Face / OpenAI directory, or random init
(`config.init.kind`: 'workdir', 'hf', 'scratch'); `init.transfer_layers` keeps only the first n
pretrained blocks, the rest freshly initialised (GPT-1 Figure 2, left).

`zero_shot(config, workdir)` scores a task with the language model alone: multiple choice by the
average log-probability of each answer given the context, SST-2 by appending " very" and comparing
" positive" with " negative". `layer_transfer_analysis` runs both of GPT-1's analyses and writes a
table and a PNG.

A work directory holds: config.json, model_config.json, finetune.json (task, head, special
tokens), tokenizer/, metrics.jsonl (train records every `log_every` steps, dev metrics every
epoch), checkpoints/ (the best epoch only), predictions/ (e.g. SST-2.tsv), summary.json, loss.png.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gptjax.finetune import heads
from gptjax.train.checkpoint import Checkpointer, CheckpointError
from gptjax.config import GPTConfig
from gptjax.train.losses import token_nll
from gptjax.nn.model import GPT, abstract_params, init_params, stack_layers, unstack_layers
from gptjax.train.optim import make_optimizer
from gptjax.finetune.metrics import compute_metrics
from gptjax.data.tasks import TASKS, Example, TaskSpec, get_task, load_task, write_predictions
from gptjax.train.loop import MetricsWriter, TrainState

INIT_KINDS = ("workdir", "hf", "scratch")


# ================================================================================ the decoder
def load_pretrained(init: ml_collections.ConfigDict, step: Optional[int] = None):
    """(GPTConfig, params, tokenizer) of a pretrained decoder named by `config.init`.

    Args:
      init: kind 'workdir' (a train.py work directory at `path`, its latest checkpoint or
        `step`) or 'hf' (a transformers / OpenAI GPT-2 directory at `path`; the tokenizer is the
        GPT-2 or OpenAI GPT BPE files in `tokenizer_path` or `path`, or a saved gptjax tokenizer
        directory).
      step: a pretraining checkpoint step (workdir only); None = the latest.
    """
    from gptjax.data import tokenizers as toks
    from gptjax.nn.convert import from_hf
    from gptjax.train.loop import load_workdir

    if not init.path:
        raise ValueError(f"init.kind={init.kind!r} needs init.path (a train.py work directory "
                         "or a Hugging Face / OpenAI model directory)")
    if init.kind == "workdir":
        # Parameters only, as uncommitted single-device arrays: the jitted steps here compile
        # once (arrays placed on the trainer's mesh would make each compile twice).
        return load_workdir(init.path, step)
    if init.kind != "hf":
        raise ValueError(f"init.kind={init.kind!r}: load_pretrained takes 'workdir' or 'hf'")
    model_cfg, params = from_hf(init.path)
    tok_path = init.get("tokenizer_path") or init.path
    if os.path.isfile(os.path.join(tok_path, "tokenizer.json")) and not os.path.isfile(
            os.path.join(tok_path, "vocab.json")):
        tokenizer = toks.load_tokenizer(tok_path)  # a gptjax tokenizer saved with .save()
    else:
        tokenizer = toks.from_hf_files(tok_path)  # GPT-2 byte BPE or GPT-1's BPE
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(f"tokenizer in {tok_path!r} has {tokenizer.vocab_size} ids but the model "
                         f"in {init.path!r} only {model_cfg.vocab_size} embeddings")
    return model_cfg, params, tokenizer


def transfer_layers(config: GPTConfig, pretrained: dict, fresh: dict, n_layers: int,
                    embeddings: bool = True) -> dict:
    """Pretrained parameters for the embeddings and the first `n_layers` blocks, fresh elsewhere.

    Args:
      config: the (shared) architecture of both parameter trees.
      pretrained: pretrained decoder parameters.
      fresh: randomly initialised parameters of the same architecture.
      n_layers: blocks to transfer, 0..n_layer (-1 = all).
      embeddings: also transfer the non-block parameters (wte, wpe, ln_f, an untied lm_head).
        GPT-1's Figure 2 always transfers the embeddings; 0 layers means embeddings only.

    Returns:
      The mixed parameters, in the layout of `config` (scan or per-layer).
    """
    L = config.n_layer
    n = L if n_layers < 0 else n_layers
    if not 0 <= n <= L:
        raise ValueError(f"transfer_layers={n_layers}: allowed values are -1 (all) or 0..{L}")
    pre = unstack_layers(config, pretrained) if "h" in pretrained else dict(pretrained)
    new = unstack_layers(config, fresh) if "h" in fresh else dict(fresh)
    out = {}
    for name in new:
        if name.startswith("h_"):
            out[name] = pre[name] if int(name[2:]) < n else new[name]
        else:
            out[name] = pre[name] if embeddings else new[name]
    return stack_layers(config, out) if config.scan_layers else out


def _scratch_tokenizer(config: ml_collections.ConfigDict, texts: Sequence[str], workdir: str):
    from gptjax.data import tokenizers as toks

    tc = config.tokenizer
    if tc.kind == "gpt2_bpe":
        return toks.GPT2BPETokenizer.from_files(tc.path)
    if tc.kind == "char":
        # unknown='skip': dev/test may hold characters the train split never shows.
        return toks.CharTokenizer.from_text("".join(texts), unknown="skip")
    if tc.kind == "sentencepiece":
        return toks.SentencePieceTokenizer.train(list(texts), os.path.join(workdir, "tokenizer"),
                                                 tc.vocab_size)
    raise ValueError(f"tokenizer.kind={tc.kind!r}: allowed values are "
                     "['char', 'sentencepiece', 'gpt2_bpe']")


def init_decoder(config: ml_collections.ConfigDict, rng: jax.Array, workdir: str = "",
                 texts: Sequence[str] = ()):
    """The decoder to finetune, before the task tokens are added.

    Args:
      config: the finetuning config (`init`, `model`, `tokenizer`, `model_dropout`).
      rng: key for fresh parameters (scratch init, untransferred layers).
      workdir: where a scratch SentencePiece tokenizer is trained.
      texts: the task's training texts (scratch char / SentencePiece tokenizers).

    Returns:
      (GPTConfig with the finetuning dropout, params, tokenizer).
    """
    from gptjax.train.loop import model_config_from

    init = config.init
    if init.kind not in INIT_KINDS:
        raise ValueError(f"init.kind={init.kind!r}: allowed values are {list(INIT_KINDS)}")
    if init.kind == "scratch":
        tokenizer = _scratch_tokenizer(config, texts, workdir)
        model_cfg = model_config_from(config, tokenizer.vocab_size)
        params = init_params(model_cfg, rng)
    else:
        model_cfg, params, tokenizer = load_pretrained(init)
        n = init.get("transfer_layers", -1)
        emb = init.get("transfer_embeddings", True)
        if n not in (-1, model_cfg.n_layer) or not emb:
            fresh = init_params(model_cfg, rng)
            params = transfer_layers(model_cfg, jax.device_get(params), fresh, n, emb)
    p = config.get("model_dropout", -1.0)
    if p >= 0:
        model_cfg = model_cfg.replace(embd_pdrop=p, attn_pdrop=p, resid_pdrop=p)
    return model_cfg, params, tokenizer


# ================================================================================ encoding
@dataclasses.dataclass
class EncodedSplit:
    """A split after GPT-1's input transformation: tokens [N, K, T], lengths [N, K], labels [N]."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray
    examples: list

    def __len__(self) -> int:
        return len(self.examples)


def encode_examples(examples: Sequence[Example], spec: TaskSpec, tokenizer,
                    special: heads.SpecialTokens, max_len: int) -> EncodedSplit:
    """Tokenizes and transforms a split (see heads.transform); unlabelled examples get label 0.

    Raises:
      ValueError: a multiple-choice example with another number of candidates than the task's.
    """
    if not examples:
        raise ValueError(f"task {spec.name!r}: the split to encode is empty")
    seqs = []
    for ex in examples:
        if spec.task_type == "multiple_choice" and len(ex.choices) != spec.num_choices:
            raise ValueError(f"{spec.name} example {ex.idx!r} has {len(ex.choices)} choices; the "
                             f"task has {spec.num_choices}")
        seqs.append(heads.transform(
            spec.task_type, special, max_len, tokenizer.encode(ex.text_a),
            tokenizer.encode(ex.text_b) if ex.text_b is not None else None,
            [tokenizer.encode(c) for c in ex.choices]))
    longest = max(len(s) for k in seqs for s in k)
    tokens, lengths = heads.pack(seqs, longest)
    dtype = np.float32 if spec.regression else np.int32
    labels = np.array([0 if ex.label is None else ex.label for ex in examples], dtype)
    return EncodedSplit(tokens, lengths, labels, list(examples))


def _round_up(x: int, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


def make_batch(enc: EncodedSplit, rows: np.ndarray, batch_size: int, bucket: int = 16,
               max_len: int = 0) -> dict:
    """Rows of a split as one fixed-size batch: padding rows repeat row 0 with weight 0.

    The length is the batch's longest sequence rounded up to `bucket` (at most `max_len` when
    given), so few shapes compile while short batches skip most of the padding; a bucket of
    max_len gives every batch of every split one shape.
    """
    n = len(rows)
    idx = np.concatenate([rows, np.full(batch_size - n, rows[0])]).astype(np.int64)
    lengths = enc.lengths[idx]
    T = _round_up(int(lengths.max()), bucket)
    if max_len:
        T = min(T, max_len)
    width = enc.tokens.shape[-1]
    tokens = enc.tokens[idx, :, :T]
    if T > width:
        tokens = np.pad(tokens, ((0, 0), (0, 0), (0, T - width)))
    return {"tokens": tokens, "lengths": lengths, "labels": enc.labels[idx],
            "weights": (np.arange(batch_size) < n).astype(np.float32)}


def epoch_batches(enc: EncodedSplit, batch_size: int, seed: int, epoch: int,
                  bucket: int = 16, max_len: int = 0) -> Iterator[dict]:
    """One shuffled pass over a split; the permutation depends only on (seed, epoch)."""
    perm = np.random.default_rng([seed, epoch]).permutation(len(enc))
    for start in range(0, len(enc), batch_size):
        yield make_batch(enc, perm[start:start + batch_size], batch_size, bucket, max_len)


# ================================================================================ steps
def make_train_step(model_cfg: GPTConfig, head_cfg: heads.HeadConfig,
                    optimizer: optax.GradientTransformation, schedule):
    """A pure step `(state, batch, rng) -> (state, metrics)`; dropout key fold_in(rng, step)."""

    def loss_fn(params, batch, rng):
        return heads.finetune_loss(model_cfg, params, batch, head_cfg, deterministic=False,
                                   rng=rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        (loss, aux), grads = grad_fn(state.params, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "task_loss": aux["task_loss"], "lm_loss": aux["lm_loss"],
                   "grad_norm": optax.global_norm(grads), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


@functools.lru_cache(maxsize=8)
def _jitted_train_step(model_cfg: GPTConfig, head_cfg: heads.HeadConfig, optim_json: str,
                       total_steps: int):
    """(optimizer, schedule, jitted step), cached by value: the runs of an analysis (and tests)
    that share architecture, head and schedule compile their step once."""
    oc = ml_collections.ConfigDict(json.loads(optim_json))
    optimizer, schedule = make_optimizer(oc, total_steps)
    step = jax.jit(make_train_step(model_cfg, head_cfg, optimizer, schedule),
                   donate_argnums=(0,))
    return optimizer, schedule, step


@functools.partial(jax.jit, static_argnums=(0, 1))
def _outputs(model_cfg: GPTConfig, head_cfg: heads.HeadConfig, params, tokens, lengths):
    # Only the head outputs are returned, so XLA drops the unused LM-logit matmul.
    return heads.forward(model_cfg, params, tokens, lengths, head_cfg, deterministic=True)[0]


def predict(model_cfg: GPTConfig, head_cfg: heads.HeadConfig, params, enc: EncodedSplit,
            batch_size: int = 64, bucket: int = 16,
            max_len: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Head outputs and predictions (class, candidate or regression value) for a whole split."""
    outs = []
    for start in range(0, len(enc), batch_size):
        rows = np.arange(start, min(start + batch_size, len(enc)))
        b = make_batch(enc, rows, batch_size, bucket, max_len)
        out = np.asarray(_outputs(model_cfg, head_cfg, params, b["tokens"], b["lengths"]))
        outs.append(out[: len(rows)])
    outputs = np.concatenate(outs)
    preds = outputs if head_cfg.regression else outputs.argmax(-1)
    return outputs, preds


def split_metrics(spec: TaskSpec, enc: EncodedSplit, preds: np.ndarray) -> dict:
    """The task's metrics on a labelled split."""
    if any(ex.label is None for ex in enc.examples):
        raise ValueError(f"{spec.name}: cannot score a split with unlabelled examples")
    return compute_metrics(spec.metrics, preds, enc.labels)


# ================================================================================ the loop
def _optim_config(config: ml_collections.ConfigDict, total_steps: int) -> ml_collections.ConfigDict:
    oc = copy.deepcopy(config.optim)
    with oc.unlocked():
        frac = oc.get("warmup_fraction", -1.0)
        if frac >= 0:
            # GPT-1: "linear learning rate decay schedule with warmup over 0.2% of training".
            oc.warmup_steps = int(math.ceil(frac * total_steps))
        oc.decay_steps = total_steps
    return oc


def _head_config(config: ml_collections.ConfigDict, spec: TaskSpec) -> heads.HeadConfig:
    return heads.HeadConfig(task_type=spec.task_type, num_labels=spec.num_labels,
                            lm_coef=float(config.head.lm_coef), dropout=float(config.head.dropout))


def _finite(x: float) -> float:
    """NaN (e.g. Pearson of constant predictions) ranks below every number."""
    return x if math.isfinite(x) else -math.inf


def _subset(examples: list, n: int, seed: int) -> list:
    if n <= 0 or n >= len(examples):
        return examples
    keep = np.sort(np.random.default_rng([seed, 1]).permutation(len(examples))[:n])
    return [examples[i] for i in keep]


def load_task_from_config(config: ml_collections.ConfigDict, splits: Sequence[str]):
    """The config's task: `task.name` from the tfds `task.data_dir` when set, else from the
    files at `task.path`; `task.subset` for RACE / MCTest."""
    tc = config.task
    data_dir = tc.get("data_dir", "")
    return load_task(tc.name, "" if data_dir else tc.get("path", ""), data_dir=data_dir,
                     splits=splits, subset=tc.get("subset", ""))


def _write_run_files(workdir: str, config, spec: TaskSpec, model_cfg: GPTConfig,
                     head_cfg: heads.HeadConfig, special: heads.SpecialTokens, tokenizer,
                     max_len: int) -> None:
    """What makes a run directory self-contained: load_finetuned needs nothing else."""
    tokenizer.save(os.path.join(workdir, "tokenizer"))
    with open(os.path.join(workdir, "config.json"), "w") as fh:
        fh.write(config.to_json_best_effort(indent=2))
    with open(os.path.join(workdir, "model_config.json"), "w") as fh:
        json.dump(model_cfg.to_dict(), fh, indent=2)
    with open(os.path.join(workdir, "finetune.json"), "w") as fh:
        json.dump({"task": spec.name, "head": dataclasses.asdict(head_cfg),
                   "special_tokens": special.to_dict(), "max_len": max_len}, fh, indent=2)


def finetune(config: ml_collections.ConfigDict, workdir: str, progress: bool = True) -> dict:
    """Finetunes as `config` says (see gptjax/defaults.py (finetune_config)) into a new `workdir`.

    Returns:
      The summary (also written to summary.json): best epoch and its dev metrics, per-epoch dev
      metrics, prediction files, wall time; plus 'params', 'model_config', 'head_config',
      'tokenizer' and 'special' of the best epoch for callers in Python.
    """
    from gptjax.plotting import plot_metrics

    t0 = time.time()
    workdir = os.path.abspath(workdir)
    if os.path.exists(os.path.join(workdir, "summary.json")) or os.path.isdir(
            os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir} already holds a finetuning run; use another --workdir")
    os.makedirs(workdir, exist_ok=True)
    spec = get_task(config.task.name)
    tc = config.train
    if tc.epochs < 1 or tc.batch_size < 1:
        raise ValueError(f"train.epochs={tc.epochs}, train.batch_size={tc.batch_size}: both "
                         "must be >= 1")
    wanted = [spec.train_split, *spec.dev_splits]
    if tc.get("predict_test", True):
        wanted += list(spec.test_splits)
    data = load_task_from_config(config, wanted)
    print(data.report(), flush=True)
    train_ex = _subset(data.splits[spec.train_split], config.task.get("train_examples", 0),
                       config.seed)
    dev_ex = {s: _subset(data.splits[s], config.task.get("eval_examples", 0), config.seed)
              for s in spec.dev_splits}

    rng = jax.random.key(config.seed)
    k_dec, k_tok, k_head, k_train = jax.random.split(rng, 4)
    texts = [t for ex in train_ex for t in (ex.text_a, ex.text_b, *ex.choices) if t]
    model_cfg, dec_params, tokenizer = init_decoder(config, k_dec, workdir, texts)
    model_cfg, dec_params, special = heads.add_special_tokens(model_cfg, dec_params, k_tok)
    head_cfg = _head_config(config, spec)
    params = {"decoder": dec_params,
              "head": heads.init_head(k_head, head_cfg, model_cfg.n_embd)}
    max_len = min(config.task.get("max_len", 0) or model_cfg.n_ctx, model_cfg.n_ctx)

    enc_train = encode_examples(train_ex, spec, tokenizer, special, max_len)
    enc_dev = {s: encode_examples(ex, spec, tokenizer, special, max_len)
               for s, ex in dev_ex.items()}

    _write_run_files(workdir, config, spec, model_cfg, head_cfg, special, tokenizer, max_len)

    bs = tc.batch_size
    steps_per_epoch = int(math.ceil(len(enc_train) / bs))
    total_steps = tc.epochs * steps_per_epoch
    if tc.get("max_steps", 0) > 0:
        total_steps = min(total_steps, tc.max_steps)
    optimizer, _, train_step = _jitted_train_step(
        model_cfg, head_cfg, _optim_config(config, total_steps).to_json(sort_keys=True),
        total_steps)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       opt_state=optimizer.init(params))
    bucket = tc.get("length_bucket", 16)
    main_key = f"{spec.dev_splits[0]}_{spec.main_metric}"
    print(f"finetune {spec.name} ({spec.task_type}): {len(enc_train)} train examples, "
          f"{steps_per_epoch} steps/epoch, {total_steps} steps; decoder {model_cfg.n_layer} x "
          f"{model_cfg.n_embd}, vocab {model_cfg.vocab_size} (+3 task tokens), max_len "
          f"{max_len}; init {config.init.kind}", flush=True)

    writer = MetricsWriter(workdir)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1,
                        async_save=False)
    pbar = None
    if progress:
        from tqdm.auto import tqdm
        pbar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
    best, best_params, history = None, None, []
    log_every = max(1, tc.get("log_every", 10))
    step = 0
    try:
        for epoch in range(tc.epochs):
            if step >= total_steps:
                break
            for batch in epoch_batches(enc_train, bs, config.seed, epoch, bucket,
                                       max_len):
                if step >= total_steps:
                    break
                state, m = train_step(state, batch, k_train)
                step += 1
                if step % log_every == 0 or step == total_steps:
                    m = {k: float(v) for k, v in jax.device_get(m).items()}
                    if not math.isfinite(m["loss"]):
                        raise FloatingPointError(f"non-finite finetuning loss at step {step}; "
                                                 f"lower optim.learning_rate "
                                                 f"({config.optim.learning_rate})")
                    writer.write(dict(step=step, epoch=epoch + 1, **m))
                    if pbar is not None:
                        pbar.set_postfix(epoch=epoch + 1, loss=f"{m['loss']:.4f}",
                                         task=f"{m['task_loss']:.4f}", refresh=False)
                if pbar is not None:
                    pbar.update(1)
            rec = {"step": step, "epoch": epoch + 1}
            for s, enc in enc_dev.items():
                _, preds = predict(model_cfg, head_cfg, state.params, enc,
                                   tc.get("eval_batch_size", 64), bucket, max_len)
                rec.update({f"{s}_{k}": v for k, v in split_metrics(spec, enc, preds).items()})
            writer.write(rec)
            history.append(rec)
            msg = ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k not in ("step", "epoch"))
            (pbar.write if pbar is not None else print)(f"epoch {epoch + 1}: {msg}")
            if best is None or _finite(rec[main_key]) > _finite(best[main_key]):
                best = rec
                best_params = jax.device_get(state.params)
                ckpt.save(step, {"params": state.params},
                          {"epoch": epoch + 1, "step": step, "metrics": rec}, force=True)
    finally:
        if pbar is not None:
            pbar.close()
        ckpt.close()
        writer.close()

    pred_files = []
    if tc.get("predict_test", True):
        os.makedirs(os.path.join(workdir, "predictions"), exist_ok=True)
        for s in spec.test_splits:
            enc = encode_examples(data.splits[s], spec, tokenizer, special, max_len)
            _, preds = predict(model_cfg, head_cfg, best_params, enc,
                               tc.get("eval_batch_size", 64), bucket, max_len)
            pred_files.append(write_predictions(
                os.path.join(workdir, "predictions", spec.submission_file(s)), spec,
                enc.examples, preds))
    summary = {"task": spec.name, "main_metric": main_key, "best_epoch": best["epoch"],
               "best_step": best["step"], "best": best, "history": history,
               "train_examples": len(enc_train), "steps": step, "predictions": pred_files,
               "init": config.init.kind, "wall_time_s": time.time() - t0}
    with open(os.path.join(workdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)
    plot_metrics(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss.png"),
                 title=f"finetune {spec.name}")
    print(f"done: best {main_key} {best[main_key]:.4f} at epoch {best['epoch']}; "
          f"wall {summary['wall_time_s']:.0f}s; {workdir}", flush=True)
    return dict(summary, params=best_params, model_config=model_cfg, head_config=head_cfg,
                tokenizer=tokenizer, special=special)


@dataclasses.dataclass
class Finetuned:
    """A finetuned model loaded back from its work directory."""

    model_config: GPTConfig
    head_config: heads.HeadConfig
    params: dict
    tokenizer: Any
    special: heads.SpecialTokens
    spec: TaskSpec
    max_len: int
    meta: dict


def load_finetuned(workdir: str) -> Finetuned:
    """The best checkpoint of a `finetune` work directory, with what it needs to predict."""
    from gptjax.data import tokenizers as toks

    workdir = os.path.abspath(workdir)
    info_path = os.path.join(workdir, "finetune.json")
    if not os.path.isfile(info_path):
        raise CheckpointError(f"{workdir} is not a finetuning work directory (no finetune.json)")
    with open(info_path) as fh:
        info = json.load(fh)
    with open(os.path.join(workdir, "model_config.json")) as fh:
        model_cfg = GPTConfig.from_dict(json.load(fh))
    head_cfg = heads.HeadConfig(**info["head"])
    abstract = {"params": {
        "decoder": abstract_params(model_cfg),
        "head": jax.eval_shape(lambda: heads.init_head(jax.random.key(0), head_cfg,
                                                       model_cfg.n_embd))}}
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
    try:
        state, meta = ckpt.restore(abstract)
    finally:
        ckpt.close()
    return Finetuned(model_cfg, head_cfg, state["params"],
                     toks.load_tokenizer(os.path.join(workdir, "tokenizer")),
                     heads.SpecialTokens(**info["special_tokens"]), get_task(info["task"]),
                     info["max_len"], meta)


# ================================================================================ zero-shot
@functools.partial(jax.jit, static_argnums=0)
def _continuation_logprob(model_cfg: GPTConfig, params, tokens_BxT, weights_BxT):
    logits_BxTxV = GPT(model_cfg).apply({"params": params}, tokens_BxT)
    targets_BxT = jnp.concatenate([tokens_BxT[:, 1:], jnp.zeros_like(tokens_BxT[:, :1])], 1)
    nll_BxT = token_nll(logits_BxTxV, targets_BxT)
    return -jnp.sum(nll_BxT * weights_BxT, -1), jnp.sum(weights_BxT, -1)


def score_continuations(model_cfg: GPTConfig, params, pairs: Sequence[tuple],
                        batch_size: int = 32, bucket: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood of each continuation given its context, under the language model alone.

    Contexts too long for n_ctx lose their beginning. Pairs are batched longest-first and
    right-padded (padding is causal-invisible), so batching never changes a score.

    Args:
      model_cfg, params: the decoder.
      pairs: (context ids, continuation ids); both non-empty (the first token has no prediction).
      batch_size: sequences per forward pass.
      bucket: padded lengths are multiples of this (fewer compilations).

    Returns:
      (sum of log-probabilities, number of continuation tokens), each [len(pairs)].
    """
    seqs, starts = [], []
    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise ValueError(f"pair {i}: context and continuation must be non-empty token lists")
        cont = list(cont)[: model_cfg.n_ctx - 1]
        ctx = list(ctx)[-(model_cfg.n_ctx - len(cont)):]
        seqs.append(ctx + cont)
        starts.append(len(ctx))
    order = np.argsort([-len(s) for s in seqs], kind="stable")
    logp, count = np.zeros(len(seqs)), np.zeros(len(seqs))
    for b in range(0, len(seqs), batch_size):
        rows = order[b:b + batch_size]
        T = min(_round_up(max(len(seqs[r]) for r in rows), bucket), model_cfg.n_ctx)
        tokens = np.zeros((batch_size, T), np.int32)
        weights = np.zeros((batch_size, T), np.float32)
        for j, r in enumerate(rows):
            s = seqs[r]
            tokens[j, :len(s)] = s
            # Position t predicts token t+1: the continuation occupies [start, len).
            weights[j, starts[r] - 1: len(s) - 1] = 1.0
        lp, n = _continuation_logprob(model_cfg, params, tokens, weights)
        logp[rows], count[rows] = np.asarray(lp)[: len(rows)], np.asarray(n)[: len(rows)]
    return logp, count


def zero_shot_choice(model_cfg: GPTConfig, params, tokenizer, examples: Sequence[Example],
                     normalize: str = "mean", batch_size: int = 32) -> np.ndarray:
    """GPT-1's zero-shot multiple choice: the candidate with the highest average token
    log-probability given the context (normalize='mean'), or the highest total ('sum').

    Returns:
      The predicted candidate index of every example.
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize={normalize!r}: allowed values are 'mean', 'sum'")
    pairs, owner = [], []
    for i, ex in enumerate(examples):
        ctx = tokenizer.encode(ex.text_a)
        for c in ex.choices:
            # A space joins context and answer, so the answer's first word is tokenized as a
            # word that follows text (GPT-2 BPE: 'Ġword').
            pairs.append((ctx, tokenizer.encode(" " + c)))
            owner.append(i)
    logp, count = score_continuations(model_cfg, params, pairs, batch_size)
    score = logp / np.maximum(count, 1) if normalize == "mean" else logp
    preds = np.zeros(len(examples), np.int64)
    k = 0
    for i, ex in enumerate(examples):
        preds[i] = int(np.argmax(score[k:k + len(ex.choices)]))
        k += len(ex.choices)
    return preds


SENTIMENT_PROMPT = " very"
SENTIMENT_WORDS = (" negative", " positive")  # in SST-2's label order (0, 1)


def zero_shot_sentiment(model_cfg: GPTConfig, params, tokenizer, examples: Sequence[Example],
                        batch_size: int = 32) -> np.ndarray:
    """GPT-1's zero-shot SST-2: append " very" and compare p(" positive") with p(" negative").

    Words of several tokens are compared by their total log-probability, which for one-token
    words is GPT-1's comparison of the two next-token probabilities.

    Returns:
      1 (positive) or 0 (negative) for every example.
    """
    words = [tokenizer.encode(w) for w in SENTIMENT_WORDS]
    pairs = [(tokenizer.encode(ex.text_a + SENTIMENT_PROMPT), w) for ex in examples
             for w in words]
    logp, _ = score_continuations(model_cfg, params, pairs, batch_size)
    return np.argmax(logp.reshape(len(examples), len(words)), axis=1)


def zero_shot_predict(spec: TaskSpec, model_cfg: GPTConfig, params, tokenizer,
                      examples: Sequence[Example], normalize: str = "mean",
                      batch_size: int = 32) -> np.ndarray:
    """Zero-shot predictions with the task's method (TaskSpec.zero_shot)."""
    if spec.zero_shot == "sentiment":
        return zero_shot_sentiment(model_cfg, params, tokenizer, examples, batch_size)
    if spec.zero_shot == "choice":
        return zero_shot_choice(model_cfg, params, tokenizer, examples, normalize, batch_size)
    raise _no_zero_shot(spec)


def _no_zero_shot(spec: TaskSpec) -> ValueError:
    allowed = sorted(t.name for t in TASKS.values() if t.zero_shot)
    return ValueError(f"task {spec.name!r} has no zero-shot method; allowed: {allowed}")


def zero_shot_accuracy(spec: TaskSpec, model_cfg: GPTConfig, params, tokenizer,
                       examples: Sequence[Example], normalize: str = "mean",
                       batch_size: int = 32) -> float:
    """Accuracy of `zero_shot_predict` on labelled examples."""
    if any(ex.label is None for ex in examples):
        raise ValueError(f"{spec.name}: zero-shot accuracy needs labelled examples")
    preds = zero_shot_predict(spec, model_cfg, params, tokenizer, examples, normalize, batch_size)
    return float(np.mean(preds == np.array([ex.label for ex in examples])))


def zero_shot(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Zero-shot evaluation of the pretrained decoder named by `config.init` on the config's
    task (split `config.zero_shot.split`, default the first dev split); writes zero_shot.json."""
    spec = get_task(config.task.name)
    zc = config.zero_shot
    split = zc.get("split", "") or spec.dev_splits[0]
    if not spec.zero_shot:
        raise _no_zero_shot(spec)
    if config.init.kind == "scratch":
        raise ValueError("zero-shot evaluation needs a pretrained decoder: set init.kind to "
                         "'workdir' or 'hf' and init.path")
    data = load_task_from_config(config, [split])
    print(data.report(), flush=True)
    examples = _subset(data.splits[split], zc.get("max_examples", 0), config.seed)
    model_cfg, params, tokenizer = load_pretrained(config.init)
    t0 = time.time()
    acc = zero_shot_accuracy(spec, model_cfg, params, tokenizer, examples,
                             zc.get("normalize", "mean"), zc.get("batch_size", 32))
    result = {"task": spec.name, "split": split, "method": spec.zero_shot,
              "examples": len(examples), "accuracy": acc, "init": config.init.path,
              "wall_time_s": time.time() - t0}
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "zero_shot.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"zero-shot {spec.name} {split}: accuracy {acc:.4f} on {len(examples)} examples "
          f"({spec.zero_shot})", flush=True)
    return result


# ================================================================================ analysis
def _parse_zero_shot_task(entry: str) -> tuple[TaskSpec, dict]:
    """'sst2=DIR' (files) or 'glue/sst2=DATA_DIR' (tfds) -> (spec, load_task kwargs)."""
    if "=" not in entry:
        raise ValueError(f"analysis.zero_shot_tasks entry {entry!r}: expected 'task=path' "
                         "(e.g. 'sst2=../shared/data/glue/SST-2' or 'glue/sst2=../shared/tfds')")
    name, path = entry.split("=", 1)
    spec = get_task(name)
    kw = {"data_dir": path} if "/" in name else {"path": path}
    return spec, dict(kw, name=name)


def layer_transfer_analysis(config: ml_collections.ConfigDict, workdir: str,
                            progress: bool = True) -> dict:
    """GPT-1 Figure 2: dev score against pretrained layers transferred, and zero-shot accuracy
    across pretraining checkpoints.

    Finetunes the config's task once per entry of `analysis.layers` (default 0..n_layer) into
    `workdir/transfer_<n>`, then scores every `analysis.zero_shot_tasks` entry zero-shot with each
    pretraining checkpoint of `init.path` (a train.py work directory; an 'hf' init has one).
    Writes analysis.json, analysis.md (both tables) and analysis.png (both plots).
    """
    if config.init.kind not in ("workdir", "hf"):
        raise ValueError(f"init.kind={config.init.kind!r}: the analysis needs a pretrained "
                         "decoder ('workdir' or 'hf')")
    os.makedirs(workdir, exist_ok=True)
    spec = get_task(config.task.name)
    ac = config.analysis
    n_layer = load_pretrained(config.init)[0].n_layer
    layers = list(ac.get("layers", ()) or range(n_layer + 1))
    main_key = f"{spec.dev_splits[0]}_{spec.main_metric}"
    transfer = []
    for n in layers:
        c = copy.deepcopy(config)
        with c.unlocked():
            c.init.transfer_layers = int(n)
            c.init.transfer_embeddings = True
            c.train.predict_test = False
        s = finetune(c, os.path.join(workdir, f"transfer_{n}"), progress)
        transfer.append({"layers": int(n), main_key: s["best"][main_key]})

    zs_entries = list(ac.get("zero_shot_tasks", ()))
    zs = []
    if zs_entries:
        if config.init.kind == "workdir":
            ck = Checkpointer(os.path.join(config.init.path, "checkpoints"), async_save=False,
                              read_only=True)
            steps = ck.all_steps()
            ck.close()
        else:
            steps = [None]
        tasks = []
        for entry in zs_entries:
            spec_z, kw = _parse_zero_shot_task(entry)
            split = spec_z.dev_splits[0]
            data = load_task(kw.pop("name"), splits=[split], **kw)
            print(data.report(), flush=True)
            tasks.append((spec_z, _subset(data.splits[split], ac.get("zero_shot_examples", 0),
                                          config.seed)))
        for step in sorted(steps, key=lambda s: -1 if s is None else s):
            model_cfg, params, tokenizer = load_pretrained(config.init, step)
            row = {"step": step}
            for spec_z, ex in tasks:
                row[spec_z.name] = zero_shot_accuracy(spec_z, model_cfg, params, tokenizer, ex)
            zs.append(row)
            print(f"zero-shot at pretraining step {step}: "
                  + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "step"), flush=True)

    result = {"task": spec.name, "metric": main_key, "transfer": transfer, "zero_shot": zs,
              "pretrained": config.init.path}
    with open(os.path.join(workdir, "analysis.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    lines = [f"# GPT-1 analysis: {config.init.path}", "",
             f"| layers transferred | {main_key} |", "|---:|---:|"]
    lines += [f"| {r['layers']} | {r[main_key]:.4f} |" for r in transfer]
    if zs:
        names = [k for k in zs[0] if k != "step"]
        lines += ["", "| pretraining step | " + " | ".join(f"{n} zero-shot acc" for n in names)
                  + " |", "|---:|" + "---:|" * len(names)]
        lines += [f"| {r['step']} | " + " | ".join(f"{r[n]:.4f}" for n in names) + " |"
                  for r in zs]
    with open(os.path.join(workdir, "analysis.md"), "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    _plot_analysis(result, os.path.join(workdir, "analysis.png"))
    return result


def _plot_analysis(result: dict, out_png: str) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    key = result["metric"]
    xs = [r["layers"] for r in result["transfer"]]
    axes[0].plot(xs, [r[key] for r in result["transfer"]], "o-")
    axes[0].set_xlabel("# of pretrained layers transferred")
    axes[0].set_ylabel(f"{result['task']} {key}")
    axes[0].set_title("Transfer (GPT-1 Figure 2, left)")
    axes[0].grid(alpha=0.3)
    zs = result["zero_shot"]
    if zs:
        steps = [r["step"] if r["step"] is not None else 0 for r in zs]
        for name in [k for k in zs[0] if k != "step"]:
            spec = get_task(name)
            line, = axes[1].plot(steps, [r[name] for r in zs], "o-", label=name)
            chance = 1.0 / spec.num_labels
            axes[1].axhline(chance, ls="--", lw=0.8, color=line.get_color())
        axes[1].legend()
    axes[1].set_xlabel("pretraining step")
    axes[1].set_ylabel("zero-shot accuracy (dashed: chance)")
    axes[1].set_title("Zero-shot (GPT-1 Figure 2, right)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
