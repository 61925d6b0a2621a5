"""The tokenizer interface, the one registry of tokenizer kinds, and a tokenizer's identity.

Every tokenizer maps text to a list of ints and back, exposes its special ids, and saves itself
into a directory as `tokenizer.json` (kind and settings) plus its model files, so a run directory
is self-contained and `load_tokenizer(directory)` rebuilds the same tokenizer without the corpus,
the shared data folder or network access. `encode` never adds special tokens; the data pipeline
appends `eos_id` after each document.

Each kind lives in its own module (char, sentencepiece, gpt2_bpe, openai_gpt) and enters `KINDS`
through `register` when the package is imported, so this module needs none of them.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gptjax.config import ConfigError

CONFIG_NAME = "tokenizer.json"
_FORMAT_VERSION = 1
# Word-end marker of OpenAI GPT-1's vocabulary; `from_hf_files` tells GPT-1's files by it.
END_OF_WORD = "</w>"

PathLike = str | os.PathLike


class Tokenizer(abc.ABC):
    """Text <-> token ids: the interface every gptjax tokenizer implements."""

    kind: str
    # Which of a corpus's splits a tokenizer of this kind is built from: None (read from files),
    # "train" (trained on the training split) or "all" (every split, so no character is unknown).
    builds_from: str | None = None

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, i.e. the rows the embedding table needs."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Maps `text` to token ids, adding no special tokens."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Maps token ids (a list, or a 1-D integer numpy/jax array) back to text."""

    @property
    def special_ids(self) -> dict[str, int]:
        """Special tokens by role or text, e.g. `{"eos": 50256}`; may be empty."""
        return {}

    @property
    def eos_id(self) -> int | None:
        """The id that ends a document, or None if the tokenizer has none."""
        return self.special_ids.get("eos")

    def save(self, directory: PathLike) -> None:
        """Writes `tokenizer.json` and the model files into `directory`.

        Args:
          directory: created if missing; an earlier save there is overwritten.
        """
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"format_version": _FORMAT_VERSION, "kind": self.kind,
                  "settings": self._save_files(directory)}
        # Write then rename, so an interrupted save never leaves a half-written config for
        # load_tokenizer to trip over when the run resumes.
        tmp = directory / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, directory / CONFIG_NAME)

    @abc.abstractmethod
    def _save_files(self, directory: pathlib.Path) -> dict[str, Any]:
        """Writes model files into `directory`; returns the settings for `tokenizer.json`."""

    @classmethod
    @abc.abstractmethod
    def _from_saved(cls, directory: pathlib.Path, settings: dict[str, Any]) -> Tokenizer:
        """Rebuilds the tokenizer from what `_save_files` wrote."""

    @classmethod
    @abc.abstractmethod
    def from_config(cls, *, texts: Sequence[str], directory: PathLike | None, vocab_size: int,
                    path: str, unknown: str, user_defined_symbols: Sequence[str]) -> Tokenizer:
        """Builds the tokenizer from config values, each kind reading those it needs.

        `build_tokenizer` documents the arguments; it is the one caller.
        """

    def _checked_ids(self, ids: Sequence[int] | np.ndarray) -> list[int]:
        """`ids` as Python ints, each checked to lie in [0, vocab_size)."""
        if not (isinstance(ids, list) and all(type(i) is int for i in ids)):
            arr = np.asarray(ids)
            if arr.size and (arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer)):
                raise ValueError(f"decode expects a 1-D sequence of ints, got shape {arr.shape} "
                                 f"and dtype {arr.dtype}")
            ids = arr.astype(np.int64).tolist()
        n = self.vocab_size
        # Out-of-range ids would otherwise index from the end (char) or crash inside C++.
        bad = next((i for i in ids if not 0 <= i < n), None)
        if bad is not None:
            raise ValueError(f"id {bad} is outside the vocabulary [0, {n})")
        return ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class FileTokenizer(Tokenizer):
    """A kind fixed by files someone else trained (GPT-2's, GPT-1's), read from a directory."""

    # What the directory holds, for the error that asks for it.
    FILES = ""

    @classmethod
    @abc.abstractmethod
    def from_files(cls, path: PathLike) -> FileTokenizer:
        """Reads the tokenizer from the files in the directory `path`."""

    @classmethod
    def from_config(cls, *, texts: Sequence[str], directory: PathLike | None, vocab_size: int,
                    path: str, unknown: str, user_defined_symbols: Sequence[str]) -> Tokenizer:
        del texts, directory, vocab_size, unknown, user_defined_symbols  # fixed by its files
        if not path:
            raise ConfigError(f"tokenizer kind {cls.kind!r} needs path= (a directory with "
                              f"{cls.FILES})")
        return cls.from_files(path)


# ------------------------------------------------------------------------------------------------
# Files shared by the kinds that save model files.
# ------------------------------------------------------------------------------------------------


def read_json(path: pathlib.Path) -> Any:
    """The JSON in `path`; ValueError naming the file if it is not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def require_file(path: pathlib.Path) -> pathlib.Path:
    """`path`, or FileNotFoundError naming it if it is not a file."""
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def copy_into(source: pathlib.Path, target: pathlib.Path) -> None:
    """Copies `source` to `target`, doing nothing when they are the same file."""
    # Saving a tokenizer into the directory it was loaded from must not fail on a self-copy.
    if not (target.exists() and os.path.samefile(source, target)):
        shutil.copyfile(source, target)


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_with_hashes(directory: pathlib.Path,
                     sources: Iterable[tuple[pathlib.Path, str]]) -> dict[str, Any]:
    """Copies (source, name) files into `directory`; returns {name: {sha256, source}}."""
    files = {}
    for source, name in sources:
        copy_into(source, directory / name)
        files[name] = {"sha256": _sha256(directory / name), "source": str(source.resolve())}
    return files


def check_hashes(directory: pathlib.Path, settings: dict[str, Any]) -> None:
    """Raises ValueError if a saved file is missing or differs from the hash recorded for it."""
    for name, info in settings["files"].items():
        path = require_file(directory / name)
        if _sha256(path) != info["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the one in {CONFIG_NAME}")


# ------------------------------------------------------------------------------------------------
# The registry, loading and building.
# ------------------------------------------------------------------------------------------------

# {kind: class}: the one list of tokenizer kinds; config checks and builders read it.
KINDS: dict[str, type[Tokenizer]] = {}


def register(cls: type[Tokenizer]) -> type[Tokenizer]:
    """Class decorator: enters a Tokenizer subclass into `KINDS` under its `kind`."""
    if KINDS.get(cls.kind, cls) is not cls:
        raise ValueError(f"tokenizer kind {cls.kind!r} is registered twice")
    KINDS[cls.kind] = cls
    return cls


def _tokenizer_class(kind: Any, where: str = "") -> type[Tokenizer]:
    if kind not in KINDS:
        raise ConfigError(f"{where}unknown tokenizer kind {kind!r}; "
                          f"expected one of {', '.join(map(repr, KINDS))}")
    return KINDS[kind]


def load_tokenizer(directory: PathLike) -> Tokenizer:
    """Loads a tokenizer written by `Tokenizer.save` (or `SentencePieceTokenizer.train`).

    Args:
      directory: the directory holding `tokenizer.json`.

    Returns:
      The tokenizer, of the class its recorded `kind` names.

    Raises:
      FileNotFoundError: if the directory, its `tokenizer.json` or a model file is missing.
      ValueError: if `tokenizer.json` is malformed or names an unknown kind.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {directory}")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: save a tokenizer there first")
    config = read_json(config_path)
    if not isinstance(config, dict) or not isinstance(config.get("settings"), dict):
        raise ValueError(f"{config_path}: expected an object with 'kind' and 'settings'")
    if config.get("format_version", 1) > _FORMAT_VERSION:
        raise ValueError(f"{config_path}: format_version {config['format_version']} is newer "
                         f"than this gptjax reads ({_FORMAT_VERSION})")
    cls = _tokenizer_class(config.get("kind"), where=f"{config_path}: ")
    try:
        return cls._from_saved(directory, config["settings"])
    except KeyError as e:
        raise ValueError(f"{config_path}: setting {e.args[0]!r} is missing") from e


def build_tokenizer(kind: str, *, texts: Iterable[str] = (), directory: PathLike | None = None,
                    vocab_size: int = 0, path: str = "", unknown: str = "error",
                    user_defined_symbols: Sequence[str] = ()) -> Tokenizer:
    """Builds a tokenizer from config values; the one builder behind every config's tokenizer.

    Each kind reads only the values it needs:
    - "char": the sorted character set of `texts` (joined); `unknown` ("error" or "skip") is
      what `encode` does with a character outside it.
    - "sentencepiece": with `texts`, a model trained on them into `directory` with
      `vocab_size` ids and `user_defined_symbols` (saved there); without, the model saved in
      `directory`.
    - "gpt2_bpe": the vocabulary and merges files in the directory `path`.
    - "openai_gpt": `vocab.json` + `merges.txt` in the directory `path`.
    The result is not saved (except where SentencePiece trains); callers save it where they keep it.

    Args:
      kind: a `KINDS` name.
      texts: documents (char, sentencepiece training).
      directory: sentencepiece's model directory.
      vocab_size: sentencepiece's vocabulary size when training.
      path: the files of gpt2_bpe and openai_gpt.
      unknown: char only; see above.
      user_defined_symbols: sentencepiece only: strings that become single ids.

    Returns:
      The tokenizer.

    Raises:
      ConfigError: (a ValueError) naming a bad `kind` and the allowed ones, or a missing value.
    """
    return _tokenizer_class(kind).from_config(
        texts=list(texts), directory=directory, vocab_size=vocab_size, path=path,
        unknown=unknown, user_defined_symbols=tuple(user_defined_symbols))


def from_hf_files(path: PathLike) -> Tokenizer:
    """The BPE tokenizer of a Hugging Face / OpenAI model directory: OpenAI GPT-1's when its
    vocabulary marks word ends with '</w>' (openai-gpt), GPT-2's byte BPE otherwise."""
    directory = pathlib.Path(path)
    vocab = directory / "vocab.json"
    if vocab.is_file() and (directory / "merges.txt").is_file():
        tokens = read_json(vocab)
        if isinstance(tokens, dict) and any(t.endswith(END_OF_WORD) for t in tokens):
            return KINDS["openai_gpt"](vocab, directory / "merges.txt")
    return KINDS["gpt2_bpe"].from_files(directory)


def from_model_dir(path: PathLike) -> Tokenizer:
    """The tokenizer of a pretrained model's directory, whichever way it was saved: a gptjax
    tokenizer (`tokenizer.json` with its kind), GPT-2's / GPT-1's BPE files (`vocab.json` +
    `merges.txt`, or OpenAI's `encoder.json` + `vocab.bpe`), or only transformers' fast-tokenizer
    `tokenizer.json` (what transformers 5's `save_pretrained` writes), whose BPE vocabulary and
    merges are written out once as `vocab.json` + `merges.txt` in a cache directory keyed by its
    hash and read from there."""
    directory = pathlib.Path(path)
    tok_json = directory / "tokenizer.json"
    has_bpe_files = (directory / "vocab.json").is_file() or (directory / "encoder.json").is_file()
    if tok_json.is_file() and not has_bpe_files:
        d = read_json(tok_json)
        if isinstance(d, dict) and "kind" in d:
            return load_tokenizer(directory)  # a gptjax tokenizer saved with .save()
        if isinstance(d, dict) and isinstance(d.get("model"), dict):
            return from_hf_files(_bpe_files_of(tok_json, d["model"]))
    return from_hf_files(directory)


def _bpe_files_of(tok_json: pathlib.Path, model: dict) -> pathlib.Path:
    """A directory holding `vocab.json` + `merges.txt` written from transformers' tokenizer.json
    `model` (a BPE model; anything else is a one-line ValueError)."""
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ValueError(f"{tok_json}: a {model.get('type')!r} tokenizer model; allowed: a BPE "
                         "tokenizer (GPT-2's or GPT-1's), or vocab.json + merges.txt beside it")
    digest = hashlib.sha256(tok_json.read_bytes()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache")
    out = cache / "gptjax" / "hf_tokenizers" / digest
    if not (out / "merges.txt").is_file():
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"{digest}.", dir=_mkdir(out.parent)))
        (tmp / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False),
                                        encoding="utf-8")
        (tmp / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                        encoding="utf-8")
        try:
            os.replace(tmp, out)  # atomic: a concurrent writer's copy is the same files
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _mkdir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------------
# Identity.
# ------------------------------------------------------------------------------------------------


def _without_sources(x: Any) -> Any:
    """`x` less every "source" entry: where files were copied from is not part of a tokenizer."""
    if isinstance(x, dict):
        return {k: _without_sources(v) for k, v in x.items() if k != "source"}
    return [_without_sources(v) for v in x] if isinstance(x, list) else x


def fingerprint(tokenizer: Tokenizer) -> str:
    """The tokenizer's identity: a hash of the files `tokenizer.save` writes.

    Vocabulary, merges and model files are hashed with their names, and `tokenizer.json` without
    its "source" entries, so any change to the vocabulary shows, even one that keeps its size,
    while the same tokenizer copied from elsewhere keeps its fingerprint. Checkpoints record it
    and token caches are keyed by it.

    Args:
      tokenizer: the tokenizer.

    Returns:
      16 hex digits.
    """
    h = hashlib.sha256()
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save(d)
        for root, _, files in sorted(os.walk(d)):
            for name in sorted(files):
                file = os.path.join(root, name)
                h.update(os.path.relpath(file, d).encode())
                with open(file, "rb") as fh:
                    data = fh.read()
                if name == CONFIG_NAME:
                    data = json.dumps(_without_sources(json.loads(data)), sort_keys=True).encode()
                h.update(data)
    return h.hexdigest()[:16]


def tokenizer_info(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint records of its tokenizer.

    Args:
      tokenizer: the tokenizer.

    Returns:
      {"kind", "vocab_size", "fingerprint"} (see `fingerprint`).
    """
    return {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "fingerprint": fingerprint(tokenizer)}
