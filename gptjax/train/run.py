"""A training run's parts and its start: `prepare` builds them, `restore_or_init` resumes the
latest intact checkpoint (in whatever layout and execution it was saved) or starts a new state.

Kept apart from gptjax.train.loop (the loop, its bookkeeping and the end of the run) so that how
a run resumes (checkpoint tiers, another device count) has its own module.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from gptjax.config import GPTConfig
from gptjax.data.batcher import Batcher
from gptjax.data.tokenizers import Tokenizer, tokenizer_info
from gptjax.nn.param_layout import convert_layout
from gptjax.runs import goodput
from gptjax.runs.checkpoint import Checkpointer, CheckpointError
from gptjax.runs.local_tier import LocalTier
from gptjax.runs.pretrained import execution_change, saved_execution
from gptjax.runs.workdir import (
    METRICS,
    config_changes,
    last_logged_loss,
    truncate_log,
    write_run_config,
)
from gptjax.train import elastic
from gptjax.train.experiment import model_config_from, resolve_steps
from gptjax.train.lora_setup import LoraSetup, load_base, make_setup, new_state
from gptjax.train.run_data import load_data, make_batcher
from gptjax.train.run_mixture import shortest
from gptjax.train.setup import Setup
from gptjax.train.spikes import META_KEY as SPIKES_META
from gptjax.train.start import check_run_meta, init_architecture
from gptjax.train.step import TrainState
from gptjax.train.tiers import open_local, restore_local


@dataclasses.dataclass
class Run:
    """What `prepare` builds for a run: its data, tokenizer, architecture, mesh and checkpoints."""

    config: ml_collections.ConfigDict
    workdir: str
    t_start: float
    tokenizer: Tokenizer
    train_tokens: Optional[np.ndarray]  # None with data.pipeline='sharded' (per-process shards)
    val_tokens: np.ndarray
    model_cfg: GPTConfig
    seq_len: int
    setup: Setup
    batcher: Batcher
    ckpt: Checkpointer
    init_rng: jax.Array
    train_rng: jax.Array
    init_meta: dict  # what checkpoints record of a LoRA run: its `lora` settings and `base`
    ledger: goodput.Ledger = dataclasses.field(default_factory=goodput.Ledger)  # where time went
    local: Optional[LocalTier] = None  # this process's local checkpoint tier (train.local_dir)

    @property
    def is_main(self) -> bool:
        """Whether this is process 0, the one that writes the run directory's files."""
        return jax.process_index() == 0

    @property
    def metrics_path(self) -> str:
        return os.path.join(self.workdir, METRICS)

    @functools.cached_property
    def tok_info(self) -> dict:
        """The tokenizer's kind, size and fingerprint, as checkpoints record them."""
        return tokenizer_info(self.tokenizer)


# ================================================================================ prepare
def prepare(config: ml_collections.ConfigDict, workdir: str) -> Run:
    """Data, tokenizer, architecture, mesh, batcher and checkpointer of a complete config."""
    t_start = time.time()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    dc = config.data
    source, tokenizer, train_tokens, val_tokens = load_data(config, workdir)
    pretrained = init_architecture(config)  # (init.kind hf/workdir: its tokenizer is the run's)
    if pretrained is None and config.tokenizer.kind != tokenizer.kind:
        raise CheckpointError(f"tokenizer.kind={config.tokenizer.kind!r} but {workdir} holds a "
                              f"{tokenizer.kind!r} tokenizer; use another --workdir")
    model_cfg = pretrained or model_config_from(config, tokenizer.vocab_size)
    seq_len = dc.seq_len or model_cfg.n_ctx
    n_val = shortest(val_tokens)  # (of a mixture: its shortest corpus')
    if n_val < seq_len + 1:  # found now, not at the first evaluation
        raise ValueError(f"the {dc.val_split!r} split has {n_val} tokens, shorter than "
                         f"one sequence (data.seq_len {seq_len} + 1); allowed: more validation "
                         "text (data.validation_fraction) or a shorter data.seq_len")
    tc = config.train
    if train_tokens is not None:
        tc.steps = resolve_steps(config, len(train_tokens), seq_len)  # train.epochs, if set
    batcher = make_batcher(config, source, tokenizer, train_tokens, seq_len)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), save_every=tc.save_every,
                        keep=tc.keep_checkpoints, async_save=tc.async_checkpointing)
    # (init, train, sample): gptjax.sweep splits each model's key the same way.
    init_rng, train_rng, _ = jax.random.split(jax.random.key(config.seed), 3)
    setup = make_setup(config, model_cfg, tc.steps)
    return Run(config, workdir, t_start, tokenizer, train_tokens, val_tokens, model_cfg, seq_len,
               setup, batcher, ckpt, init_rng, train_rng, load_base(config, setup, ckpt),
               local=open_local(config, workdir))


def _saved_layout_setup(run: Run, meta: dict) -> Setup:
    """The run's Setup, or one for the parameter layout checkpoint `meta` was saved in (its
    `scan_layers`; the rest of the execution does not change the state's tree)."""
    saved_scan = saved_execution(meta, run.model_cfg)["scan_layers"]
    if saved_scan == run.model_cfg.scan_layers:
        return run.setup
    if isinstance(run.setup, LoraSetup):  # (its base is in the run's layout)
        raise CheckpointError(f"a LoRA run resumes in its layout: scan_layers={saved_scan}")
    return Setup(run.config, run.model_cfg.with_execution(scan_layers=saved_scan),
                 run.config.train.steps)



def restore_or_init(run: Run) -> tuple[TrainState, dict]:
    """The latest intact checkpoint of the run (and the data position it saved), or a new state.

    A checkpoint of this architecture resumes under this config's execution, whatever it was
    saved with (one line names the change); one saved with the other `scan_layers` is read in
    its layout, then its parameters and optimizer moments are moved to this run's.

    Returns:
      (state, what the loop carries over: `skipped_steps` so far and the last `train_loss`).
    """
    check = functools.partial(check_run_meta, model_cfg=run.model_cfg, tokenizer=run.tok_info,
                              init_meta=run.init_meta)
    with run.setup.mesh:
        resumed = restore_local(run, check)  # a newer local step that every process holds
        source = run.ckpt.directory if resumed is None else f"local tier {run.local.directory}"
        if resumed is None:
            latest = run.ckpt.latest_step()
            resumed = run.ckpt.restore_latest(
                lambda meta: _saved_layout_setup(run, meta).abstract_sharded_state(), check)
            if latest is not None and (resumed is None or resumed[0] < latest):
                # The persistent latest was damaged: a local step between may be the newest.
                newer = restore_local(run, check, -1 if resumed is None else resumed[0])
                if newer is not None:
                    resumed, source = newer, f"local tier {run.local.directory}"
    carried = {"skipped_steps": 0, "train_loss": float("nan"), "spikes": None}
    if resumed is not None:
        latest, state, meta = resumed
        if saved_execution(meta, run.model_cfg)["scan_layers"] != run.model_cfg.scan_layers:
            with run.setup.mesh:
                state = jax.device_put(convert_layout(run.model_cfg, state,
                                                      run.model_cfg.scan_layers),
                                       run.setup.state_shardings)
        run.batcher.restore(meta["data"])
        if run.local is not None:  # (local steps after it belong to a timeline not taken)
            run.local.discard_after(latest)
        resized = elastic.adapt(run.setup, run.config, meta)  # train.elastic: accum_steps
        if run.is_main:  # its one writer (processes rewriting it at once lost its lines)
            truncate_log(run.metrics_path, latest)
        # (JSON metadata; older runs lack these, their log has the loss)
        carried["skipped_steps"] = int(meta.get("skipped_steps", 0))
        loss = meta.get("train_loss", last_logged_loss(run.metrics_path, latest))
        carried["train_loss"] = float("nan") if loss is None else float(loss)
        carried["spikes"] = meta.get(SPIKES_META)  # the spike guard's window and count
        changes = config_changes(run.workdir, run.config)
        execution = execution_change(meta, run.model_cfg)
        if run.is_main:
            if changes:
                print(f"warning: this config differs from the one {run.workdir} was run with: "
                      f"{changes}", file=sys.stderr, flush=True)
            if execution:
                print(f"resuming step {latest} with another execution: {execution}", flush=True)
            print(f"resumed from step {latest} ({source})", flush=True)
            if resized:
                print(resized, flush=True)
    else:
        state = new_state(run.config, run.setup, run.init_rng)  # init.kind's weights
        if run.is_main:
            truncate_log(run.metrics_path, 0)  # no checkpoint: a new run
    if run.is_main:  # only now: a run refused above must not overwrite the work directory's files
        write_run_config(run.workdir, run.config, run.model_cfg)
    return state, carried

