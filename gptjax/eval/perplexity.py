"""Sliding-window perplexity of a causal LM on any text, per token, per word and per byte.

The windows follow transformers' documented recipe ("Perplexity of fixed-length models"): windows
of `context` tokens start every `stride` tokens, and each window scores only the tokens that the
previous window did not, so every token is scored exactly once, with at least
`context - stride` tokens of left context (all of them while the text is shorter than the
window). `stride = context - 1` is the cheap non-overlapping evaluation (consecutive windows share
one token, which is context for the next); `stride = 1` gives every token its full context.

Per-token perplexity depends on the tokenizer; per-word perplexity (total NLL over the number of
words of the original text, WikiText's convention counts one `<eos>` per line) and bits per byte
compare across tokenizers, as in GPT-2's Table 3.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Optional, Sequence

import numpy as np

from gptjax.config import GPTConfig
from gptjax.data import load_texts
from gptjax.eval.scoring import weighted_nll

# ================================================================================ detokenizers
# WikiText's tokenized release splits punctuation off and marks in-number separators as @-@, @,@,
# @.@. GPT-2 scored WikiText with "invertible de-tokenizers" (Radford et al. 2019, section 3.1)
# that it did not publish; these rules are the ones NVIDIA's Megatron-LM zero-shot GPT-2
# evaluation uses to reproduce those numbers (also used by lm-evaluation-harness), in order.
_WIKITEXT_RULES: tuple = (
    ("s '", "s'"),                         # plural possessive: "players ' " -> "players' "
    (" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."),  # number and word separators
    (" : ", ": "), (" ; ", "; "), (" . ", ". "), (" ! ", "! "), (" ? ", "? "), (" , ", ", "),
    (re.compile(r"\(\s*([^\)]*?)\s*\)"), r"(\1)"),   # spaces inside brackets and quotes
    (re.compile(r"\[\s*([^\]]*?)\s*\]"), r"[\1]"),
    (re.compile(r"{\s*([^}]*?)\s*}"), r"{\1}"),
    (re.compile(r"\"\s*([^\"]*?)\s*\""), r'"\1"'),
    (re.compile(r"'\s*([^']*?)\s*'"), r"'\1'"),
    ("= = = =", "===="), ("= = =", "==="), ("= =", "=="),  # section headings
    (" \u00b0 ", "\u00b0"), (" \n", "\n"), ("\n ", "\n"),
    (" N ", " 1 "), (" 's", "'s"),
)


def wikitext_detokenize(text: str, unk: Optional[str] = None) -> str:
    """Undo WikiText's tokenization (`@-@`, ` , `, `( x )`, `= = h = =`, ...) as GPT-2 evaluations do.

    Args:
      text: tokenized WikiText.
      unk: replacement for `<unk>`; None keeps the literal `<unk>` (what the published
        GPT-2 reproductions score: the model then pays for predicting the marker).

    Returns:
      The detokenized text.
    """
    for pattern, repl in _WIKITEXT_RULES:
        text = pattern.sub(repl, text) if isinstance(pattern, re.Pattern) else \
            text.replace(pattern, repl)
    if unk is not None:
        text = text.replace("<unk>", unk)
    return text


DETOKENIZERS = {"none": lambda t: t, "wikitext": wikitext_detokenize}


def count_words(text: str, newline_is_word: bool = True) -> int:
    """Words of a whitespace-tokenized text; WikiText counts each line's `<eos>` as a word."""
    n = len(text.split())
    if newline_is_word:
        n += text.count("\n")
    return n


# ================================================================================ windows
@dataclasses.dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go through the model; the last `n_scored` targets of it count."""

    begin: int
    end: int
    n_scored: int


def sliding_windows(num_tokens: int, context: int, stride: int) -> list:
    """The windows of transformers' perplexity recipe over `num_tokens` tokens.

    Window i covers tokens [i * stride, min(i * stride + context, num_tokens)) and scores the
    targets from the previous window's end on, so each of the num_tokens - 1 targets (token 0 has
    no prediction) is scored exactly once, with at least context - stride tokens before it.

    Raises:
      ValueError: context < 2, stride not in [1, context - 1], or fewer than 2 tokens.
    """
    if context < 2:
        raise ValueError(f"context={context}: must be >= 2 tokens")
    if not 1 <= stride < context:
        # With stride == context a window's first token would be nobody's target.
        raise ValueError(f"stride={stride}: must be in [1, context - 1 = {context - 1}] (each "
                         "window needs a token of context before its first scored token; "
                         "stride = context - 1 is the non-overlapping evaluation)")
    if num_tokens < 2:
        raise ValueError(f"{num_tokens} tokens: perplexity needs at least 2")
    windows, prev_end = [], 1
    for begin in range(0, num_tokens, stride):
        end = min(begin + context, num_tokens)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == num_tokens:
            break
    return windows


def window_nll(config: GPTConfig, params, tokens: Sequence[int], windows: Sequence[Window],
               batch_size: int = 8) -> np.ndarray:
    """Summed NLL (nats, fp32 per window, summed in float64) of the scored targets of each window.

    Windows are batched and right-padded to the longest (padding is invisible to the causal
    positions before it), so the result does not depend on `batch_size`.
    """
    tokens = np.asarray(tokens, np.int32)
    T = max(w.end - w.begin for w in windows)
    if T > config.n_ctx:
        raise ValueError(f"context={T} is longer than the model's n_ctx={config.n_ctx}")
    out = np.zeros(len(windows), np.float64)
    for b in range(0, len(windows), batch_size):
        chunk = windows[b:b + batch_size]
        x = np.zeros((batch_size, T), np.int32)
        w = np.zeros((batch_size, T), np.float32)
        for j, win in enumerate(chunk):
            n = win.end - win.begin
            x[j, :n] = tokens[win.begin:win.end]
            # Position t predicts token t+1; the scored targets are the window's last n_scored.
            w[j, n - 1 - win.n_scored: n - 1] = 1.0
        nll, _ = weighted_nll(config, params, x, w)
        out[b:b + len(chunk)] = np.asarray(nll, np.float64)[: len(chunk)]
    return out


@dataclasses.dataclass
class PerplexityResult:
    """Total NLL and the units it is normalised by."""

    nll: float            # total, nats
    tokens: int           # targets scored
    words: Optional[int]
    bytes: int
    context: int
    stride: int
    windows: int

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(token_nll=self.nll / self.tokens,
                 token_perplexity=math.exp(self.nll / self.tokens),
                 bits_per_byte=self.nll / math.log(2) / self.bytes,
                 byte_perplexity=math.exp(self.nll / self.bytes))
        if self.words:
            d["word_perplexity"] = math.exp(self.nll / self.words)
        return d


def perplexity(config: GPTConfig, params, tokenizer, text: str, *, context: Optional[int] = None,
               stride: Optional[int] = None, num_words: Optional[int] = None,
               prepend_eos: bool = False, batch_size: int = 8) -> PerplexityResult:
    """Sliding-window perplexity of `text`.

    Args:
      config, params: the model.
      tokenizer: a gptjax tokenizer.
      text: the text to score (already detokenized, see `DETOKENIZERS`).
      context: tokens per window (default: the model's n_ctx).
      stride: tokens between window starts (default: context // 2).
      num_words: words of the original text, for per-word perplexity (see `count_words`); None
        leaves it out.
      prepend_eos: put the tokenizer's end-of-text token first, so the text's first token is
        scored too (GPT-2's convention for a document start); off by default, as in the recipe.
      batch_size: windows per forward pass.

    Returns:
      A PerplexityResult; `.as_dict()` adds per-token/word/byte perplexity and bits per byte.
    """
    context = config.n_ctx if context is None else int(context)
    stride = max(context // 2, 1) if stride is None else int(stride)
    if context > config.n_ctx:
        raise ValueError(f"context={context} is longer than the model's n_ctx={config.n_ctx}")
    ids = list(tokenizer.encode(text))
    if prepend_eos:
        if tokenizer.eos_id is None:
            raise ValueError("prepend_eos: this tokenizer has no end-of-text token")
        ids = [tokenizer.eos_id] + ids
    windows = sliding_windows(len(ids), context, stride)
    nll = window_nll(config, params, ids, windows, batch_size)
    return PerplexityResult(nll=float(nll.sum()), tokens=sum(w.n_scored for w in windows),
                            words=num_words, bytes=len(text.encode("utf-8")), context=context,
                            stride=stride, windows=len(windows))


def read_eval_text(path: str = "", *, tfds_name: str = "", split: str = "validation",
                   data_dir: str = "", text_key: str = "text", max_chars: int = 0) -> str:
    """The text to score: a file, or a tfds split's documents joined by blank lines.

    Args:
      path: a UTF-8 text file.
      tfds_name, split, data_dir, text_key: a tfds text dataset prepared in data_dir.
      max_chars: keep only the first max_chars characters (0: all).
    """
    if bool(path) == bool(tfds_name):
        raise ValueError("give exactly one of a text file (--text) or a tfds dataset (--tfds)")
    if path:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    else:
        text = "\n\n".join(load_texts(tfds_name, split, data_dir or None, text_key))
    return text[:max_chars] if max_chars > 0 else text
