"""Pretraining: sharded state, a pure jitted train step, evaluation, checkpoints and the loop.

The experiment config (an ml_collections.ConfigDict, see configs/) drives everything; the model
architecture itself is a GPTConfig built from `config.model`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import sys
import time
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gptjax.train import faults
from gptjax import sharding as shd
from gptjax.train.checkpoint import Checkpointer, CheckpointError, abstract_with_shardings
from gptjax.config import GPTConfig
from gptjax.train.metrics import mfu, peak_flops
from gptjax.nn.model import check_scan_config, init_boxed
from gptjax.train.optim import make_optimizer
from gptjax.train.preemption import PreemptionGuard
from gptjax.train.step import TrainState, make_eval_step, make_train_step  # noqa: F401
from gptjax.train.experiment import check_train_config

log = logging.getLogger("gptjax")


# ================================================================================ state and steps
def model_config_from(config: ml_collections.ConfigDict, vocab_size: Optional[int] = None
                      ) -> GPTConfig:
    """The GPTConfig of an experiment: `config.model.preset` plus every other field as override.

    A `vocab_size` <= 0 in the config means "the tokenizer's", rounded up to
    `config.model_vocab_multiple` (padding the table to a multiple of 64/128 makes the output
    matmul faster and lets the vocabulary axis shard evenly).
    """
    fields = {k: v for k, v in config.model.items() if k != "preset"}
    if fields.get("vocab_size", 0) <= 0:
        if vocab_size is None:
            raise ValueError("model.vocab_size <= 0 means 'from the tokenizer', but no tokenizer "
                             "vocabulary size was given")
        mult = int(config.get("model_vocab_multiple", 1))
        fields["vocab_size"] = int(math.ceil(vocab_size / mult) * mult)
    for k in ("attention_pattern",):
        if k in fields:
            fields[k] = tuple(fields[k])
    mc = GPTConfig.preset(config.model.preset, **fields)
    check_scan_config(mc)
    return mc


# ================================================================================ sharded setup
class Setup:
    """The mesh, the shardings and the jitted functions of one run."""

    def __init__(self, config: ml_collections.ConfigDict, model_cfg: GPTConfig, total_steps: int,
                 devices=None):
        self.config, self.model_cfg = config, model_cfg
        mesh_cfg = config.get("mesh", ml_collections.ConfigDict())
        self.mesh = shd.make_mesh({a: mesh_cfg.get(a, 1 if a != "data" else -1)
                                   for a in shd.MESH_AXES},
                                  dcn_shape=mesh_cfg.get("dcn"), devices=devices)
        self.rules = shd.rules_from_config(mesh_cfg.get("rules"))
        self.optimizer, self.schedule = make_optimizer(config.optim, total_steps)

        def init_fn(rng):
            params = nn.meta.unbox(init_boxed(model_cfg, rng))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              opt_state=self.optimizer.init(params))

        self._init_fn = init_fn
        boxed = jax.eval_shape(lambda: init_boxed(model_cfg, jax.random.key(0)))
        self.logical_specs = nn.get_partition_spec(boxed)
        shd.check_rules_cover(self.logical_specs, self.rules)
        param_sh = shd.logical_to_shardings(self.logical_specs, self.mesh, self.rules)
        self.abstract_state = jax.eval_shape(init_fn, jax.random.key(0))
        shd.check_divisible(self.abstract_state.params, param_sh)
        repl = shd.replicated(self.mesh)
        opt_sh = optax.tree_utils.tree_map_params(
            self.optimizer, lambda _, s: s, self.abstract_state.opt_state, param_sh,
            transform_non_params=lambda _: repl,
            is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding))
        self.state_shardings = TrainState(step=repl, params=param_sh, opt_state=opt_sh)
        self.batch_sharding = shd.batch_sharding(self.mesh, self.rules)
        self.repl = repl

        train = config.train
        step_fn = make_train_step(model_cfg, self.optimizer, self.schedule,
                                  accum_steps=train.get("accum_steps", 1),
                                  nonfinite=train.get("nonfinite", "skip"))
        self.train_step = jax.jit(
            self._with_rules(step_fn),
            in_shardings=(self.state_shardings, self.batch_sharding, repl),
            out_shardings=(self.state_shardings, repl), donate_argnames=("state",))
        self.eval_step = jax.jit(self._with_rules(make_eval_step(model_cfg)),
                                 in_shardings=(param_sh, self.batch_sharding),
                                 out_shardings=(repl, repl))

    def _with_rules(self, fn):
        """Trace `fn` with the logical axis rules active, so activation constraints apply."""
        @functools.wraps(fn)
        def wrapped(*args):
            with nn.logical_axis_rules(self.rules):
                return fn(*args)
        return wrapped

    def init_state(self, rng: jax.Array) -> TrainState:
        """Initialise straight into the sharded layout (no full copy on one device)."""
        with self.mesh:
            return jax.jit(self._with_rules(self._init_fn),
                           out_shardings=self.state_shardings)(rng)

    def abstract_sharded_state(self):
        return abstract_with_shardings(self.abstract_state, self.state_shardings)

    def put_batch(self, local_batch: dict) -> dict:
        """Host-local numpy rows -> one global array sharded over the batch axis."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in local_batch.items()}


# ================================================================================ data
def barrier(name: str, timeout_s: int = 3600) -> None:
    """Wait until every process reaches `name` (no-op in a single-process run).

    Uses the coordination service's barrier, whose timeout we choose, rather than a collective
    (gloo's CPU collectives give up after 30 s, less than preparing a corpus may take).
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed
    client = distributed.global_state.client
    if client is not None:
        client.wait_at_barrier(f"gptjax_{name}", timeout_in_ms=timeout_s * 1000)
    else:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def main_process_first(name: str, fn: Callable[[], Any]) -> Any:
    """Run `fn` on process 0 first (preparing shared files), then on the others (reading them)."""
    if jax.process_index() == 0:
        out = fn()
        barrier(name)
        return out
    barrier(name)
    return fn()


def build_tokenizer(config: ml_collections.ConfigDict, workdir: str, source) -> Any:
    """The run's tokenizer: loaded from `workdir/tokenizer` if the run has one, else built."""
    from gptjax.data import tokenizers as toks

    tok_dir = os.path.join(workdir, "tokenizer")
    if os.path.exists(os.path.join(tok_dir, "tokenizer.json")):
        return toks.load_tokenizer(tok_dir)
    tc = config.tokenizer
    if tc.kind == "char":
        # The character set of every split (as nanoGPT's prepare.py does), so no validation
        # character is unknown.
        tok = toks.CharTokenizer.from_text("".join("".join(source.texts(s)) for s in source.splits))
    elif tc.kind == "sentencepiece":
        os.makedirs(tok_dir, exist_ok=True)
        tok = toks.SentencePieceTokenizer.train(
            list(source.texts("train")), tok_dir, tc.vocab_size,
            user_defined_symbols=tuple(tc.get("user_defined_symbols", ())))
    elif tc.kind == "gpt2_bpe":
        tok = toks.GPT2BPETokenizer.from_files(tc.path)
    else:
        raise ValueError(f"tokenizer.kind={tc.kind!r}: allowed values are "
                         "['char', 'sentencepiece', 'gpt2_bpe']")
    tok.save(tok_dir)
    return tok


def build_source(config: ml_collections.ConfigDict):
    """The text dataset named by `config.data` (tfds name, local text files, or the default)."""
    from gptjax.data import get_source

    dc = config.data
    kwargs = {}
    if dc.dataset == "local_text":
        kwargs["paths"] = dc.path
        kwargs["encoding"] = dc.get("encoding", "utf-8")
        if dc.get("validation_fraction") is not None:
            kwargs["validation_fraction"] = dc.validation_fraction
    elif dc.dataset == "python_stdlib":
        if dc.get("max_train_bytes"):
            kwargs["max_train_bytes"] = dc.max_train_bytes
    return get_source(dc.dataset, dc.get("data_dir") or None,
                      text_key=dc.get("text_key", "text"), **kwargs)


# ================================================================================ the loop
class MetricsWriter:
    """metrics.jsonl (one JSON object per record) plus TensorBoard scalars."""

    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; the JSONL log is the record.
                self._tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def evaluate(setup: Setup, params, tokens: np.ndarray, seq_len: int, batch_size: int,
             max_batches: int = -1) -> float:
    """Mean next-token loss over non-overlapping windows of a split (all of it when max_batches<0)."""
    from gptjax.data import eval_batches

    tot, wsum = 0.0, 0.0
    with setup.mesh:
        for i, b in enumerate(eval_batches(tokens, seq_len, batch_size,
                                           process_index=jax.process_index(),
                                           process_count=jax.process_count())):
            if 0 <= max_batches <= i:
                break
            s, w = setup.eval_step(params, setup.put_batch(b))
            tot += float(s)
            wsum += float(w)
    return tot / max(wsum, 1.0)


def _truncate_log(path: str, step: int) -> None:
    """On resume, drop records after the restored step so the log reads as one run."""
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = [ln for ln in fh if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    with open(path, "w") as fh:
        fh.writelines(kept)


def tokenizer_info(tokenizer) -> dict:
    """What a checkpoint records of its tokenizer: kind, vocabulary size and a fingerprint.

    The fingerprint hashes the files `tokenizer.save` writes (vocabulary, merges, model), so
    any change to the vocabulary shows, even one that keeps its size.
    """
    import hashlib
    import tempfile

    def without_sources(x):  # where the files were copied from is not part of the tokenizer
        if isinstance(x, dict):
            return {k: without_sources(v) for k, v in x.items() if k != "source"}
        return [without_sources(v) for v in x] if isinstance(x, list) else x

    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for root, _, files in sorted(os.walk(d)):
            for name in sorted(files):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, d).encode())
                with open(path, "rb") as fh:
                    data = fh.read()
                if name == "tokenizer.json":
                    data = json.dumps(without_sources(json.loads(data)), sort_keys=True).encode()
                h.update(data)
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "fingerprint": h.hexdigest()[:16]}


def check_checkpoint_meta(step: int, meta: dict, *, model_cfg: GPTConfig, tokenizer: dict
                          ) -> None:
    """Raises CheckpointError when checkpoint `step` belongs to another run than this one.

    Args:
      step: the checkpoint's step.
      meta: its metadata (see `train_and_evaluate`'s `meta_for`).
      model_cfg: this run's architecture.
      tokenizer: this run's tokenizer as {kind, vocab_size, fingerprint}.
    """
    saved, here = meta.get("model_config") or {}, model_cfg.to_dict()
    if saved != here:
        diff = sorted(k for k in set(saved) | set(here) if saved.get(k) != here.get(k))
        what = "; ".join(f"{k} {saved.get(k)!r} there, {here.get(k)!r} here" for k in diff[:3])
        raise CheckpointError(f"checkpoint step {step} is of another architecture than this "
                              f"config ({what}); use another --workdir")
    saved_tok = meta.get("tokenizer") or {}
    for k in ("kind", "vocab_size", "fingerprint"):  # older checkpoints lack the fingerprint
        if k in saved_tok and saved_tok[k] != tokenizer.get(k):
            raise CheckpointError(
                f"checkpoint step {step} was trained with another tokenizer (its {k} is "
                f"{saved_tok[k]!r}, this run's is {tokenizer.get(k)!r}); put the run's own "
                "tokenizer/ directory back or use another --workdir")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       progress: bool = True) -> dict:
    """Pretrain a GPT as `config` says, in `workdir`; resumes from the latest checkpoint there.

    Returns:
      A summary dict: final step, final train loss, final validation loss (whole split), wall time.
    """
    from gptjax.data import LMBatcher, load_tokens
    from gptjax.plotting import plot_metrics

    t_start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    tc = config.train
    check_train_config(config)  # one-line errors before any data is read or anything compiles

    cache_dir = config.data.get("cache_dir") or None
    val_split = config.data.get("val_split", "validation")

    def prepare_data():
        source = build_source(config)
        tokenizer = build_tokenizer(config, workdir, source)
        return (tokenizer, load_tokens(source, "train", tokenizer, cache_dir=cache_dir),
                load_tokens(source, val_split, tokenizer, cache_dir=cache_dir))

    # Process 0 prepares the dataset, trains the tokenizer and writes the token caches; the
    # other processes then find them ready instead of racing to write the same files.
    tokenizer, train_tokens, val_tokens = main_process_first("data", prepare_data)
    if config.tokenizer.kind != tokenizer.kind:
        raise CheckpointError(f"tokenizer.kind={config.tokenizer.kind!r} but {workdir} holds a "
                              f"{tokenizer.kind!r} tokenizer; use another --workdir")
    model_cfg = model_config_from(config, tokenizer.vocab_size)
    seq_len = config.data.get("seq_len", 0) or model_cfg.n_ctx
    if len(val_tokens) < seq_len + 1:  # found now, not at the first evaluation
        raise ValueError(f"the {val_split!r} split has {len(val_tokens)} tokens, shorter than one "
                         f"sequence (data.seq_len {seq_len} + 1); allowed: more validation text "
                         "(data.validation_fraction) or a shorter data.seq_len")

    total_steps = tc.steps
    setup = Setup(config, model_cfg, total_steps)
    gbs = tc.batch_size
    batcher = LMBatcher(train_tokens, seq_len, gbs, config.seed,
                        mode=config.data.get("sampling", "packed"),
                        process_index=jax.process_index(), process_count=jax.process_count())

    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tc.save_every,
                        keep=tc.get("keep_checkpoints", 3),
                        async_save=tc.get("async_checkpointing", True))
    rng = jax.random.key(config.seed)
    init_rng, train_rng, sample_rng = jax.random.split(rng, 3)
    tok_info = tokenizer_info(tokenizer)
    with setup.mesh:
        resumed = ckpt.restore_latest(setup.abstract_sharded_state(), functools.partial(
            check_checkpoint_meta, model_cfg=model_cfg, tokenizer=tok_info))
    n_skipped = 0  # non-finite steps whose update was skipped, over the whole run
    if resumed is not None:
        latest, state, meta = resumed
        batcher.restore(meta["data"])
        n_skipped = int(meta.get("skipped_steps", 0))
        log.info("resumed from step %d", latest)
        _truncate_log(os.path.join(workdir, "metrics.jsonl"), latest)
    else:
        state = setup.init_state(init_rng)
        _truncate_log(os.path.join(workdir, "metrics.jsonl"), 0)  # no checkpoint: a new run
    if is_main:  # only now: a run refused above must not overwrite the work directory's files
        with open(os.path.join(workdir, "config.json"), "w") as fh:
            fh.write(config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "model_config.json"), "w") as fh:
            json.dump(model_cfg.to_dict(), fh, indent=2)
    start = int(jax.device_get(state.step))

    n_params = model_cfg.num_params()
    flops_tok = model_cfg.flops_per_token(seq_len)
    peak, peak_src = peak_flops(model_cfg.dtype)
    writer = MetricsWriter(workdir, enabled=is_main)
    tokens_per_step = gbs * seq_len
    if is_main:
        print(f"gptjax: {n_params / 1e6:.2f}M parameters, {model_cfg.n_layer} layers x "
              f"{model_cfg.n_embd}, vocab {model_cfg.vocab_size}, context {seq_len}; "
              f"{len(train_tokens):,} train / {len(val_tokens):,} val tokens; mesh "
              f"{dict(setup.mesh.shape)}; steps {start}->{total_steps}", flush=True)

    def meta_for(step: int) -> dict:
        return {"model_config": model_cfg.to_dict(),
                "data": dict(batcher.state(), step=step),
                "tokenizer": tok_info, "skipped_steps": n_skipped}

    pbar = None
    if progress and is_main:
        from tqdm.auto import tqdm
        pbar = tqdm(total=total_steps, initial=start, unit="step", dynamic_ncols=True)

    last_train_loss = float("nan")
    pending = None  # (step, device metrics) fetched one step late so dispatch runs ahead
    t_last, steps_since = time.time(), 0
    halted = None
    halt_mode = tc.get("nonfinite", "skip") == "halt"

    def handle(step: int, m: dict) -> None:
        nonlocal t_last, steps_since, last_train_loss, halted, n_skipped
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        last_train_loss = m["loss"]
        if m["skipped"]:  # a non-finite loss or gradient norm
            n_skipped += 1
            if halt_mode:
                halted = step if halted is None else halted  # the first one
            elif is_main and (n_skipped <= 10 or n_skipped % 100 == 0):
                print(f"warning: step {step + 1}: non-finite loss or gradients, update skipped "
                      f"({n_skipped} skipped so far)", file=sys.stderr, flush=True)
        steps_since += 1
        if (step + 1) % tc.log_every == 0 or step + 1 == total_steps:
            dt = time.time() - t_last
            tps = steps_since * tokens_per_step / max(dt, 1e-9)
            rec = dict(step=step + 1, loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"],
                       tokens_per_sec=tps,
                       mfu=mfu(tps, flops_tok, jax.device_count(), peak),
                       skipped=int(m["skipped"]), skipped_steps=n_skipped)
            writer.write(rec)
            if pbar is not None:
                pbar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            t_last, steps_since = time.time(), 0

    guard, preempted = PreemptionGuard(), None
    try:
        with setup.mesh, guard:
            for step in range(start, total_steps):
                batch = setup.put_batch(faults.corrupt_batch(step, batcher.batch(step)))
                state, metrics = setup.train_step(state, batch, train_rng)
                if pending is not None:
                    handle(*pending)
                    if step - 1 == start:
                        # Do not count compilation in the first throughput window.
                        t_last, steps_since = time.time(), 0
                pending = (step, metrics)
                if halted is not None:
                    break
                if pbar is not None:
                    pbar.update(1)
                done = step + 1
                faults.after_step()
                stop = guard.should_stop(done)  # SIGTERM/SIGINT: the same step on every host
                if pending is not None and (stop or ckpt.should_save(done)):
                    # Metrics of a step about to be saved, now: a 'halt' run never saves a
                    # non-finite update, and the saved skip count is exact.
                    handle(*pending)
                    pending = None
                    if halted is not None:
                        break
                if stop:
                    ckpt.save(done, state, meta_for(done), force=True)
                    preempted = guard.signal_name
                    break
                if tc.eval_every > 0 and done % tc.eval_every == 0 and done != total_steps:
                    vl = evaluate(setup, state.params, val_tokens, seq_len, tc.eval_batch_size,
                                  tc.eval_batches)
                    writer.write(dict(step=done, val_loss=vl, val_ppl=math.exp(min(vl, 50))))
                    if pbar is not None:
                        pbar.write(f"step {done}: val_loss {vl:.4f}")
                ckpt.save(done, state, meta_for(done))
            if pending is not None:
                handle(*pending)
    finally:
        ckpt.wait()  # whatever stopped the loop, a save in flight completes
        if pbar is not None:
            pbar.close()
    if halted is not None:
        ckpt.close()
        good = ckpt.latest_step()
        raise FloatingPointError(
            f"non-finite loss or gradients at step {halted + 1} (train.nonfinite='halt'); "
            + (f"the last good checkpoint is step {good}" if good is not None
               else "no checkpoint was written before it"))
    if preempted is not None:
        ckpt.close()
        writer.close()
        final_step = int(jax.device_get(state.step))
        if is_main:
            print(f"{preempted}: stopped after step {final_step} and saved its checkpoint in "
                  f"{ckpt.directory}; run the same command to resume", flush=True)
        return dict(step=final_step, preempted=preempted, skipped_steps=n_skipped, state=state,
                    tokenizer=tokenizer, model_config=model_cfg)
    final_step = int(jax.device_get(state.step))
    if final_step not in ckpt.all_steps():
        ckpt.save(final_step, state, meta_for(final_step), force=True)
    val_loss = evaluate(setup, state.params, val_tokens, seq_len, tc.eval_batch_size, -1)
    writer.write(dict(step=final_step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)),
                      final=True))
    ckpt.close()
    writer.close()
    wall = time.time() - t_start
    summary = dict(step=final_step, train_loss=last_train_loss, val_loss=val_loss,
                   skipped_steps=n_skipped,
                   wall_time_s=wall, params=n_params, peak_flops=peak, peak_source=peak_src)
    if is_main:
        plot_metrics(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss.png"))
        with open(os.path.join(workdir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
        print(f"done: step {final_step}, val_loss {val_loss:.4f} (whole split), "
              f"wall {wall:.0f}s; plot {os.path.join(workdir, 'loss.png')}", flush=True)
    summary["state"] = state
    summary["tokenizer"] = tokenizer
    summary["model_config"] = model_cfg
    return summary


# ================================================================================ inference loading
def load_workdir(workdir: str, step: Optional[int] = None):
    """(GPTConfig, params, tokenizer) from a training work directory's latest checkpoint (or
    `step`).

    Only the parameters are read (an Orbax partial restore: no optimizer state, no mesh), and
    they come back as uncommitted single-device arrays, so the jitted functions of inference and
    finetuning compile once whether they are fed these arrays or their own outputs.
    """
    from gptjax.data import tokenizers as toks
    from gptjax.nn.model import abstract_params

    workdir = os.path.abspath(workdir)
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{workdir} is not a gptjax work directory (no config.json)")
    with open(os.path.join(workdir, "model_config.json")) as fh:
        model_cfg = GPTConfig.from_dict(json.load(fh))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False, read_only=True)
    tokenizer = toks.load_tokenizer(os.path.join(workdir, "tokenizer"))
    try:
        meta = ckpt.restore_meta(step)
        step = ckpt.latest_step() if step is None else step
        # The run's model_config.json and tokenizer/ must be the checkpoint's own.
        check_checkpoint_meta(step, meta, model_cfg=model_cfg,
                              tokenizer=tokenizer_info(tokenizer))
        params = ckpt.restore_params(abstract_params(model_cfg), step)
    finally:
        ckpt.close()
    return model_cfg, jax.device_put(params), tokenizer


# ================================================================================ dry run
def dry_run(config: ml_collections.ConfigDict, workdir: str, compile_step: bool = True) -> str:
    """The sharding of every parameter and a per-device memory plan, without allocating.

    The vocabulary size comes from the config, or (when it is <= 0) from the run's tokenizer.
    With `compile_step`, the train step is also compiled for the local devices and XLA's own
    memory analysis is reported next to the estimate.
    """
    from gptjax.train.memory import compiled_memory, format_bytes, memory_plan, sharding_table

    check_train_config(config)
    vocab = None
    if config.model.get("vocab_size", 0) <= 0:
        source = build_source(config)
        vocab = build_tokenizer(config, workdir, source).vocab_size
    model_cfg = model_config_from(config, vocab)
    seq_len = config.data.get("seq_len", 0) or model_cfg.n_ctx
    setup = Setup(config, model_cfg, config.train.steps)
    lines = [f"model: {model_cfg.num_params():,} parameters; mesh {dict(setup.mesh.shape)} on "
             f"{setup.mesh.size} {jax.devices()[0].platform} devices; rules {setup.rules}", "",
             f"{'parameter':56s} {'shape':22s} {'logical axes':44s} {'mesh':28s} per device"]
    for path, shape, logical, spec, nbytes in sharding_table(setup):
        lines.append(f"{path:56s} {str(shape):22s} {str(logical):44s} {str(spec):28s} "
                     f"{format_bytes(nbytes)}")
    plan = memory_plan(setup, config.train.batch_size, seq_len,
                       config.train.get("accum_steps", 1))
    lines += ["", f"memory plan per device (batch {config.train.batch_size}, seq {seq_len}, "
              f"micro-batch/device {plan['micro_batch_per_device']}, remat {model_cfg.remat}, "
              f"compute {model_cfg.dtype}, params {model_cfg.param_dtype}):"]
    for k in ("params", "optimizer_state", "gradients", "activations", "total"):
        lines.append(f"  {k:16s} {format_bytes(plan[k])}")
    if compile_step:
        cm = compiled_memory(setup, config.train.batch_size, seq_len)
        if cm is not None:
            lines.append("XLA memory analysis of the compiled step, per device: " + ", ".join(
                f"{k} {format_bytes(v)}" for k, v in cm.items()))
    return "\n".join(lines)
