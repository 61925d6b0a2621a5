"""EleutherAI lm-evaluation-harness adapter: a gptjax decoder as the `lm_eval` model 'gptjax'.

    lm = GPTJaxLM(hf_dir="path/to/gpt2")            # or workdir="runs/a" (step=...)
    lm = GPTJaxLM(workdir="runs/a", mesh="fsdp=4,tensor=2")   # sharded as training shards it
    lm_eval.simple_evaluate(model=lm, tasks=["lambada_openai"])
    python eval.py --mode=lm_eval --hf_dir path/to/gpt2 --tasks hellaswag --include_path my_tasks

It follows lm-eval's own `hf` backend request by request, so the numbers compare: contexts are
encoded with the continuation and split (lm-eval's TemplateLM), an empty context is the
end-of-text token, `(context + continuation)[-(n_ctx + 1):][:-1]` is what the model reads,
`loglikelihood_rolling` scores disjoint windows of n_ctx tokens (`get_rolling_token_windows`),
and `generate_until` decodes greedily (or samples) on the KV-cache decoder
(gptjax.inference.sampling.generate), cutting the text at the first stop string.
With `mesh`, log-likelihoods are scored on a device mesh, in one process or several
(gptjax.eval.mesh_scoring): the same numbers as on one device, to float32 rounding.

This module needs the `eval` extra (lm-eval): it subclasses lm-eval's TemplateLM, so it is
imported only where lm-eval is wanted (gptjax.eval does not import it).
"""

from __future__ import annotations

from typing import Optional, Union

import numpy as np

from gptjax.eval.mesh_scoring import MeshScorer, on_host
from gptjax.eval.scoring import round_up, score_targets
from gptjax.inference import sampling
from gptjax.runs.pretrained import load_pretrained

try:
    # lm_eval.models first: it registers lm-eval's own backends (lazily), which it skips once
    # the registry holds any model, so registering 'gptjax' first would hide 'hf'.
    import lm_eval.models  # noqa: F401
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError:
    raise ImportError("gptjax.eval.lm_harness needs lm-eval: pip install 'gptjax[eval]'") from None


@register_model("gptjax")
class GPTJaxLM(TemplateLM):
    """A gptjax decoder (a train.py workdir or a transformers directory) for lm-eval.

    Args:
      workdir: a train.py run directory (its latest checkpoint, or `step`).
      hf_dir: a local transformers GPT-2 / OpenAI-GPT directory.
      tokenizer: the tokenizer files of `hf_dir` (default: hf_dir).
      step: a checkpoint step of `workdir`.
      batch_size: sequences per forward pass (scoring) or per generate call.
      bucket: padded lengths are multiples of this (fewer compilations).
      seed: the sampling seed of `generate_until` requests with do_sample.
      model: an already-loaded (config, params, tokenizer) instead of a path.
      mesh: score on a device mesh, e.g. "fsdp=4,tensor=2" (or a dict; the axes of train.py's
        config.mesh): the parameters sharded by training's rules, each batch (rounded up to a
        multiple of the data-parallel size) over the data axes (gptjax.eval.mesh_scoring).
        With several processes (jax.distributed started), every process runs the harness on
        all requests in step and gets every result; lm-eval sees rank 0 of 1 in each.
        Log-likelihood requests only: generate_until is refused on a mesh.
    """

    def __init__(self, workdir: Optional[str] = None, hf_dir: Optional[str] = None,
                 tokenizer: Optional[str] = None, step: Optional[int] = None,
                 batch_size: int = 16, bucket: int = 16, seed: int = 0,
                 model: Optional[tuple] = None, mesh: Union[str, dict, None] = None,
                 **unused):
        super().__init__()
        if model is None:
            with on_host(bool(mesh)):
                model = load_pretrained(workdir=workdir, hf_dir=hf_dir, tokenizer_path=tokenizer,
                                        step=None if step in (None, "") else int(step))
        self.config, self.params, self.tok = model
        self.scorer = MeshScorer(self.config, self.params, mesh) if mesh else None
        if self.scorer is not None:  # (the sharded copy replaces the whole one)
            self.params = self.scorer.params
        self._batch_size = round_up(int(batch_size), self.scorer.data_parallel if mesh else 1)
        self.bucket = int(bucket)
        self.seed = int(seed)
        self.decode_params = (None if self.scorer is not None
                              else sampling.prepare_for_decoding(self.config, self.params))

    # --------------------------------------------------------------- what TemplateLM asks for
    @property
    def eot_token_id(self) -> int:
        if self.tok.eos_id is None:
            raise ValueError("this tokenizer has no end-of-text token: lm-eval requests with an "
                             "empty context (and loglikelihood_rolling) need one")
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.config.n_ctx

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list:
        del add_special_tokens, kwargs  # gptjax tokenizers add no special tokens
        return list(self.tok.encode(string))

    def tok_decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids])

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list:
        """(log p(continuation | context), is_greedy) per (key, context ids, continuation ids).

        As lm-eval's hf backend: the model reads (context + continuation)[-(n_ctx + 1):][:-1]
        and the continuation's tokens are its last predictions. Rows are batched longest-first
        and right-padded (padding is causal-invisible), so batching never changes a score.
        """
        del disable_tqdm, kwargs
        wholes = [(list(ctx) + list(cont))[-(self.max_length + 1):] for _, ctx, cont in requests]
        order = np.argsort([-len(w) for w in wholes], kind="stable")
        out = [None] * len(wholes)
        B = self.batch_size
        for b in range(0, len(wholes), B):
            rows = order[b:b + B]
            T = min(round_up(max(len(wholes[r]) - 1 for r in rows), self.bucket), self.max_length)
            tokens = np.zeros((B, T), np.int32)
            targets = np.zeros((B, T), np.int32)
            weights = np.zeros((B, T), np.float32)
            for j, r in enumerate(rows):
                w, n = wholes[r], len(wholes[r]) - 1
                tokens[j, :n], targets[j, :n] = w[:-1], w[1:]
                weights[j, max(n - len(requests[r][2]), 0): n] = 1.0
            nll, _, greedy = (self.scorer(tokens, targets, weights) if self.scorer is not None
                              else score_targets(self.config, self.params, tokens, targets,
                                                 weights))
            for j, r in enumerate(rows):  # (lm-eval's is_greedy)
                out[r] = (-float(nll[j]), bool(greedy[j]))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Total log-likelihood of each whole string, in disjoint windows of n_ctx tokens each
        conditioned on the previous ones (lm-eval's rolling windows, context_len=1)."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None,) + w)
                owner.append(i)
        scores = self._loglikelihood_tokens(windows)
        total = np.zeros(len(requests))
        for i, (logp, _) in zip(owner, scores):
            total[i] += logp
        return [float(x) for x in total]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """Greedy (or sampled, with do_sample) continuations cut at the first stop string."""
        del disable_tqdm
        if self.scorer is not None:
            raise ValueError("generate_until tasks do not run on a mesh yet (log-likelihood "
                             "and rolling tasks do): evaluate them without --mesh")
        out = [None] * len(requests)
        groups: dict = {}
        for i, req in enumerate(requests):
            context, kw = req.args
            groups.setdefault(repr(sorted(kw.items())), []).append((i, context, kw))
        for items in groups.values():
            kw = dict(items[0][2])
            texts = self._generate([c for _, c, _ in items], kw)
            for (i, _, _), t in zip(items, texts):
                out[i] = t
        return out

    def _generate(self, contexts: list, kw: dict) -> list:
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        eos_text = self.tok.decode([self.eot_token_id]) if self.tok.eos_id is not None else None
        if eos_text and eos_text not in until:
            until.append(eos_text)
        max_new = min(int(kw.get("max_gen_toks", 256)), self.max_length - 1)
        sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
        stops = [self.tok_encode(u) for u in until if u]
        texts = []
        for b in range(0, len(contexts), self.batch_size):
            rows = [self.tok_encode(c)[-(self.max_length - max_new):] or [self.eot_token_id]
                    for c in contexts[b:b + self.batch_size]]
            res = sampling.generate(
                self.config, self.decode_params, rows, max_new_tokens=max_new,
                temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                top_k=int(kw.get("top_k", 0) or 0) if sample else 0,
                top_p=float(kw.get("top_p", 1.0) or 1.0) if sample else 1.0,
                eos_id=self.tok.eos_id, stop_sequences=[s for s in stops if s],
                rng=self.seed + b)
            for r in range(len(rows)):
                toks = [int(t) for t in res.tokens[r][: int(res.lengths[r])]]
                text = self.tok_decode([t for t in toks if t != self.tok.eos_id])
                for u in until:
                    text = text.split(u)[0] if u else text
                texts.append(text)
        return texts
