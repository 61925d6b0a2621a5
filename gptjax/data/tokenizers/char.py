"""One id per character, in sorted character order (nanoGPT's shakespeare_char)."""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from gptjax.config import ConfigError
from gptjax.data.tokenizers.base import PathLike, Tokenizer, register


@register
class CharTokenizer(Tokenizer):
    """One id per character, in sorted character order (nanoGPT's shakespeare_char).

    Attributes:
      chars: the vocabulary; id `i` is `chars[i]`.
      unknown: what `encode` does with a character outside the vocabulary: "error" raises,
        "skip" drops it.
    """

    kind = "char"
    builds_from = "all"

    def __init__(self, chars: Iterable[str], unknown: str = "error"):
        chars = list(chars)
        if any(len(c) != 1 for c in chars) or len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer needs distinct single characters")
        if unknown not in ("error", "skip"):
            raise ValueError(f"unknown={unknown!r}; expected 'error' or 'skip'")
        self.chars = chars
        self.unknown = unknown
        self._stoi = {c: i for i, c in enumerate(chars)}
        self.source = ""  # the directory it was loaded from, named in encode's error

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

    @classmethod
    def from_config(cls, *, texts: Sequence[str], directory: PathLike | None, vocab_size: int,
                    path: str, unknown: str, user_defined_symbols: Sequence[str]) -> CharTokenizer:
        del directory, vocab_size, path, user_defined_symbols  # a character set needs none
        if not texts:
            raise ConfigError("tokenizer kind 'char' needs texts= to take its characters from")
        return cls.from_text("".join(texts), unknown=unknown)

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
            where = f" saved in {self.source}" if self.source else ""
            raise ValueError(f"character {c!r} (index {text.index(c)}) is not in the "
                             f"{len(self.chars)}-character vocabulary{where}: a character-level "
                             "model reads only the characters of its training text") from None

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        chars = self.chars
        return "".join([chars[i] for i in self._checked_ids(ids)])

    def _save_files(self, directory: pathlib.Path) -> dict[str, Any]:
        return {"chars": "".join(self.chars), "unknown": self.unknown}

    @classmethod
    def _from_saved(cls, directory: pathlib.Path, settings: dict[str, Any]) -> CharTokenizer:
        tok = cls(settings["chars"], unknown=settings.get("unknown", "error"))
        tok.source = str(directory)
        return tok
