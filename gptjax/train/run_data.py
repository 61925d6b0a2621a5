"""A training run's data: the tokenizer, the splits' tokens and the batcher, for either pipeline.

`data.pipeline='single'`: process 0 prepares the dataset, trains the tokenizer and writes one
cached token file per split; the other processes then read them (gptjax.data.token_cache).
`data.pipeline='sharded'`: process 0 trains the tokenizer into the run directory (the storage
hosts share); every process then tokenizes its own virtual shards of train into its own cache
(gptjax.data.sharded). `prepare_data` is `train.py --prepare_data`.
`data.dataset='prompt_completion'` (JSONL rows, gptjax.data.prompt_completion) reads and tokenizes
its rows in memory in every process (no token cache: such sets are small), 'single' pipeline only;
its "tokens" are then `PromptCompletionSplit`s, whose batches carry the completion weights.
`data.document_mask` (gptjax.data.documents) adds segment ids (and restarted positions) to the
training batches of every pipeline and layout, and to the evaluation batches.
`data.mixture` (several weighted corpora, either pipeline) goes through gptjax.train.run_mixture:
each corpus keeps its own caches or shards; its splits are `MixtureSplit`s.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from gptjax.data import LMBatcher, eval_batches, load_tokens, sharded
from gptjax.data import prompt_completion as pc
from gptjax.data.batcher import Batcher
from gptjax.data.documents import DocumentBatcher, DocumentMask, document_mask
from gptjax.data.corpora import default_cache_dir
from gptjax.data.prefetch import Prefetcher
from gptjax import defaults
from gptjax.train.experiment import build_source, model_config_from, run_tokenizer
from gptjax.multihost import main_process_first
from gptjax.train import run_mixture
from gptjax.train.start import init_architecture

PIPELINES = ("single", "sharded")


def load_data(config: ml_collections.ConfigDict, workdir: str) -> tuple:
    """(source or None, tokenizer, train tokens or None, validation tokens) of a complete config:
    the source and no train tokens with the sharded pipeline (each process reads its shards when
    its batcher is made), train tokens and no source with the single one."""
    dc = config.data
    cache_dir = dc.cache_dir or None
    if dc.pipeline not in PIPELINES:
        raise ValueError(f"data.pipeline={dc.pipeline!r}; allowed: 'single' (one cached file "
                         "per split) or 'sharded' (each process tokenizes its own share)")
    if dc.mixture:  # several weighted corpora (gptjax.train.run_mixture)
        return run_mixture.load_mixture(config, workdir)
    if dc.dataset == pc.DATASET:
        return load_prompt_completion(config, workdir)

    def source_and_tokenizer():
        source = build_source(config)
        return source, run_tokenizer(config, workdir, source)

    if dc.pipeline == "single":
        def prepare():
            source, tokenizer = source_and_tokenizer()
            return (tokenizer, load_tokens(source, "train", tokenizer, cache_dir=cache_dir),
                    load_tokens(source, dc.val_split, tokenizer, cache_dir=cache_dir))

        # Process 0 prepares the dataset, trains the tokenizer and writes the token caches; the
        # other processes then find them ready instead of racing to write the same files.
        tokenizer, train_tokens, val_tokens = main_process_first("data", prepare)
        return None, tokenizer, train_tokens, val_tokens
    if config.train.epochs > 0:
        raise ValueError("train.epochs needs the whole corpus' size; with "
                         "data.pipeline='sharded' set train.steps instead")
    # Process 0 trains the tokenizer into the run directory first; then every process reads its
    # own shards of train, and the validation split, into its own cache directory.
    source, tokenizer = main_process_first("tokenizer", source_and_tokenizer)
    return source, tokenizer, None, load_tokens(source, dc.val_split, tokenizer,
                                                cache_dir=cache_dir)


def pc_seq_len(config: ml_collections.ConfigDict, tokenizer: Any) -> int:
    """The sequence length prompt/completion rows are checked against: data.seq_len, else the
    model's n_ctx (the pretrained model's with init.kind hf/workdir, as `loop.prepare` takes it)."""
    if config.data.seq_len:
        return config.data.seq_len
    return (init_architecture(config) or model_config_from(config, tokenizer.vocab_size)).n_ctx


def load_prompt_completion(config: ml_collections.ConfigDict, workdir: str) -> tuple:
    """`load_data` of data.dataset='prompt_completion': (the rows as a PromptCompletionSource,
    tokenizer, train and validation PromptCompletionSplits). Validation: the rows of
    data.val_path when set, else data.validation_fraction (default 0.1) of data.path's rows."""
    dc = config.data
    if dc.pipeline != "single":
        raise ValueError(f"data.pipeline={dc.pipeline!r}: data.dataset='prompt_completion' "
                         "reads its JSONL rows in every process; allowed: 'single'")
    source = build_source(config)  # a PromptCompletionSource
    # Process 0 builds (and saves) the tokenizer first; the others then read it.
    tokenizer = main_process_first("tokenizer", lambda: run_tokenizer(config, workdir, source))
    seq_len = pc_seq_len(config, tokenizer)
    train, val = (pc.tokenize_rows(source.split(s), tokenizer, seq_len, dc.pc_layout)
                  for s in ("train", dc.val_split))
    if val.layout == "pad" and val.num_rows < 2:  # (len() would be seq_len: under one window)
        raise ValueError(f"the validation set has {val.num_rows} row; allowed: 2 or more "
                         "(data.val_path or data.validation_fraction)")
    return source, tokenizer, train, val


def make_batcher(config: ml_collections.ConfigDict, source: Any, tokenizer: Any,
                 train_tokens: Optional[np.ndarray], seq_len: int) -> Batcher:
    """This process's training batcher (LMBatcher, sharded.ShardedBatcher or a mixture's), in a
    DocumentBatcher with data.document_mask, behind a Prefetcher when `data.prefetch` > 0."""
    dc, tc = config.data, config.train
    if isinstance(source, run_mixture.MixtureSource):
        batcher = run_mixture.make_mixture_batcher(config, source, tokenizer, train_tokens,
                                                   seq_len)
    elif isinstance(train_tokens, pc.PromptCompletionSplit):
        if train_tokens.seq_len != seq_len:
            raise ValueError(f"the prompt/completion rows were checked against seq_len "
                             f"{train_tokens.seq_len} but the run's is {seq_len}; allowed: set "
                             "data.seq_len")
        batcher = train_tokens.batcher(tc.batch_size, config.seed, dc.sampling,
                                       jax.process_index(), jax.process_count())
    elif train_tokens is not None:
        batcher = LMBatcher(train_tokens, seq_len, tc.batch_size, config.seed, mode=dc.sampling,
                            process_index=jax.process_index(),
                            process_count=jax.process_count())
    else:
        batcher = sharded.build_batcher(
            source, "train", tokenizer, seq_len=seq_len, global_batch_size=tc.batch_size,
            seed=config.seed, mode=dc.sampling, num_shards=dc.virtual_shards,
            shards_dir=os.path.join(dc.cache_dir or default_cache_dir(), "shards"),
            workers=dc.workers, process_index=jax.process_index(),
            process_count=jax.process_count(),
            log=lambda m: print(f"[process {jax.process_index()}] {m}", flush=True))
    documents = document_mask(dc, tokenizer)
    if documents is not None:
        batcher = DocumentBatcher(batcher, documents)
    return Prefetcher(batcher, dc.prefetch) if dc.prefetch else batcher


def train_size(batcher: Batcher, train_tokens: Optional[np.ndarray]) -> str:
    """The training tokens, as the start-up line reports them."""
    b = run_mixture.inner_batcher(batcher)  # (out of its Prefetcher and DocumentBatcher)
    if isinstance(train_tokens, run_mixture.MixtureSplit) or isinstance(
            b, run_mixture.mx.MixtureBatcher):
        return run_mixture.train_size(train_tokens, batcher)
    if isinstance(train_tokens, pc.PromptCompletionSplit):
        rows = f"{train_tokens.num_rows:,} rows"
        return (f"{len(train_tokens):,} ({rows} x {train_tokens.seq_len} positions, padded)"
                if train_tokens.layout == "pad" else f"{len(train_tokens):,} ({rows}, packed)")
    if train_tokens is not None:
        return f"{len(train_tokens):,}"
    assert isinstance(b, sharded.ShardedBatcher), type(b)  # no train tokens: the sharded pipeline
    return (f"{b.num_local_tokens:,} (this process's {len(b.streams)} streams of "
            f"{b.num_shards} virtual shards)")


def prepare_data(config: ml_collections.ConfigDict, workdir: str) -> str:
    """`train.py --prepare_data`: the run's tokenizer and this process's token files, then a
    one-line report; a later `train.py` with the same data config reads them as they are."""
    config = defaults.complete(config, defaults.base_config())
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    source, tokenizer, train_tokens, val_tokens = load_data(config, workdir)
    seq_len = config.data.seq_len or model_config_from(config, tokenizer.vocab_size).n_ctx
    batcher = make_batcher(config, source, tokenizer, train_tokens, seq_len)
    batcher.close()
    return (f"[process {jax.process_index()}] data ready: {train_size(batcher, train_tokens)} "
            f"train / {len(val_tokens):,} val tokens, tokenizer in {workdir}/tokenizer")


def evaluate(setup: Any, params, tokens: np.ndarray | pc.PromptCompletionSplit, seq_len: int,
             batch_size: int, max_batches: int = -1,
             documents: Optional[DocumentMask] = None) -> float:
    """Mean next-token loss over non-overlapping windows of a split; of a prompt/completion
    split, the mean over its completion tokens (its own eval batches and weights); of a
    mixture's split, over every corpus' tokens (`val_metrics` gives each corpus' too).

    Args:
      setup: the run's setup (its mesh and jitted eval step).
      params: the parameters, sharded as the setup says.
      tokens: the split's tokens, its PromptCompletionSplit or a mixture's MixtureSplit.
      seq_len: the window length.
      batch_size: windows (rows) per batch (over all processes).
      max_batches: batches to read (of each corpus of a mixture); < 0 = the whole split.
      documents: the run's document mask (`document_mask(config.data, tokenizer)`), or None.
    """
    return val_metrics(setup, params, tokens, seq_len, batch_size, max_batches,
                       documents)["val_loss"]


def _loss_sums(setup: Any, params, tokens, seq_len: int, batch_size: int, max_batches: int,
               documents: Optional[DocumentMask]) -> tuple[float, float]:
    tot, wsum = 0.0, 0.0
    where = dict(process_index=jax.process_index(), process_count=jax.process_count())
    if isinstance(tokens, pc.PromptCompletionSplit):
        batches = tokens.eval_batches(batch_size, **where)
    else:
        batches = eval_batches(tokens, seq_len, batch_size, **where)
    with setup.mesh:
        for i, b in enumerate(batches):
            if 0 <= max_batches <= i:
                break
            b = b if documents is None else documents.apply(b)
            s, w = setup.eval_step(params, setup.put_batch(b))
            tot += float(s)
            wsum += float(w)
    return tot, wsum


def val_metrics(setup: Any, params, tokens, seq_len: int, batch_size: int,
                max_batches: int = -1, documents: Optional[DocumentMask] = None) -> dict:
    """{'val_loss': loss (see `evaluate`)} and, of a mixture, {'val_loss/<name>': each
    corpus' loss} besides."""
    parts = run_mixture.as_parts(tokens) or {"": tokens}
    sums = {n: _loss_sums(setup, params, t, seq_len, batch_size, max_batches, documents)
            for n, t in parts.items()}
    out = {"val_loss": sum(t for t, _ in sums.values())
           / max(sum(w for _, w in sums.values()), 1.0)}
    out.update({f"val_loss/{n}": t / max(w, 1.0) for n, (t, w) in sums.items() if n})
    return out
