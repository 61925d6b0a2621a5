"""OpenAI GPT-2's byte-level BPE from local files, encoded by tiktoken."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import tiktoken

from gptjax.data.tokenizers.base import (FileTokenizer, PathLike, check_hashes, copy_with_hashes,
                                         read_json, register, require_file)

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
    text = require_file(vocab_bpe).read_text(encoding="utf-8")
    try:
        for line in text.split("\n"):
            if line and not line.startswith("#version"):
                first, second = line.split(" ")
                ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{vocab_bpe}: not a GPT-2 merges file (bad line {line!r})") from e
    encoder = read_json(require_file(encoder_json))
    eot = encoder.pop(ENDOFTEXT, None) if isinstance(encoder, dict) else None
    try:
        by_bytes = {to_bytes(k): v for k, v in encoder.items()}
    except (AttributeError, KeyError, TypeError) as e:
        raise ValueError(f"{encoder_json}: not a GPT-2 vocabulary ({e!r})") from e
    # tiktoken merges by rank, so the ids must be the merge order; GPT-2's files are built so.
    if by_bytes != ranks:
        raise ValueError(f"{encoder_json} does not match the merge order in {vocab_bpe}")
    return ranks, eot


@register
class GPT2BPETokenizer(FileTokenizer):
    """OpenAI GPT-2's byte-level BPE (50257 ids) from local files, encoded by tiktoken.

    Attributes:
      allow_special: if True, "<|endoftext|>" in text encodes to its id 50256; by default it is
        ordinary text, so a document cannot plant a document separator.
    """

    kind = "gpt2_bpe"
    FILES = "encoder.json + vocab.bpe or vocab.json + merges.txt"

    def __init__(self, encoder_json: PathLike, vocab_bpe: PathLike, allow_special: bool = False):
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
        files = copy_with_hashes(directory, ((self.encoder_json, "encoder.json"),
                                              (self.vocab_bpe, "vocab.bpe")))
        return {"files": files, "allow_special": self.allow_special}

    @classmethod
    def _from_saved(cls, directory: pathlib.Path, settings: dict[str, Any]) -> GPT2BPETokenizer:
        check_hashes(directory, settings)
        return cls(directory / "encoder.json", directory / "vocab.bpe",
                   settings.get("allow_special", False))
