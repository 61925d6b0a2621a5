"""Text in, text out: encode prompts, complete them, and stream the text as it is decoded.

The model and tokenizer come from `gptjax.runs.pretrained.load_pretrained` (sample.py, the server).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax

from gptjax.inference import sampling


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list:
    """Token ids of each prompt; an empty prompt starts from the end-of-text token when there is one.

    Args:
      tokenizer: a gptjax tokenizer.
      prompts: the texts.

    Returns:
      A list of token-id lists.

    Raises:
      ValueError: an empty prompt and a tokenizer without an end-of-text token.
    """
    out = []
    for p in prompts:
        ids = tokenizer.encode(p)
        if not ids:
            if tokenizer.eos_id is None:
                raise ValueError("empty prompt: this tokenizer has no end-of-text token to start "
                                 "from; give a non-empty --prompt")
            ids = [tokenizer.eos_id]
        out.append(ids)
    return out


def fit_to_context(config, ids: Sequence[int], max_new_tokens: int) -> int:
    """`max_new_tokens`, clipped so the prompt plus the new tokens fit in the context.

    Raises:
      ValueError: the prompt alone fills the context (nothing could be generated).
    """
    room = config.n_ctx - len(ids)
    if room < 1:
        raise ValueError(f"the prompt has {len(ids)} tokens: no room left in the model's context "
                         f"(n_ctx={config.n_ctx}); shorten the prompt")
    return min(max_new_tokens, room)


def check_request(config, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                  temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  num_beams: int = 1, length_penalty: float = 1.0) -> list:
    """Checks everything `complete` checks, before anything is decoded or printed.

    Returns:
      Per prompt, `max_new_tokens` clipped to the room its context leaves (`fit_to_context`).

    Raises:
      ValueError: a bad sampling option (as `sampling.generate` words it) or a prompt that
        leaves no room in the context.
    """
    # generate's own checks, run now so a CLI fails before it echoes the prompt.
    sampling._check_options(  # noqa: SLF001 - the same subpackage; one set of rules
        config, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
        early_stopping=False, num_return_sequences=1, eos_id=tokenizer.eos_id, pad_id=0,
        prompt_bucket=16, stream_callback=None)
    return [fit_to_context(config, ids, max_new_tokens)
            for ids in encode_prompts(tokenizer, prompts)]


class _TextStream:
    """One row's streamed tokens as text: each call gives the new suffix of the decoded text,
    holding back a partial UTF-8 character (decoded as U+FFFD) until it is complete."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list = []
        self.text = ""

    def push(self, token: int) -> str:
        if self.tokenizer.eos_id is not None and token == self.tokenizer.eos_id:
            return ""
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids).rstrip("\ufffd")
        new, self.text = text[len(self.text):], text
        return new


def complete(config, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
             length_penalty: float = 1.0, stop: Sequence[str] = (), seed: int = 0,
             on_text: Optional[Callable[[int, str], Any]] = None) -> list:
    """Complete each prompt; returns the generated text of each (stop text included).

    Args:
      config, params: the model (params plain or from `sampling.prepare_for_decoding`).
      tokenizer: its tokenizer.
      prompts: the texts to continue.
      max_new_tokens, temperature, top_k, top_p, num_beams, length_penalty: see
        `sampling.generate`.
      stop: stop strings, encoded to stop sequences.
      seed: the sampling seed.
      on_text: called as on_text(row, text) with each new piece of a row's text as it is
        decoded (sampling), and once at the end with whatever is left (beam search: all of it),
        so the pieces of a row join to its returned text.

    Returns:
      The generated text of each prompt, the end-of-text token dropped.
    """
    ids = encode_prompts(tokenizer, prompts)
    stop_ids = [tokenizer.encode(s) for s in stop if s]
    streams = [_TextStream(tokenizer) for _ in ids]
    kwargs = {}
    if on_text is not None and num_beams == 1:
        def on_token(row, token):
            piece = streams[row].push(token)
            if piece:
                on_text(row, piece)
        kwargs["stream_callback"] = on_token
    out = sampling.generate(config, params, ids, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_k=top_k, top_p=top_p,
                            num_beams=num_beams, length_penalty=length_penalty,
                            eos_id=tokenizer.eos_id, stop_sequences=stop_ids,
                            rng=jax.random.key(seed), **kwargs)
    texts = []
    for row in range(len(ids)):
        n = int(out.lengths[row])
        toks = [int(t) for t in out.tokens[row][:n]]
        if toks and tokenizer.eos_id is not None and toks[-1] == tokenizer.eos_id:
            toks = toks[:-1]
        texts.append(tokenizer.decode(toks))
        rest = texts[-1][len(streams[row].text):]
        if on_text is not None and rest:
            on_text(row, rest)
    return texts
