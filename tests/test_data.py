"""Tests for gptjax.data: tfds corpora, the token cache, training and eval batches."""

import json
import os
import pathlib

import numpy as np
import pytest

from conftest import REPO
from gptjax import data
from gptjax.data import token_cache, tokenizers
from gptjax.data.batcher import Batcher
from gptjax.data.corpora.base import hash_bucket
from gptjax.defaults import base_config
from gptjax.train.experiment import build_source

SHARED_TFDS = pathlib.Path(os.environ.get("GPTJAX_SHARED_TFDS", REPO.parent / "shared" / "tfds"))


class ByteTokenizer(tokenizers.Tokenizer):
    """Stand-in tokenizer: UTF-8 bytes, eos 256; counts encode calls to observe the cache."""

    kind = "bytes"
    vocab_size = 257
    eos_id = 256

    def __init__(self):
        self.calls = 0

    def encode(self, text):
        self.calls += 1
        return list(text.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode(errors="replace")

    def _save_files(self, directory):
        return {"vocab_size": self.vocab_size, "eos_id": self.eos_id}

    @classmethod
    def _from_saved(cls, directory, settings):
        return cls()

    @classmethod
    def from_config(cls, **values):
        return cls()


class WideTokenizer(ByteTokenizer):
    """Same ids with a vocabulary too large for uint16 and no eos."""

    vocab_size = 70_000
    eos_id = None


def _write(path, text, encoding="utf-8"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding=encoding)
    return path


def _by_path(source, split):
    ds = source._data_source(split)
    return {ex["path"].decode(): ex["text"].decode() for ex in ds}


# ----------------------------------------------------------------------------------------------
# Corpora.
# ----------------------------------------------------------------------------------------------


def test_local_text_glob_prepares_reads_back_and_splits_by_file(tmp_path):
    texts = {f"docs/sub/f{i}.txt": f"document {i} " * (i + 3) for i in range(12)}
    for rel, text in texts.items():
        _write(tmp_path / rel, text)
    _write(tmp_path / "docs/sub/skip.md", "not matched")
    tfds_dir = tmp_path / "tfds"

    source = data.get_source("local_text", tfds_dir, paths=str(tmp_path / "docs/**/*.txt"))
    assert source.splits == ("train", "validation")
    train, val = _by_path(source, "train"), _by_path(source, "validation")
    assert train and val and not set(train) & set(val)
    assert {f"sub/{p}": t for p, t in {**train, **val}.items()} == {
        rel[len("docs/") :]: t for rel, t in texts.items()
    }
    # The split is a function of the relative path only (the lowest hash when none is below 10%).
    buckets = {rel: hash_bucket(rel) for rel in {**train, **val}}
    in_bucket = {rel for rel, h in buckets.items() if h < 0.1}
    assert set(val) == (in_bucket or {min(buckets, key=buckets.get)})
    # Documents come back in file order, through the generic tfds name as well.
    again = list(data.load_texts(source.name, "train", tfds_dir))
    assert again == [train[p] for p in sorted(train)]


def test_local_text_file_list_and_reuse_and_invalidation(tmp_path):
    a = _write(tmp_path / "a.txt", "alpha " * 50)
    b = _write(tmp_path / "b.txt", "beta " * 50)
    first = data.prepare_local_text([a, b], tmp_path / "tfds")
    assert data.prepare_local_text([str(a), str(b)], tmp_path / "tfds").name == first.name

    os.utime(b, ns=(0, 0))  # Same content, new mtime: a changed input must not reuse the old data.
    changed = data.prepare_local_text([a, b], tmp_path / "tfds")
    assert changed.name != first.name
    assert sorted([*changed.texts("train"), *changed.texts("validation")]) == [
        "alpha " * 50,
        "beta " * 50,
    ]


def test_single_file_split_is_exact_nanogpt_90_10(tmp_path):
    text = "".join(f"line {i}: héllo wörld ☃\n" for i in range(997))
    path = _write(tmp_path / "input.txt", text)
    source = data.prepare_local_text(path, tmp_path / "tfds")
    n = len(text)
    assert list(source.texts("train")) == [text[: int(n * 0.9)]]
    assert list(source.texts("validation")) == [text[int(n * 0.9) :]]


def test_local_text_documents_and_encoding(tmp_path):
    path = _write(tmp_path / "docs.txt", "one<|sep|>two<|sep|>  \n<|sep|>three", encoding="latin-1")
    source = data.prepare_local_text(
        path, tmp_path / "tfds", document_separator="<|sep|>", validation_fraction=0.0
    )
    assert source.splits == ("train",)
    assert list(source.texts("train")) == ["one", "two", "three"]

    latin = _write(tmp_path / "latin.txt", "café " * 20, encoding="latin-1")
    with pytest.raises(ValueError, match="latin.txt.*not valid utf-8"):
        data.prepare_local_text(latin, tmp_path / "tfds")
    assert "café" in next(
        data.prepare_local_text(latin, tmp_path / "tfds", encoding="latin-1").texts("train")
    )


def test_config_data_encoding_reaches_local_text(tmp_path):
    """train.py's `data.encoding` reads Latin-1 books (two of the shared Gutenberg files are);
    an unknown codec name is a one-line ValueError."""
    _write(tmp_path / "a.txt", "caf\u00e9 na\u00efve " * 20, encoding="latin-1")
    _write(tmp_path / "b.txt", "plain ascii " * 20, encoding="latin-1")
    c = base_config()
    c.data.dataset = "local_text"
    c.data.path = str(tmp_path / "*.txt")
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.validation_fraction = 0.0
    with pytest.raises(ValueError, match="a.txt.*not valid utf-8"):
        build_source(c)
    c.data.encoding = "latin-1"
    texts = sorted(build_source(c).texts("train"))
    assert texts == ["caf\u00e9 na\u00efve " * 20, "plain ascii " * 20]
    c.data.encoding = "latin-one"
    with pytest.raises(ValueError, match="encoding='latin-one' is not a Python codec"):
        build_source(c)


def test_python_stdlib_split_is_deterministic_disjoint_and_capped(tmp_path):
    config = data.python_stdlib_config(max_train_bytes=150_000)
    assert config == data.python_stdlib_config(max_train_bytes=150_000)
    assert config.train_files and config.validation_files
    assert not set(config.train_files) & set(config.validation_files)
    for rel in config.train_files + config.validation_files:
        parts = rel.split("/")
        assert rel.endswith(".py") and not {
            "test",
            "tests",
            "site-packages",
            "idlelib",
            "lib2to3",
        } & set(parts)
    for rel in config.validation_files:
        assert hash_bucket(rel) < 0.1
    assert sum(os.path.getsize(os.path.join(config.root, r)) for r in config.train_files) <= 150_000
    assert data.python_stdlib_config(max_train_bytes=300_000).name != config.name

    source = data.prepare_python_stdlib(tmp_path / "tfds", max_train_bytes=150_000)
    train, val = _by_path(source, "train"), _by_path(source, "validation")
    assert tuple(train) == config.train_files and tuple(val) == config.validation_files
    assert all(text.strip() for text in train.values())


@pytest.mark.skipif(
    not (SHARED_TFDS / "tiny_shakespeare").is_dir(),
    reason=f"no prepared tfds data at {SHARED_TFDS}",
)
def test_tiny_shakespeare_from_shared_tfds_by_name():
    train = list(data.load_texts("tiny_shakespeare", "train", SHARED_TFDS))
    val = list(data.load_texts("tiny_shakespeare", "validation", SHARED_TFDS))
    assert len(train) == 1 and len(val) == 1
    assert train[0].startswith("First Citizen:") and len(train[0]) == 1_003_854
    assert data.get_source("tiny_shakespeare:1.0.0", SHARED_TFDS).fingerprint.startswith(
        "tiny_shakespeare/1.0.0|"
    )


def test_errors_are_one_line_and_name_the_bad_value(tmp_path):
    def check(exc, fn, *needles):
        with pytest.raises(exc) as info:
            fn()
        message = str(info.value)
        assert "\n" not in message, message
        for needle in needles:
            assert needle in message, message

    tmp_path.joinpath("tfds").mkdir()
    check(
        ValueError,
        lambda: data.get_source("tiny_shakspeare", tmp_path / "tfds"),
        "tiny_shakspeare",
        "tiny_shakespeare",
    )
    check(
        ValueError,
        lambda: data.get_source("no_such_corpus_xyz", tmp_path / "tfds"),
        "no_such_corpus_xyz",
        "python_stdlib",
    )
    check(
        FileNotFoundError,
        lambda: data.get_source("tiny_shakespeare", tmp_path / "missing"),
        "missing",
        "does not exist",
    )
    check(
        FileNotFoundError,
        lambda: data.get_source("lm1b", tmp_path / "tfds"),
        "lm1b",
        "not prepared",
    )
    check(ValueError, lambda: data.get_source("lm1b"), "lm1b", "data_dir")
    check(ValueError, lambda: data.get_source("local_text", tmp_path), "paths")
    check(
        FileNotFoundError, lambda: data.local_text_config(str(tmp_path / "*.nothing")), "*.nothing"
    )
    check(FileNotFoundError, lambda: data.local_text_config(tmp_path / "gone.txt"), "gone.txt")
    _write(tmp_path / "empty.txt", "")
    check(
        ValueError,
        lambda: data.local_text_config(tmp_path / "empty.txt"),
        "empty corpus",
        "empty.txt",
    )
    check(
        ValueError,
        lambda: data.local_text_config(tmp_path / "empty.txt", split_by="lines"),
        "lines",
        "'chars'",
    )

    check(
        ValueError,
        lambda: data.prepare_local_text(_write(tmp_path / "x.txt", "x"), tmp_path / "tfds"),
        "empty corpus",
        "'train'",
        "x.txt",
    )
    in_validation = next(
        f"f{i}.txt" for i in range(1000) if hash_bucket(f"f{i}.txt") < 0.1
    )
    check(
        ValueError,
        lambda: data.local_text_config(_write(tmp_path / in_validation, "text"), split_by="files"),
        "split_by='files'",
        "validation",
    )
    check(
        ValueError,
        lambda: data.cached_tokens(
            lambda: iter(["", ""]),
            ByteTokenizer(),
            dataset_fingerprint="d",
            split="train",
            cache_dir=str(tmp_path / "c"),
        ),
        "no tokens",
    )
    assert os.listdir(tmp_path / "c") == []

    source = data.prepare_local_text(
        _write(tmp_path / "tiny.txt", "abcdefghij" * 3), tmp_path / "tfds"
    )
    check(ValueError, lambda: list(source.texts("test")), "'test'", "train, validation")
    tokens = data.load_tokens(source, "train", ByteTokenizer(), cache_dir=tmp_path / "cache")
    check(
        ValueError, lambda: data.LMBatcher(tokens, 64, 2, seed=0), "27 tokens", "seq_len=64", "65"
    )
    check(ValueError, lambda: next(data.eval_batches(tokens, 64, 2)), "27 tokens", "seq_len=64")
    check(
        ValueError, lambda: data.LMBatcher(tokens, 4, 3, seed=0, process_count=2), "not divisible"
    )
    check(
        ValueError,
        lambda: data.LMBatcher(tokens, 4, 2, seed=0, mode="sequential"),
        "sequential",
        "'packed'",
    )


# ----------------------------------------------------------------------------------------------
# Token cache.
# ----------------------------------------------------------------------------------------------


def test_token_cache_is_reused_and_keyed_by_fingerprints(tmp_path, monkeypatch):
    # Exercise the streaming writes with tiny buffers.
    monkeypatch.setattr(token_cache, "_FLUSH_TOKENS", 4)
    docs = ["hello", "", "wörld", "!"]
    tok = ByteTokenizer()
    kwargs = dict(dataset_fingerprint="corpus|1", split="train", cache_dir=str(tmp_path))

    tokens = data.cached_tokens(lambda: iter(docs), tok, tokenizer_fingerprint="bytes-v1", **kwargs)
    assert tok.calls == 4
    assert tokens.dtype == np.uint16
    eos = [tok.eos_id]
    assert tokens.tolist() == list(b"hello") + eos + list("wörld".encode()) + eos + list(b"!")

    again = data.cached_tokens(lambda: iter(docs), tok, tokenizer_fingerprint="bytes-v1", **kwargs)
    assert tok.calls == 4 and np.array_equal(again, tokens)

    data.cached_tokens(lambda: iter(docs), tok, tokenizer_fingerprint="bytes-v2", **kwargs)
    assert tok.calls == 8
    data.cached_tokens(
        lambda: iter(docs),
        tok,
        tokenizer_fingerprint="bytes-v1",
        **{**kwargs, "split": "validation"},
    )
    assert tok.calls == 12

    wide = data.cached_tokens(lambda: iter(docs), WideTokenizer(), **kwargs)
    assert wide.dtype == np.uint32 and wide.tolist() == list("hellowörld!".encode())
    assert tokenizers.fingerprint(WideTokenizer()) != tokenizers.fingerprint(ByteTokenizer())
    # Without a given fingerprint the key is the tokenizer's file hash.
    assert os.path.exists(
        data.token_cache_path(
            str(tmp_path), "corpus|1", "train", tokenizers.fingerprint(WideTokenizer())
        )
    )
    # Atomic writes leave no temporary files behind.
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]


def test_load_tokens_from_a_source_uses_its_fingerprint(tmp_path):
    source = data.prepare_local_text(
        _write(tmp_path / "t.txt", "to be or not to be " * 40), tmp_path / "tfds"
    )
    tok = ByteTokenizer()
    train = data.load_tokens(
        source, "train", tok, cache_dir=tmp_path / "cache", tokenizer_fingerprint="b"
    )
    data.load_tokens(source, "train", tok, cache_dir=tmp_path / "cache", tokenizer_fingerprint="b")
    assert tok.calls == 1 and bytes(train.tolist()).decode() == next(source.texts("train"))


def test_a_cache_keyed_by_the_probe_hash_is_adopted_not_rebuilt(tmp_path):
    """Caches written while tokenizers were keyed by a hash of probe encodings keep loading."""
    docs = ["hello", "wörld"]
    kwargs = dict(dataset_fingerprint="corpus|1", split="train", cache_dir=str(tmp_path))
    # The probe hash of ByteTokenizer, as the cache key it wrote under: pinned, so the
    # migration keeps finding caches on disk.
    probe_fp = "c61cf08de61a7584"
    assert token_cache._probe_fingerprint(ByteTokenizer()) == probe_fp
    old_path = data.token_cache_path(str(tmp_path), "corpus|1", "train", probe_fp)
    assert os.path.basename(old_path) == "corpus-train-f402243e3279355c1ac6.npy"
    written = data.cached_tokens(
        lambda: iter(docs), ByteTokenizer(), tokenizer_fingerprint=probe_fp, **kwargs
    )
    assert os.path.exists(old_path)

    def no_texts():
        raise AssertionError("re-tokenized a cached split")

    tok = ByteTokenizer()
    adopted = data.cached_tokens(no_texts, tok, **kwargs)
    assert np.array_equal(adopted, written) and tok.calls == len(token_cache._PROBES)
    new_fp = tokenizers.fingerprint(tok)
    new_path = data.token_cache_path(str(tmp_path), "corpus|1", "train", new_fp)
    assert os.path.exists(new_path) and not os.path.exists(old_path)
    assert not os.path.exists(old_path[: -len(".npy")] + ".json")
    with open(new_path[: -len(".npy")] + ".json") as f:
        meta = json.load(f)
    assert meta["tokenizer"] == new_fp and meta["num_tokens"] == len(written) == 12
    # Found under the new key from now on: no probing, no tokenizing.
    assert np.array_equal(data.cached_tokens(no_texts, tok, **kwargs), written)
    assert tok.calls == len(token_cache._PROBES)
    # An explicit fingerprint was the key before as well: nothing to adopt.
    data.cached_tokens(lambda: iter(docs), tok, tokenizer_fingerprint="given", **kwargs)
    assert tok.calls == len(token_cache._PROBES) + len(docs)


def test_builders_keep_the_names_prepared_data_is_found_under(tmp_path, monkeypatch):
    """Prepared datasets and token caches in ~/.cache/gptjax are keyed by these names."""
    assert (data.LocalText.name, data.PythonStdlib.name) == ("local_text", "python_stdlib")
    assert str(data.LocalText.VERSION) == str(data.PythonStdlib.VERSION) == "1.0.0"
    source = data.prepare_local_text(_write(tmp_path / "t.txt", "to be or not " * 40),
                                     tmp_path / "tfds")
    assert source.name.startswith("local_text/t-") and source.name.endswith(":1.0.0")
    assert source.fingerprint.startswith("local_text/t-")
    # Prepared once: opening it again reads the files written, without generating examples.
    monkeypatch.setattr(data.LocalText, "_generate_examples", None)
    assert data.prepare_local_text(tmp_path / "t.txt", tmp_path / "tfds") == source


# ----------------------------------------------------------------------------------------------
# Training and eval batches.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["packed", "random_offset"])
def test_batch_is_a_pure_function_of_seed_and_step(mode):
    tokens = np.random.default_rng(0).integers(0, 50_000, size=5_000).astype(np.uint16)
    a = data.LMBatcher(tokens, 16, 8, seed=3, mode=mode)
    b = data.LMBatcher(tokens, 16, 8, seed=3, mode=mode)
    for step in (0, 7, 1000):
        x, y = a.batch(step), b.batch(step)
        assert x["inputs"].shape == x["targets"].shape == (8, 16) and x["inputs"].dtype == np.int32
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["inputs"][:, 1:], x["targets"][:, :-1])
    assert not np.array_equal(a.batch(0)["inputs"], a.batch(1)["inputs"])
    assert not np.array_equal(
        a.batch(0)["inputs"], data.LMBatcher(tokens, 16, 8, seed=4, mode=mode).batch(0)["inputs"]
    )
    # Windows are real slices of the corpus: targets continue the inputs.
    starts = [
        np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(tokens, 17) == row, axis=1))
        for row in np.concatenate([a.batch(5)["inputs"], a.batch(5)["targets"][:, -1:]], axis=1)
    ]
    assert all(len(s) for s in starts)


def test_packed_mode_uses_every_window_once_per_epoch_across_epoch_boundaries():
    seq_len, batch, n_windows = 4, 6, 23  # 23 windows: epochs end in the middle of batches.
    tokens = np.arange(n_windows * seq_len + 1 + 3, dtype=np.uint32)  # 3 tail tokens never fit.
    batcher = data.LMBatcher(tokens, seq_len, batch, seed=11)
    assert batcher.num_windows == n_windows
    windows = np.concatenate(
        [batcher.batch(s)["inputs"][:, 0] // seq_len for s in range(3 * n_windows // batch + 2)]
    )
    for epoch in range(3):
        assert sorted(windows[epoch * n_windows : (epoch + 1) * n_windows]) == list(
            range(n_windows)
        )
    assert not np.array_equal(
        windows[:n_windows], windows[n_windows : 2 * n_windows]
    )  # Reshuffled per epoch.

    offsets = data.LMBatcher(tokens, seq_len, 64, seed=1, mode="random_offset").batch(0)["inputs"][
        :, 0
    ]
    assert offsets.min() >= 0 and offsets.max() <= len(tokens) - seq_len - 1


@pytest.mark.parametrize("mode", ["packed", "random_offset"])
def test_process_slices_concatenate_to_the_global_batch(mode):
    tokens = np.arange(997, dtype=np.uint32)
    whole = data.LMBatcher(tokens, 8, 12, seed=5, mode=mode)
    parts = [
        data.LMBatcher(tokens, 8, 12, seed=5, mode=mode, process_index=p, process_count=2)
        for p in range(2)
    ]
    for step in (0, 9, 40):
        for key in ("inputs", "targets"):
            joined = np.concatenate([p.batch(step)[key] for p in parts])
            np.testing.assert_array_equal(joined, whole.batch(step)[key])


def test_state_round_trip_and_mismatch():
    tokens = np.arange(2_000, dtype=np.uint16)
    batcher = data.LMBatcher(tokens, 8, 4, seed=2)
    assert isinstance(batcher, Batcher)  # batch(step), state(), restore(), close()
    assert not hasattr(batcher, "step") and not hasattr(batcher, "__next__")  # the loop owns it
    state = batcher.state()
    assert state == dict(seed=2, mode="packed", fingerprint=batcher.fingerprint, seq_len=8,
                         global_batch_size=4)
    expected = batcher.batch(5)

    resumed = data.LMBatcher.from_state(state, tokens, process_index=1, process_count=2)
    np.testing.assert_array_equal(resumed.batch(5)["inputs"], expected["inputs"][2:])
    fresh = data.LMBatcher(tokens, 8, 4, seed=2)
    fresh.restore(dict(state, step=5))  # a checkpoint's data state carries the loop's step
    np.testing.assert_array_equal(fresh.batch(5)["inputs"], expected["inputs"])
    fresh.close()

    with pytest.raises(ValueError, match="fingerprint"):
        data.LMBatcher.from_state(state, tokens[::-1].copy())
    with pytest.raises(ValueError, match="seed=2.*now 3"):
        data.LMBatcher(tokens, 8, 4, seed=3).restore(state)


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_eval_batches_cover_each_window_once(drop_remainder):
    seq_len, batch, n = 8, 4, 8 * 10 + 1 + 5  # 10 full windows and 5 tail targets.
    tokens = np.arange(n, dtype=np.uint16)
    batches = list(data.eval_batches(tokens, seq_len, batch, drop_remainder=drop_remainder))
    assert len(batches) == 3
    weights = np.concatenate([b["weights"] for b in batches])
    targets = np.concatenate([b["targets"] for b in batches])
    inputs = np.concatenate([b["inputs"] for b in batches])
    counted = targets[weights > 0]
    expected_targets = np.arange(1, 81) if drop_remainder else np.arange(1, n)
    np.testing.assert_array_equal(np.sort(counted), expected_targets)
    np.testing.assert_array_equal(inputs[weights > 0] + 1, counted)
    assert weights.dtype == np.float32 and weights.sum() == len(expected_targets)

    # Two processes see the halves of every batch.
    halves = [
        list(
            data.eval_batches(
                tokens,
                seq_len,
                batch,
                process_index=p,
                process_count=2,
                drop_remainder=drop_remainder,
            )
        )
        for p in range(2)
    ]
    for i, b in enumerate(batches):
        for key in ("inputs", "targets", "weights"):
            np.testing.assert_array_equal(
                np.concatenate([halves[0][i][key], halves[1][i][key]]), b[key]
            )
