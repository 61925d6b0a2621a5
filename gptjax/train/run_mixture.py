"""A run's data when `data.mixture` names several corpora (gptjax.data.mixture): each corpus' source
and token cache (or shards), the tokenizer built from all of them, the mixture batcher, and what
the loop logs of it (realised proportions `mix/<name>`, a validation loss per corpus)."""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterator

import jax
import ml_collections

from gptjax.data import load_tokens
from gptjax.data import mixture as mx
from gptjax.data.corpora import default_cache_dir
from gptjax.data.documents import DocumentBatcher
from gptjax.data.prefetch import Prefetcher
from gptjax.multihost import main_process_first
from gptjax.train.experiment import build_source, check_mixture, run_tokenizer


class MixtureSource:
    """The corpora of a mixture as one text source for the tokenizer: its documents are every
    corpus' in turn (unweighted), its splits those of any corpus."""

    def __init__(self, sources: dict):
        self.sources = sources
        self.name = "mixture(" + ",".join(sources) + ")"
        self.splits = tuple(dict.fromkeys(s for src in sources.values() for s in src.splits))
        self.fingerprint = "|".join(f"{n}={s.fingerprint}" for n, s in sources.items())

    def _having(self, split: str) -> list:
        return [s for s in self.sources.values() if split in s.splits]

    def texts(self, split: str) -> Iterator[str]:
        return itertools.chain.from_iterable(s.texts(split) for s in self._having(split))

    def sample_texts(self, split: str, n: int) -> list:
        having = self._having(split)
        return [t for s in having for t in s.sample_texts(split, -(-n // len(having)))]


class MixtureSplit:
    """A split of each corpus of a mixture: `parts` {name: token ids}; len() is their total."""

    def __init__(self, parts: dict):
        self.parts = parts

    def __len__(self) -> int:
        return int(sum(len(t) for t in self.parts.values()))


def corpora(config: ml_collections.ConfigDict) -> list:
    """The parsed `data.mixture` of a config (an empty list: one corpus)."""
    return mx.parse_mixture(tuple(config.data.mixture))


def schedule(config: ml_collections.ConfigDict) -> mx.Schedule:
    return mx.make_schedule(corpora(config), tuple(config.data.mixture_schedule),
                            config.train.steps)


def mixture_phases(config: ml_collections.ConfigDict) -> tuple:
    """The 0-based steps where a mixture's weights change (() without a mixture)."""
    return schedule(config).starts[1:] if config.data.mixture else ()


def _corpus_config(config: ml_collections.ConfigDict, corpus: mx.Corpus
                   ) -> ml_collections.ConfigDict:
    """A config whose data block is the run's with the corpus' fields (typed like the run's)."""
    data = config.data.to_dict()
    for key, text in corpus.fields.items():
        typ = float if key == "validation_fraction" else int if key == "max_train_bytes" else str
        try:
            data[key] = typ(text)
        except ValueError:
            raise ValueError(f"data.mixture corpus {corpus.name!r}: {key}={text!r}; allowed: "
                             f"a {typ.__name__}") from None
    return ml_collections.ConfigDict({"data": data})


def load_mixture(config: ml_collections.ConfigDict, workdir: str) -> tuple:
    """`run_data.load_data` of a mixture: (MixtureSource, tokenizer, train MixtureSplit or None
    with the sharded pipeline, validation MixtureSplit)."""
    dc = config.data
    check_mixture(config)  # (train.py --prepare_data: before any data is read)
    cache_dir = dc.cache_dir or None

    def sources_and_tokenizer():
        source = MixtureSource({c.name: build_source(_corpus_config(config, c))
                                for c in corpora(config)})
        return source, run_tokenizer(config, workdir, source)

    def splits(source, tokenizer, names):
        return [MixtureSplit({n: load_tokens(s, split, tokenizer, cache_dir=cache_dir)
                              for n, s in source.sources.items()}) for split in names]

    if dc.pipeline == "single":
        def prepare():
            source, tokenizer = sources_and_tokenizer()
            return (source, tokenizer, *splits(source, tokenizer, ("train", dc.val_split)))

        return main_process_first("data", prepare)
    source, tokenizer = main_process_first("tokenizer", sources_and_tokenizer)
    return source, tokenizer, None, splits(source, tokenizer, (dc.val_split,))[0]


def make_mixture_batcher(config: ml_collections.ConfigDict, source: MixtureSource,
                         tokenizer: Any, train: MixtureSplit | None, seq_len: int) -> Any:
    """This process's MixtureBatcher (run_data.make_batcher puts it behind the document mask and
    the Prefetcher): from the corpora's token caches ('single'), or from this process's shards
    of each ('sharded')."""
    dc, tc = config.data, config.train
    sch = schedule(config)
    batcher = mx.build_batcher(
        sch, [source.sources[n] for n in sch.names], tokenizer,
        tokens=None if train is None else [train.parts[n] for n in sch.names], seq_len=seq_len,
        global_batch_size=tc.batch_size, seed=config.seed, mode=dc.sampling,
        num_shards=dc.virtual_shards,
        shards_dir=os.path.join(dc.cache_dir or default_cache_dir(), "shards"),
        workers=dc.workers, process_index=jax.process_index(), process_count=jax.process_count(),
        log=lambda m: print(f"[process {jax.process_index()}] {m}", flush=True))
    return batcher


def inner_batcher(batcher: Any) -> Any:
    """The batcher inside its Prefetcher and DocumentBatcher wrappers."""
    while isinstance(batcher, (Prefetcher, DocumentBatcher)):
        batcher = batcher.batcher
    return batcher


def mix_fields(batcher: Any, first: int, end: int) -> dict:
    """{'mix/<name>': share of the rows} over steps [first, end) of a mixture's batcher; {} for
    one corpus."""
    b = inner_batcher(batcher)
    if not isinstance(b, mx.MixtureBatcher) or end <= first:
        return {}
    return {f"mix/{n}": p for n, p in b.proportions(first, end).items()}


def train_size(train: MixtureSplit | None, batcher: Any) -> str:
    """The training tokens of a mixture, as the start-up line reports them."""
    b = inner_batcher(batcher)
    if train is not None:
        return f"{len(train):,} ({', '.join(f'{n} {len(t):,}' for n, t in train.parts.items())})"
    return (f"{sum(len(t) for t in b.tokens.values()):,} (this process's streams of "
            f"{len(b.schedule.names)} corpora)")


def shortest(split: Any) -> int:
    """Tokens of the shortest corpus of a MixtureSplit (of a plain split: its length)."""
    return min(len(t) for t in split.parts.values()) if isinstance(split, MixtureSplit) \
        else len(split)


def as_parts(split: Any) -> dict:
    """{name: tokens} of a MixtureSplit; {} otherwise."""
    return split.parts if isinstance(split, MixtureSplit) else {}
