"""SentencePiece BPE trained here so that `decode(encode(text)) == text`."""

from __future__ import annotations

import io
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import sentencepiece as spm

from gptjax.config import ConfigError
from gptjax.data.tokenizers.base import (
    PathLike,
    Tokenizer,
    copy_into,
    load_tokenizer,
    register,
    require_file,
)

SPM_MODEL_NAME = "spm.model"
_LINES_WITH_LEADING_NEWLINES = re.compile(r"\n*[^\n]*")


def _training_sentences(texts_or_files: Iterable[str | os.PathLike] | str | os.PathLike,
                        max_bytes: int) -> Iterator[str]:
    """Yields the documents cut into training "sentences" of at most `max_bytes` UTF-8 bytes.

    SentencePiece's trainer strips trailing newlines from every sentence it is given, reads
    input files line by line (so a model trained from files never sees a newline), and skips
    sentences longer than `max_sentence_length`. Whole documents are therefore fed through the
    iterator, which lets BPE learn pieces such as ':\\n' and '\\n\\n', and a long document is cut
    just before a run of '\\n', so that the newlines start the next chunk and are kept.
    """
    if isinstance(texts_or_files, (str, os.PathLike)):
        texts_or_files = [texts_or_files]
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            text = pathlib.Path(item).read_text(encoding="utf-8")
        elif isinstance(item, str):
            text = item
        else:
            raise TypeError(f"expected str texts or os.PathLike files, got {type(item).__name__}")
        chunk, size = [], 0
        # Pieces are a line with the newlines before it, so no chunk but a document's last
        # ends in a newline, even at a blank line.
        for piece in _LINES_WITH_LEADING_NEWLINES.findall(text):
            n = len(piece.encode("utf-8"))
            if chunk and size + n > max_bytes:
                yield "".join(chunk)
                chunk, size = [], 0
            if n > max_bytes:
                # One overlong line (minified code, a table): cut it anywhere; a character is at
                # most 4 UTF-8 bytes, so max_bytes // 4 characters always fit.
                step = max(1, max_bytes // 4)
                yield from (piece[j:j + step] for j in range(0, len(piece), step))
                continue
            if n:
                chunk.append(piece)
                size += n
        if size:
            yield "".join(chunk)


# Trainer settings that make round trips exact; `SentencePieceTokenizer.train` adds the rest.
_ROUND_TRIP_OPTIONS = dict(
    # 'identity': the default NFKC rules would rewrite text (full-width forms, ligatures) and
    # turn '\n' and '\t' into spaces.
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,  # keep indentation and runs of spaces
    add_dummy_prefix=False,  # no space prepended to each text
    allow_whitespace_only_pieces=True,  # indentation can become one '▁▁▁▁' piece
    unk_id=0, bos_id=1, eos_id=2, pad_id=3,
    minloglevel=2,  # its INFO log prints every option and many progress lines
)


def _train_model(texts_or_files: Iterable[str | os.PathLike], directory: pathlib.Path,
                 options: dict[str, Any], seed: int) -> None:
    """Trains SentencePiece with `options` and writes the model to `directory/spm.model`."""
    directory.mkdir(parents=True, exist_ok=True)
    # SentencePiece's generator is process-global and seeded from the clock by default.
    spm.set_random_generator_seed(seed)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts_or_files,
                                                  options["max_sentence_length"]),
            model_writer=model, **options)
    except RuntimeError as e:
        message = " ".join(str(e).split())
        raise ValueError(f"SentencePiece training into {directory} failed: {message}") from e
    (directory / SPM_MODEL_NAME).write_bytes(model.getvalue())


@register
class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (BPE with byte fallback when trained here) that round-trips text.

    The training settings make `decode(encode(x)) == x` for any text that does not contain
    U+2581 ('▁'): no normalization, no dummy prefix space, runs of whitespace kept, newlines kept,
    characters missing from the vocabulary spelled as UTF-8 byte pieces. U+2581 is SentencePiece's
    escape for ' ', so it decodes to a space; BPE training refuses `escape_whitespaces=False`.

    Attributes:
      processor: the `sentencepiece.SentencePieceProcessor`.
      user_defined_symbols: strings that encode to one id wherever they occur in text.
    """

    kind = "sentencepiece"
    builds_from = "train"

    def __init__(self, model_path: PathLike, user_defined_symbols: Sequence[str] = ()):
        self.model_path = require_file(pathlib.Path(model_path))
        try:
            self.processor = spm.SentencePieceProcessor(model_file=str(self.model_path))
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{self.model_path}: not a SentencePiece model ({e})") from e
        self.user_defined_symbols = tuple(user_defined_symbols)

    @classmethod
    def train(cls,
              texts_or_files: Iterable[str | os.PathLike],
              directory: PathLike,
              vocab_size: int,
              *,
              user_defined_symbols: Sequence[str] = (),
              byte_fallback: bool = True,
              model_type: str = "bpe",
              character_coverage: float = 1.0,
              split_by_whitespace: bool = True,
              split_digits: bool = False,
              max_sentence_length: int = 16384,
              input_sentence_size: int = 0,
              seed_sentencepiece_size: int = 1_000_000,
              num_threads: int = 1,
              seed: int = 0,
              **trainer_kwargs: Any) -> SentencePieceTokenizer:
        """Trains a model on `texts_or_files` and saves it into `directory`.

        Ids: 0 `<unk>`, 1 `<s>` (bos), 2 `</s>` (eos), 3 `<pad>`, then the user-defined symbols,
        the 256 byte pieces (with `byte_fallback`) and the learned pieces.

        Args:
          texts_or_files: an iterable of documents: `str` items are text, `os.PathLike` items
            (e.g. `pathlib.Path`) are UTF-8 files. A plain `str` is always text, never a path.
          directory: where `spm.model` and `tokenizer.json` are written.
          vocab_size: the total number of ids, specials and byte pieces included.
          user_defined_symbols: strings (e.g. "<|endoftext|>") that become single ids.
          byte_fallback: spell characters outside the vocabulary as UTF-8 bytes instead of
            `<unk>`; exact round trips need it.
          model_type: "bpe" or "unigram".
          character_coverage: fraction of the corpus's characters given their own piece.
          split_by_whitespace: True keeps pieces from spanning a space; False allows '▁=▁'.
          split_digits: one piece per digit.
          max_sentence_length: longest training chunk in bytes; documents are cut at newlines
            to fit (SentencePiece would silently skip longer ones).
          input_sentence_size: if > 0, train on this many chunks sampled (with `seed`) from
            the corpus, for corpora too large to train on whole.
          seed_sentencepiece_size: unigram only: size of the initial seed vocabulary.
          num_threads: trainer threads; 1 keeps training deterministic.
          seed: seeds SentencePiece's random generator (sampling, unigram EM).
          **trainer_kwargs: further `sentencepiece.SentencePieceTrainer.train` options; they
            override the settings above, including those that make round trips exact.

        Returns:
          The trained tokenizer, already saved into `directory`.

        Raises:
          ValueError: if SentencePiece rejects the options or the corpus (e.g. `vocab_size`
            smaller than the specials, bytes and characters it must hold).
        """
        options = dict(
            _ROUND_TRIP_OPTIONS,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            user_defined_symbols=list(user_defined_symbols),
            character_coverage=character_coverage,
            split_by_whitespace=split_by_whitespace,
            split_digits=split_digits,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0,
            max_sentence_length=max_sentence_length,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads,
        )
        options.update(trainer_kwargs)
        directory = pathlib.Path(directory)
        _train_model(texts_or_files, directory, options, seed)
        tokenizer = cls(directory / SPM_MODEL_NAME, user_defined_symbols)
        tokenizer.save(directory)
        return tokenizer

    @classmethod
    def from_config(cls, *, texts: Sequence[str], directory: PathLike | None, vocab_size: int,
                    path: str, unknown: str,
                    user_defined_symbols: Sequence[str]) -> SentencePieceTokenizer:
        del path, unknown  # a SentencePiece model is trained or loaded, never read from elsewhere
        if directory is None:
            raise ConfigError("tokenizer kind 'sentencepiece' needs directory= (where its model "
                              "is trained or saved)")
        if texts:
            return cls.train(texts, directory, vocab_size,
                             user_defined_symbols=user_defined_symbols)
        if vocab_size or user_defined_symbols:
            raise ConfigError(f"tokenizer kind 'sentencepiece' loads from directory= alone or "
                              f"trains with texts=; got vocab_size={vocab_size} and "
                              f"user_defined_symbols={list(user_defined_symbols)} without texts")
        return cls.load(directory)

    @classmethod
    def load(cls, path: PathLike) -> SentencePieceTokenizer:
        """Loads a directory written by `train` or `save`, or a bare `.model` file.

        Args:
          path: a directory holding `tokenizer.json` and `spm.model`, or any SentencePiece
            model file (its user-defined symbols then still encode as single ids but are not
            listed in `special_ids`).

        Returns:
          The tokenizer.
        """
        path = pathlib.Path(path)
        if path.is_file():
            return cls(path)
        tokenizer = load_tokenizer(path)
        if not isinstance(tokenizer, cls):
            raise ValueError(f"{path} holds a {tokenizer.kind!r} tokenizer, not 'sentencepiece'")
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.processor.decode(self._checked_ids(ids))

    @property
    def special_ids(self) -> dict[str, int]:
        p = self.processor
        roles = {"unk": p.unk_id(), "bos": p.bos_id(), "eos": p.eos_id(), "pad": p.pad_id()}
        ids = {role: i for role, i in roles.items() if i >= 0}  # -1 means disabled
        ids.update({s: p.piece_to_id(s) for s in self.user_defined_symbols})
        return ids

    def _save_files(self, directory: pathlib.Path) -> dict[str, Any]:
        copy_into(self.model_path, directory / SPM_MODEL_NAME)
        return {"model_file": SPM_MODEL_NAME,
                "user_defined_symbols": list(self.user_defined_symbols)}

    @classmethod
    def _from_saved(cls, directory: pathlib.Path,
                    settings: dict[str, Any]) -> SentencePieceTokenizer:
        return cls(directory / settings["model_file"], settings.get("user_defined_symbols", ()))
