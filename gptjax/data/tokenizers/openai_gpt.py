"""OpenAI GPT-1's tokenizer: lower-cased, BERT-style pre-tokenized BPE with '</w>' word ends."""

from __future__ import annotations

import pathlib
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from gptjax.data.tokenizers.base import (END_OF_WORD, FileTokenizer, PathLike, check_hashes,
                                         copy_with_hashes, read_json, register, require_file)

# Rust's char::is_whitespace (the Unicode White_Space property), which Hugging Face's BERT
# normalizer and pre-tokenizer use; Python's str.isspace also counts U+001C..U+001F.
_WHITE_SPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000"
                         + "".join(chr(c) for c in range(0x2000, 0x200B)))
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def bert_normalize(text: str) -> str:
    """BERT's BasicTokenizer clean-up as Hugging Face's BertNormalizer(lowercase=True) does it:
    drop NUL, U+FFFD and control characters, whitespace to ' ', spaces around CJK ideographs,
    strip accents (NFD, drop non-spacing marks), lower-case."""
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


@register
class OpenAIGPTTokenizer(FileTokenizer):
    """OpenAI GPT-1's BPE (40,478 ids in the release) from `vocab.json` + `merges.txt`.

    The semantics of Hugging Face's OpenAIGPTTokenizer (and of the original code without ftfy
    and spaCy): BERT's lower-casing clean-up and word split (`bert_normalize`,
    `bert_pre_tokenize`), then BPE inside each word, whose last symbol carries '</w>'. Merges
    apply lowest rank first, leftmost first among equal ranks; a character the vocabulary lacks
    becomes `<unk>`. Decoding turns '</w>' into a space, so text comes back lower-cased and with
    spaces around punctuation. GPT-1 has no end-of-text token (`eos_id` is None).
    """

    kind = "openai_gpt"
    FILES = "vocab.json + merges.txt"

    def __init__(self, vocab_json: PathLike, merges_txt: PathLike):
        self.vocab_json = pathlib.Path(vocab_json)
        self.merges_txt = pathlib.Path(merges_txt)
        vocab = read_json(require_file(self.vocab_json))
        if not isinstance(vocab, dict) or not all(isinstance(v, int) for v in vocab.values()):
            raise ValueError(f"{vocab_json}: not a token -> id JSON object")
        self._vocab = vocab
        self._tokens = {i: t for t, i in vocab.items()}
        self._ranks = {}
        for n, line in enumerate(require_file(self.merges_txt).read_text(
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
        return {"files": copy_with_hashes(directory, ((self.vocab_json, "vocab.json"),
                                                      (self.merges_txt, "merges.txt")))}

    @classmethod
    def _from_saved(cls, directory: pathlib.Path, settings: dict[str, Any]) -> OpenAIGPTTokenizer:
        check_hashes(directory, settings)
        return cls(directory / "vocab.json", directory / "merges.txt")
