"""Tokenizers behind one small interface: characters, SentencePiece BPE, GPT-2 byte BPE.

Every tokenizer maps text to a list of ints and back, exposes its special ids, and saves itself
into a directory as `tokenizer.json` (kind and settings) plus its model files, so a run directory
is self-contained and `load_tokenizer(directory)` rebuilds the same tokenizer without the corpus,
the shared data folder or network access:

    tok = build_tokenizer("gpt2_bpe", path="/work/shared/data/gpt2_bpe")
    tok.encode("Hello world")  # [15496, 995]
    tok.save(workdir / "tokenizer")
    tok = load_tokenizer(workdir / "tokenizer")

`encode` never adds special tokens; the data pipeline appends `eos_id` after each document.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import os
import pathlib
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from gptjax.config import ConfigError

CONFIG_NAME = "tokenizer.json"
_FORMAT_VERSION = 1

PathLike = str | os.PathLike


class Tokenizer(abc.ABC):
    """Text <-> token ids: the interface every gptjax tokenizer implements."""

    kind: str

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


def _read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e


def _require_file(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    return path


def _copy_into(source: pathlib.Path, target: pathlib.Path) -> None:
    # Saving a tokenizer into the directory it was loaded from must not fail on a self-copy.
    if not (target.exists() and os.path.samefile(source, target)):
        shutil.copyfile(source, target)


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _copy_with_hashes(directory: pathlib.Path, sources) -> dict[str, Any]:
    """Copies (source, name) files into `directory`; returns {name: {sha256, source}}."""
    files = {}
    for source, name in sources:
        _copy_into(source, directory / name)
        files[name] = {"sha256": _sha256(directory / name), "source": str(source.resolve())}
    return files


def _check_hashes(directory: pathlib.Path, settings: dict[str, Any]) -> None:
    """Raises ValueError if a saved file is missing or differs from the hash recorded for it."""
    for name, info in settings["files"].items():
        path = _require_file(directory / name)
        if _sha256(path) != info["sha256"]:
            raise ValueError(f"{path}: sha256 differs from the one in {CONFIG_NAME}")


# ------------------------------------------------------------------------------------------------
# Characters.
# ------------------------------------------------------------------------------------------------


class CharTokenizer(Tokenizer):
    """One id per character, in sorted character order (nanoGPT's shakespeare_char).

    Attributes:
      chars: the vocabulary; id `i` is `chars[i]`.
      unknown: what `encode` does with a character outside the vocabulary: "error" raises,
        "skip" drops it.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], unknown: str = "error"):
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown={unknown!r}; expected 'error' or 'skip'")
        self.chars = chars
        self.unknown = unknown
        self._stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str, unknown: str = "error") -> CharTokenizer:
        """Builds the vocabulary from the sorted set of characters in `text`.

        Args:
          text: the corpus (Tiny Shakespeare gives 65 characters).
          unknown: "error" or "skip"; see the class docstring.

        Returns:
          The tokenizer.
        """
        return cls(sorted(set(text)), unknown=unknown)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Maps each character to its id.

        Args:
          text: the text to encode.

        Returns:
          One id per character; characters outside the vocabulary are dropped if
          `unknown="skip"`.

        Raises:
          ValueError: naming the first character outside the vocabulary, if `unknown="error"`.
        """
        stoi = self._stoi
        if self.unknown == "skip":
            return [stoi[c] for c in text if c in stoi]
        try:
            return [stoi[c] for c in text]
        except KeyError as e:
            c = e.args[0]
            raise ValueError(f"character {c!r} (index {text.index(c)}) is not in the "
                             f"{len(self.chars)}-character vocabulary") from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        chars = self.chars
        return "".join([chars[i] for i in self._checked_ids(ids)])

    def _save_files(self, directory: pathlib.Path) -> dict[str, Any]:
        return {"chars": "".join(self.chars), "unknown": self.unknown}

    @classmethod
    def _from_saved(cls, directory: pathlib.Path, settings: dict[str, Any]) -> CharTokenizer:
        return cls(settings["chars"], unknown=settings.get("unknown", "error"))


# ------------------------------------------------------------------------------------------------
# SentencePiece.
# ------------------------------------------------------------------------------------------------

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

    def __init__(self, model_path: PathLike, user_defined_symbols: Sequence[str] = ()):
        import sentencepiece as spm  # pylint: disable=import-outside-toplevel

        self.model_path = _require_file(pathlib.Path(model_path))
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
        import sentencepiece as spm  # pylint: disable=import-outside-toplevel

        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # SentencePiece's generator is process-global and seeded from the clock by default.
        spm.set_random_generator_seed(seed)
        options = dict(
            model_type=model_type,
            vocab_size=vocab_size,
            user_defined_symbols=list(user_defined_symbols),
            byte_fallback=byte_fallback,
            character_coverage=character_coverage,
            # 'identity': the default NFKC rules would rewrite text (full-width forms,
            # ligatures) and turn '\n' and '\t' into spaces.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,  # keep indentation and runs of spaces
            add_dummy_prefix=False,  # no space prepended to each text
            allow_whitespace_only_pieces=True,  # indentation can become one '▁▁▁▁' piece
            split_by_whitespace=split_by_whitespace,
            split_digits=split_digits,
            max_sentence_length=max_sentence_length,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=input_sentence_size > 0,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            minloglevel=2,  # its INFO log prints every option and many progress lines
        )
        options.update(trainer_kwargs)
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(texts_or_files, max_sentence_length),
                model_writer=model, **options)
        except RuntimeError as e:
            message = " ".join(str(e).split())
            raise ValueError(f"SentencePiece training into {directory} failed: {message}") from e
        (directory / SPM_MODEL_NAME).write_bytes(model.getvalue())
        tokenizer = cls(directory / SPM_MODEL_NAME, user_defined_symbols)
        tokenizer.save(directory)
        return tokenizer

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
        _copy_into(self.model_path, directory / SPM_MODEL_NAME)
        return {"model_file": SPM_MODEL_NAME,
                "user_defined_symbols": list(self.user_defined_symbols)}

    @classmethod
    def _from_saved(cls, directory: pathlib.Path,
                    settings: dict[str, Any]) -> SentencePieceTokenizer:
        return cls(directory / settings["model_file"], settings.get("user_defined_symbols", ()))


# ------------------------------------------------------------------------------------------------
# GPT-2 byte-level BPE.
# ------------------------------------------------------------------------------------------------

ENDOFTEXT = "<|endoftext|>"

# tiktoken's form of GPT-2's split pattern (`r50k_pat_str` in tiktoken_ext/openai_public.py; a
# test checks they agree). It splits text exactly as GPT-2's original
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# does, with possessive quantifiers so the regex engine never backtracks.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""")

# (vocabulary, merges) file names in OpenAI's release and in Hugging Face's; same contents.
_GPT2_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverts GPT-2's byte -> printable stand-in character table (`bytes_to_unicode`).

    Printable Latin-1 bytes other than space stand for themselves; the other 68 bytes map to
    chr(256), chr(257), ... in byte order.
    """
    decoder = {chr(b): b for b in range(256) if chr(b).isprintable() and chr(b) != " "}
    others = [b for b in range(256) if chr(b) not in decoder]
    decoder.update({chr(256 + n): b for n, b in enumerate(others)})
    return decoder


def _gpt2_ranks(encoder_json: pathlib.Path,
                vocab_bpe: pathlib.Path) -> tuple[dict[bytes, int], int | None]:
    """Reads GPT-2's files into tiktoken's {token bytes: rank} table and the <|endoftext|> id.

    This is `tiktoken.load.data_gym_to_mergeable_bpe_ranks` without its cache: that function
    accepts local paths but copies every file it reads into $TMPDIR/data-gym-cache keyed by the
    path string, and with no hash given keeps returning that copy after the file has changed.
    """
    byte_decoder = _gpt2_byte_decoder()

    def to_bytes(token: str) -> bytes:
        return bytes(byte_decoder[c] for c in token)

    # Ranks: the 256 single bytes in stand-in order, then one token per merge, in merge order.
    ranks = {bytes([b]): i for i, b in enumerate(byte_decoder.values())}
    text = _require_file(vocab_bpe).read_text(encoding="utf-8")
    try:
        for line in text.split("\n"):
            if line and not line.startswith("#version"):
                first, second = line.split(" ")
                ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{vocab_bpe}: not a GPT-2 merges file (bad line {line!r})") from e
    encoder = _read_json(_require_file(encoder_json))
    eot = encoder.pop(ENDOFTEXT, None) if isinstance(encoder, dict) else None
    try:
        by_bytes = {to_bytes(k): v for k, v in encoder.items()}
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{encoder_json}: not a GPT-2 vocabulary ({e!r})") from e
    # tiktoken merges by rank, so the ids must be the merge order; GPT-2's files are built so.
    if by_bytes != ranks:
        raise ValueError(f"{encoder_json} does not match the merge order in {vocab_bpe}")
    return ranks, eot


class GPT2BPETokenizer(Tokenizer):
    """OpenAI GPT-2's byte-level BPE (50257 ids) from local files, encoded by tiktoken.

    Attributes:
      allow_special: if True, "<|endoftext|>" in text encodes to its id 50256; by default it is
        ordinary text, so a document cannot plant a document separator.
    """

    kind = "gpt2_bpe"

    def __init__(self, encoder_json: PathLike, vocab_bpe: PathLike, allow_special: bool = False):
        import tiktoken  # pylint: disable=import-outside-toplevel

        self.encoder_json = pathlib.Path(encoder_json)
        self.vocab_bpe = pathlib.Path(vocab_bpe)
        self.allow_special = allow_special
        ranks, eot = _gpt2_ranks(self.encoder_json, self.vocab_bpe)
        self._eot = len(ranks) if eot is None else eot
        self._encoding = tiktoken.Encoding(name="gpt2_local", pat_str=GPT2_PATTERN,
                                           mergeable_ranks=ranks,
                                           special_tokens={ENDOFTEXT: self._eot})

    @classmethod
    def from_files(cls, path: PathLike | Sequence[PathLike],
                   allow_special: bool = False) -> GPT2BPETokenizer:
        """Builds the tokenizer from GPT-2's vocabulary and merges files.

        Args:
          path: a directory holding `encoder.json` + `vocab.bpe` (OpenAI's names) or
            `vocab.json` + `merges.txt` (Hugging Face's), or a pair (vocabulary, merges) of paths.
          allow_special: see the class docstring.

        Returns:
          The tokenizer.
        """
        if not isinstance(path, (str, os.PathLike)):
            if len(path) != 2:
                raise ValueError(f"expected a directory or a (vocab, merges) pair; got {path!r}")
            return cls(path[0], path[1], allow_special)
        directory = pathlib.Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"GPT-2 BPE directory not found: {directory}")
        for vocab_name, merges_name in _GPT2_FILE_PAIRS:
            if (directory / vocab_name).is_file() and (directory / merges_name).is_file():
                return cls(directory / vocab_name, directory / merges_name, allow_special)
        names = " or ".join(" + ".join(pair) for pair in _GPT2_FILE_PAIRS)
        raise FileNotFoundError(f"{directory} holds neither {names}")

    @property
    def vocab_size(self) -> int:
        return self._encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        if self.allow_special:
            return self._encoding.encode(text, allowed_special="all")
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        # Ids may end inside a multi-byte character (a sample cut mid-emoji); "replace" turns
        # the fragment into U+FFFD, as GPT-2's own decoder does.
        return self._encoding.decode(self._checked_ids(ids), errors="replace")

    @property
    def special_ids(self) -> dict[str, int]:
        return {"eos": self._eot}

    def _save_files(self, directory: pathlib.Path) -> dict[str, Any]:
        # Copied under OpenAI's names whatever the source calls them, with hashes, so the run
        # directory does not depend on the shared data folder and a corrupted copy is caught.
        files = _copy_with_hashes(directory, ((self.encoder_json, "encoder.json"),
                                              (self.vocab_bpe, "vocab.bpe")))
        return {"files": files, "allow_special": self.allow_special}

    @classmethod
    def _from_saved(cls, directory: pathlib.Path, settings: dict[str, Any]) -> GPT2BPETokenizer:
        _check_hashes(directory, settings)
        return cls(directory / "encoder.json", directory / "vocab.bpe",
                   settings.get("allow_special", False))


# ------------------------------------------------------------------------------------------------
# OpenAI GPT-1: lower-cased, BERT-style pre-tokenized BPE with '</w>' word ends.
# ------------------------------------------------------------------------------------------------

# Rust's char::is_whitespace (the Unicode White_Space property), which Hugging Face's BERT
# normalizer and pre-tokenizer use; Python's str.isspace also counts U+001C..U+001F.
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                         + "".join(chr(c) for c in range(0x2000, 0x200B)))
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
END_OF_WORD = "</w>"


def bert_normalize(text: str) -> str:
    """BERT's BasicTokenizer clean-up as Hugging Face's BertNormalizer(lowercase=True) does it:
    drop NUL, U+FFFD and control characters, whitespace to ' ', spaces around CJK ideographs,
    strip accents (NFD, drop non-spacing marks), lower-case."""
    import unicodedata  # pylint: disable=import-outside-toplevel

    out = []
    for ch in text:
        cp = ord(ch)
        if ch in _WHITE_SPACE:
            out.append(" ")
        elif cp in (0, 0xFFFD) or unicodedata.category(ch) in ("Cc", "Cf", "Cn", "Co"):
            continue
        elif any(lo <= cp <= hi for lo, hi in _CJK_RANGES):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    text = unicodedata.normalize("NFD", "".join(out))
    return "".join(c for c in text if unicodedata.category(c) != "Mn").lower()


def bert_pre_tokenize(text: str) -> list[str]:
    """BERT's word split: whitespace separates words, every punctuation character (ASCII
    punctuation or a Unicode P* category) is a word of its own."""
    import unicodedata  # pylint: disable=import-outside-toplevel

    words, current = [], []
    for ch in text:
        if ch in _WHITE_SPACE:
            if current:
                words.append("".join(current))
                current = []
        elif (ch.isascii() and not ch.isalnum() and 33 <= ord(ch) <= 126) or \
                unicodedata.category(ch).startswith("P"):
            if current:
                words.append("".join(current))
                current = []
            words.append(ch)
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    return words


class OpenAIGPTTokenizer(Tokenizer):
    """OpenAI GPT-1's BPE (40,478 ids in the release) from `vocab.json` + `merges.txt`.

    The semantics of Hugging Face's OpenAIGPTTokenizer (and of the original code without ftfy
    and spaCy): BERT's lower-casing clean-up and word split (`bert_normalize`,
    `bert_pre_tokenize`), then BPE inside each word, whose last symbol carries '</w>'. Merges
    apply lowest rank first, leftmost first among equal ranks; a character the vocabulary lacks
    becomes `<unk>`. Decoding turns '</w>' into a space, so text comes back lower-cased and with
    spaces around punctuation. GPT-1 has no end-of-text token (`eos_id` is None).
    """

    kind = "openai_gpt"

    def __init__(self, vocab_json: PathLike, merges_txt: PathLike):
        self.vocab_json = pathlib.Path(vocab_json)
        self.merges_txt = pathlib.Path(merges_txt)
        vocab = _read_json(_require_file(self.vocab_json))
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{vocab_json}: not a token -> id JSON object")
        self._vocab = vocab
        self._tokens = {i: t for t, i in vocab.items()}
        self._ranks = {}
        for n, line in enumerate(_require_file(self.merges_txt).read_text(
                encoding="utf-8").splitlines()):
            if n == 0 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            pair = tuple(line.split(" "))
            if len(pair) != 2 or not {pair[0], pair[1], pair[0] + pair[1]} <= vocab.keys():
                raise ValueError(f"{merges_txt}: bad merge {line!r} (expected two symbols that "
                                 f"are, with their concatenation, in {self.vocab_json.name})")
            self._ranks.setdefault(pair, len(self._ranks))
        self._unk = vocab.get("<unk>")
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_files(cls, path: PathLike) -> OpenAIGPTTokenizer:
        """From a directory holding `vocab.json` + `merges.txt` (Hugging Face's openai-gpt)."""
        directory = pathlib.Path(path)
        if not directory.is_dir():
            raise FileNotFoundError(f"OpenAI GPT tokenizer directory not found: {directory}")
        return cls(directory / "vocab.json", directory / "merges.txt")

    @property
    def vocab_size(self) -> int:
        return max(self._vocab.values()) + 1

    def _bpe(self, word: str) -> list[int]:
        if word in self._cache:
            return self._cache[word]
        symbols = list(word[:-1]) + [word[-1] + END_OF_WORD]
        while len(symbols) > 1:
            ranked = [(self._ranks.get(pair, -1), i)
                      for i, pair in enumerate(zip(symbols, symbols[1:]))]
            ranked = [(r, i) for r, i in ranked if r >= 0]
            if not ranked:
                break
            _, i = min(ranked)
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids = []
        for sym in symbols:
            if sym in self._vocab:
                ids.append(self._vocab[sym])
            elif self._unk is not None:
                # Unmerged symbols are single characters: one <unk> each.
                ids.extend([self._unk] * (len(sym) - (len(END_OF_WORD)
                                                     if sym.endswith(END_OF_WORD) else 0)))
            else:
                raise ValueError(f"character(s) {sym!r} are not in {self.vocab_json} and it "
                                 "has no '<unk>' token")
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for w in bert_pre_tokenize(bert_normalize(text)) for i in self._bpe(w)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        tokens = [self._tokens.get(i, "") for i in self._checked_ids(ids)]
        text = "".join(t.replace(END_OF_WORD, " ") for t in tokens)
        return text[:-1] if tokens and tokens[-1].endswith(END_OF_WORD) else text

    @property
    def special_ids(self) -> dict[str, int]:
        return {} if self._unk is None else {"unk": self._unk}

    def _save_files(self, directory: pathlib.Path) -> dict[str, Any]:
        return {"files": _copy_with_hashes(directory, ((self.vocab_json, "vocab.json"),
                                                      (self.merges_txt, "merges.txt")))}

    @classmethod
    def _from_saved(cls, directory: pathlib.Path, settings: dict[str, Any]) -> OpenAIGPTTokenizer:
        _check_hashes(directory, settings)
        return cls(directory / "vocab.json", directory / "merges.txt")


def from_hf_files(path: PathLike) -> Tokenizer:
    """The BPE tokenizer of a Hugging Face / OpenAI model directory: OpenAI GPT-1's when its
    vocabulary marks word ends with '</w>' (openai-gpt), GPT-2's byte BPE otherwise."""
    directory = pathlib.Path(path)
    vocab = directory / "vocab.json"
    if vocab.is_file() and (directory / "merges.txt").is_file():
        tokens = _read_json(vocab)
        if isinstance(tokens, dict) and any(t.endswith(END_OF_WORD) for t in tokens):
            return OpenAIGPTTokenizer(vocab, directory / "merges.txt")
    return GPT2BPETokenizer.from_files(directory)


# ------------------------------------------------------------------------------------------------
# Loading and building.
# ------------------------------------------------------------------------------------------------

KINDS: dict[str, type[Tokenizer]] = {
    "char": CharTokenizer,
    "sentencepiece": SentencePieceTokenizer,
    "gpt2_bpe": GPT2BPETokenizer,
    "openai_gpt": OpenAIGPTTokenizer,
}


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
    config = _read_json(config_path)
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


def build_tokenizer(kind: str, **kwargs: Any) -> Tokenizer:
    """Builds a tokenizer from config values.

    - "char": `text=` or `text_file=`, and optionally `unknown=`.
    - "sentencepiece": `directory=` alone loads a saved model; `texts_or_files=`,
      `directory=`, `vocab_size=` and any other `SentencePieceTokenizer.train` option train one.
    - "gpt2_bpe": `path=` (a directory or a file pair), and optionally `allow_special=`.

    Args:
      kind: "char", "sentencepiece" or "gpt2_bpe".
      **kwargs: the options above.

    Returns:
      The tokenizer.

    Raises:
      ConfigError: (a ValueError) naming a bad `kind` or a bad combination of options.
    """
    _tokenizer_class(kind)
    if kind == "char":
        text, text_file = kwargs.pop("text", None), kwargs.pop("text_file", None)
        if (text is None) == (text_file is None):
            raise ConfigError("tokenizer kind 'char' needs exactly one of text= or text_file=")
        if text_file is not None:
            text = pathlib.Path(text_file).read_text(encoding="utf-8")
        return CharTokenizer.from_text(text, **kwargs)
    if kind == "sentencepiece":
        if "texts_or_files" in kwargs:
            return SentencePieceTokenizer.train(**kwargs)
        if set(kwargs) != {"directory"}:
            raise ConfigError(f"tokenizer kind 'sentencepiece' loads from directory= alone or "
                              f"trains with texts_or_files=; got {sorted(kwargs)}")
        return SentencePieceTokenizer.load(kwargs["directory"])
    return GPT2BPETokenizer.from_files(**kwargs)
