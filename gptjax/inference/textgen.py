"""Text in, text out: load a model with its tokenizer, and complete prompts (sample.py, serving)."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence

import jax


def load_model(workdir: Optional[str] = None, hf_dir: Optional[str] = None,
               tokenizer_path: Optional[str] = None, step: Optional[int] = None):
    """(GPTConfig, params, tokenizer) from a training work directory or an imported HF directory.

    Args:
      workdir: a train.py run directory (latest checkpoint, or `step`, and its saved tokenizer).
      hf_dir: a local transformers GPT-2 / OpenAI-GPT directory; its tokenizer is GPT-2's byte
        BPE read from `vocab.json` + `merges.txt` (or `encoder.json` + `vocab.bpe`) in
        `tokenizer_path`, which defaults to hf_dir itself.
    """
    from gptjax.train.checkpoint import CheckpointError
    from gptjax.data.tokenizers import from_hf_files

    if (workdir is None) == (hf_dir is None):
        raise ValueError("give exactly one of --workdir (a gptjax run) or --hf_dir "
                         "(a transformers model directory)")
    if workdir is not None:
        if not os.path.isdir(workdir):
            raise CheckpointError(f"work directory {workdir!r} does not exist")
        from gptjax.train.loop import load_workdir
        return load_workdir(workdir, step)
    from gptjax.nn.convert import from_hf
    config, params = from_hf(hf_dir)
    tok = from_hf_files(tokenizer_path or hf_dir)  # GPT-2's byte BPE or GPT-1's BPE
    return config, jax.tree_util.tree_map(jax.numpy.asarray, params), tok


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list:
    """Token ids of each prompt; an empty prompt starts from the end-of-text token when there is one."""
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


def complete(config, params, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, num_beams: int = 1,
             length_penalty: float = 1.0, stop: Sequence[str] = (), seed: int = 0,
             on_token: Optional[Callable[[int, int], Any]] = None) -> list:
    """Complete each prompt; returns the generated text of each (stop text included).

    Args:
      on_token: called as on_token(row, token_id) for every generated token as it is produced
        (sampling only), to stream output.
    """
    from gptjax.inference import sampling

    ids = encode_prompts(tokenizer, prompts)
    stop_ids = [tokenizer.encode(s) for s in stop if s]
    kwargs = {}
    if on_token is not None and num_beams == 1:
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
    return texts
