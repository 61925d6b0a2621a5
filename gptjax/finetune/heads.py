"""GPT-1's task heads (Radford et al. 2018, section 3.3): input transforms, linear heads, losses.

GPT-1 finetunes one pretrained decoder on every task by turning each structured input into
token sequences ("traversal-style" transformations) framed by three special tokens added to the
vocabulary, start `<s>`, delimiter `$` and extract `<e>`, and reading the final hidden state at
the extract token:

  classification    <s> text <e>                               -> linear -> classes
  entailment        <s> premise $ hypothesis <e>               -> linear -> classes
  similarity        <s> a $ b <e>  and  <s> b $ a <e>          -> h_1 + h_2 -> linear
                    (classes, or one regression output for STS-B)
  multiple choice   <s> context $ answer_k <e>, k = 1..K       -> linear -> one score each
                    -> softmax over the K candidates

The objective keeps language modelling as an auxiliary loss: L3 = L2 + lambda * L1 (lambda 0.5).

Everything here is pure: token lists in, token arrays out; parameters are plain pytrees
`{'decoder': <GPT params>, 'head': {'kernel', 'bias'}}`. Batches are shaped [B, K, T]: K is the
number of sequences one example becomes (1 for classification and entailment, 2 for similarity,
the number of candidates for multiple choice), so one code path serves every task. Sequences are
right-padded: attention is causal, so padding after the extract token never changes the hidden
state read at it, and the auxiliary LM loss is weighted to the real tokens.

Shape letters as in gptjax.nn.model: B examples, K sequences per example, T length, C width,
V vocabulary, N head outputs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gptjax.checks import check_int
from gptjax.config import GPTConfig
from gptjax.data.tasks import check_task_type
from gptjax.nn import quant
from gptjax.nn.adapter import COLLECTION, Adapter
from gptjax.nn.model import GPT
from gptjax.nn.losses import lm_loss

# GPT-1 initialised every new weight (the three token embeddings, the head) from N(0, 0.02).
INIT_STD = 0.02


# ================================================================================ special tokens
@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """Ids of GPT-1's three task tokens: start `<s>`, delimiter `$`, extract `<e>`."""

    start: int
    delimiter: int
    extract: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def add_special_tokens(config: GPTConfig, params: dict, rng: jax.Array,
                       std: float = INIT_STD) -> tuple[GPTConfig, dict, SpecialTokens]:
    """Grows the vocabulary by GPT-1's three task tokens.

    The pretrained rows are kept unchanged and three rows drawn from N(0, std) are appended, so
    the new ids are V, V+1, V+2 for a table of V rows. An untied output head grows the same way.

    Args:
      config: the decoder's architecture (vocab_size V).
      params: decoder parameters with `wte.embedding` [V, C].
      rng: key for the new rows.
      std: standard deviation of the new rows (GPT-1: 0.02).

    Returns:
      (config with vocab_size V + 3, params with the grown table(s), the special token ids).
    """
    V, C = config.vocab_size, config.n_embd
    wte_VxC = params["wte"]["embedding"]
    if wte_VxC.shape != (V, C):
        raise ValueError(f"params['wte']['embedding'] has shape {tuple(wte_VxC.shape)}, the config "
                         f"says {(V, C)}")
    k_emb, k_head = jax.random.split(rng)
    new_3xC = std * jax.random.normal(k_emb, (3, C), jnp.float32)
    params = dict(params)
    params["wte"] = {"embedding": jnp.concatenate([jnp.asarray(wte_VxC),
                                                   new_3xC.astype(wte_VxC.dtype)], axis=0)}
    if not config.tie_embeddings:
        head_CxV = jnp.asarray(params["lm_head"])
        new_Cx3 = std * jax.random.normal(k_head, (C, 3), jnp.float32)
        params["lm_head"] = jnp.concatenate([head_CxV, new_Cx3.astype(head_CxV.dtype)], axis=1)
    return config.replace(vocab_size=V + 3), params, SpecialTokens(V, V + 1, V + 2)


# ================================================================================ input transforms
def _trim_to(lengths: list[int], budget: int) -> list[int]:
    """Target lengths summing to <= budget, cutting the longest piece first (BERT's pair rule)."""
    lengths = list(lengths)
    while sum(lengths) > budget:
        i = int(np.argmax(lengths))
        lengths[i] -= 1
    return lengths


def _cut(ids: Sequence[int], n: int, keep_end: bool) -> list[int]:
    ids = list(ids)
    if len(ids) <= n:
        return ids
    return ids[len(ids) - n:] if keep_end else ids[:n]


def transform(task_type: str, special: SpecialTokens, max_len: int, text_a: Sequence[int],
              text_b: Optional[Sequence[int]] = None,
              choices: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """GPT-1's input transformation of one tokenized example into its K token sequences.

    Pieces that do not fit in `max_len` (special tokens included) are cut, longest piece first.
    Texts lose their end, except a multiple-choice context, which loses its beginning: the
    question sits at the end of the context and is what the answers respond to. All candidates of
    one question see the same context.

    Args:
      task_type: one of gptjax.data.tasks.TASK_TYPES.
      special: the task token ids.
      max_len: the longest sequence allowed (at most the model's n_ctx).
      text_a: token ids of the text / premise / first sentence / context.
      text_b: token ids of the hypothesis or second sentence (entailment, similarity).
      choices: token ids of each candidate answer (multiple choice).

    Returns:
      K lists of token ids: 1 for classification and entailment, 2 for similarity (both
      orderings), len(choices) for multiple choice.
    """
    check_task_type(task_type)
    s, d, e = special.start, special.delimiter, special.extract
    if task_type == "classification":
        if max_len < 3:
            raise ValueError(f"max_len={max_len}: classification needs at least 3 positions")
        (n_a,) = _trim_to([len(text_a)], max_len - 2)
        return [[s] + _cut(text_a, n_a, False) + [e]]
    if task_type in ("entailment", "similarity"):
        if text_b is None:
            raise ValueError(f"task_type={task_type!r} needs text_b")
        if max_len < 5:
            raise ValueError(f"max_len={max_len}: {task_type} needs at least 5 positions")
        n_a, n_b = _trim_to([len(text_a), len(text_b)], max_len - 3)
        a, b = _cut(text_a, n_a, False), _cut(text_b, n_b, False)
        if task_type == "entailment":
            return [[s] + a + [d] + b + [e]]
        return [[s] + a + [d] + b + [e], [s] + b + [d] + a + [e]]
    if not choices:
        raise ValueError("task_type='multiple_choice' needs at least one choice")
    if max_len < 5:
        raise ValueError(f"max_len={max_len}: multiple_choice needs at least 5 positions")
    longest = max(len(c) for c in choices)
    n_ctx, n_ans = _trim_to([len(text_a), longest], max_len - 3)
    ctx = _cut(text_a, n_ctx, True)
    return [[s] + ctx + [d] + _cut(c, n_ans, False) + [e] for c in choices]


def pack(examples: Sequence[Sequence[Sequence[int]]], length: int,
         pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads transformed examples into one array.

    Args:
      examples: N examples, each K token lists (the output of `transform`); K must agree.
      length: T, the padded length (at least the longest sequence).
      pad_id: the id written after each sequence (never attended to by earlier positions).

    Returns:
      (tokens_NxKxT int32, lengths_NxK int32); the extract token of sequence (n, k) sits at
      lengths[n, k] - 1.
    """
    if not examples:
        raise ValueError("pack needs at least one example")
    K = len(examples[0])
    tokens_NxKxT = np.full((len(examples), K, length), pad_id, np.int32)
    lengths_NxK = np.zeros((len(examples), K), np.int32)
    for n, seqs in enumerate(examples):
        if len(seqs) != K:
            raise ValueError(f"example {n} has {len(seqs)} sequences, example 0 has {K}: "
                             "multiple-choice examples of one batch need the same number of "
                             "candidates")
        for k, seq in enumerate(seqs):
            if len(seq) > length:
                raise ValueError(f"example {n} sequence {k} has {len(seq)} tokens, more than "
                                 f"length={length}")
            tokens_NxKxT[n, k, :len(seq)] = seq
            lengths_NxK[n, k] = len(seq)
    return tokens_NxKxT, lengths_NxK


# ================================================================================ heads
@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What the head computes and how it is trained.

    Attributes:
      task_type: one of gptjax.data.tasks.TASK_TYPES.
      num_labels: classes for classification/entailment/similarity, 1 for a regression
        (STS-B); the number of candidates for multiple choice.
      lm_coef: lambda, the weight of the auxiliary LM loss (GPT-1: 0.5; 0 turns it off).
      dropout: dropout rate on the extracted features before the linear layer (GPT-1: 0.1).
    """

    task_type: str
    num_labels: int
    lm_coef: float = 0.5
    dropout: float = 0.1

    def __post_init__(self):
        check_task_type(self.task_type)
        check_int("num_labels", self.num_labels)
        if self.task_type == "multiple_choice" and self.num_labels < 2:
            raise ValueError(f"num_labels={self.num_labels}: multiple choice needs >= 2 candidates")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r}: must be in [0, 1)")
        if self.lm_coef < 0:
            raise ValueError(f"lm_coef={self.lm_coef!r}: must be >= 0")

    @property
    def regression(self) -> bool:
        return self.task_type != "multiple_choice" and self.num_labels == 1

    @property
    def n_out(self) -> int:
        """Outputs of the linear layer: 1 score per candidate, 1 regression value, or classes."""
        return 1 if self.task_type == "multiple_choice" else self.num_labels


def init_head(rng: jax.Array, head_cfg: HeadConfig, n_embd: int,
              std: float = INIT_STD) -> dict:
    """The head's linear layer: kernel [C, N] from N(0, std), bias [N] zeros (as GPT-1)."""
    return {"kernel": std * jax.random.normal(rng, (n_embd, head_cfg.n_out), jnp.float32),
            "bias": jnp.zeros((head_cfg.n_out,), jnp.float32)}


def gather_extract(hidden_BxKxTxC: jax.Array, lengths_BxK: jax.Array) -> jax.Array:
    """The hidden state at each sequence's extract token (its last real position): [B, K, C]."""
    idx_BxKx1x1 = jnp.maximum(lengths_BxK - 1, 0)[..., None, None]
    return jnp.take_along_axis(hidden_BxKxTxC, idx_BxKx1x1, axis=2)[:, :, 0, :]


def head_outputs(head_params: dict, feats_BxKxC: jax.Array, head_cfg: HeadConfig, *,
                 deterministic: bool = True, rng: Optional[jax.Array] = None) -> jax.Array:
    """The linear head on extracted features.

    Args:
      head_params: {'kernel': [C, N], 'bias': [N]}.
      feats_BxKxC: hidden states at the extract tokens.
      head_cfg: the head.
      deterministic: skip dropout (evaluation); otherwise `rng` is required.
      rng: dropout key.

    Returns:
      Multiple choice: scores [B, K]. Regression: values [B]. Otherwise: logits [B, N]. For
      similarity (K = 2) the two orderings' features are summed before the linear layer.
    """
    feats_BxKxC = feats_BxKxC.astype(jnp.float32)
    if not deterministic and head_cfg.dropout > 0:
        if rng is None:
            raise ValueError("head_outputs(deterministic=False) needs a dropout rng")
        keep = 1.0 - head_cfg.dropout
        mask = jax.random.bernoulli(rng, keep, feats_BxKxC.shape)
        feats_BxKxC = jnp.where(mask, feats_BxKxC / keep, 0.0)
    kernel_CxN = head_params["kernel"].astype(jnp.float32)
    bias_N = head_params["bias"].astype(jnp.float32)
    if head_cfg.task_type == "multiple_choice":
        return (feats_BxKxC @ kernel_CxN + bias_N)[..., 0]
    out_BxN = jnp.sum(feats_BxKxC, axis=1) @ kernel_CxN + bias_N
    return out_BxN[:, 0] if head_cfg.regression else out_BxN


def forward(model_cfg: GPTConfig, params: dict, tokens_BxKxT: jax.Array, lengths_BxK: jax.Array,
            head_cfg: HeadConfig, *, deterministic: bool = True,
            rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Decoder plus head on a batch of transformed examples.

    Args:
      model_cfg: the decoder's architecture (vocabulary including the task tokens).
      params: {'decoder': GPT params, 'head': head params}; a LoRA run's also hold 'lora' (the
        adapters, read by the decoder's Linears) and 'tokens' (the task-token rows' deltas, see
        `task_token_embeds`), and its 'decoder' may be weight-only bf16/int8.
      tokens_BxKxT, lengths_BxK: from `pack`.
      head_cfg: the head.
      deterministic: no dropout anywhere (evaluation).
      rng: dropout key when not deterministic.

    Returns:
      (task outputs as `head_outputs` returns them, LM logits [B, K, T, V] fp32).
    """
    B, K, T = tokens_BxKxT.shape
    if not deterministic and rng is None:
        raise ValueError("forward(deterministic=False) needs a dropout rng")
    k_dec, k_head = jax.random.split(rng) if rng is not None else (None, None)
    use_dropout = not deterministic and max(model_cfg.embd_pdrop, model_cfg.attn_pdrop,
                                            model_cfg.resid_pdrop, _lora_dropout(params)) > 0
    variables = {"params": params["decoder"]}
    if LORA in params:
        variables[COLLECTION] = params[LORA]
    tokens_NxT = tokens_BxKxT.reshape(B * K, T)
    embeds_NxTxC = None
    if TOKENS in params:
        embeds_NxTxC = task_token_embeds(model_cfg, params["decoder"], params[TOKENS], tokens_NxT)
    logits_NxTxV, hidden_NxTxC = GPT(model_cfg).apply(
        variables, tokens_NxT, deterministic=not use_dropout,
        rngs={"dropout": k_dec} if use_dropout else None, return_hidden=True,
        inputs_embeds_BxTxC=embeds_NxTxC)
    if TOKENS in params:
        logits_NxTxV = task_token_logits(model_cfg, params[TOKENS], logits_NxTxV, hidden_NxTxC)
    hidden_BxKxTxC = hidden_NxTxC.reshape(B, K, T, -1)
    feats_BxKxC = gather_extract(hidden_BxKxTxC, lengths_BxK)
    out = head_outputs(params["head"], feats_BxKxC, head_cfg, deterministic=deterministic,
                       rng=k_head)
    return out, logits_NxTxV.reshape(B, K, T, -1)


# ============================================================================ LoRA's task tokens
# A LoRA run freezes the decoder, but GPT-1's three task tokens are new rows of it, drawn at
# random: frozen, the model could only route around them. Their deltas are trained instead: a
# [3, C] leaf added to the (frozen) rows of the new ids where they are read, at the input and in
# the tied output head (an untied head gets its own [C, 3] delta). They start at zero, so a new
# LoRA run computes exactly what a full finetuning run starts from.
LORA, TOKENS = "lora", "tokens"  # the params keys of a LoRA run's adapters and token deltas


def init_task_tokens(model_cfg: GPTConfig) -> dict:
    """Zero deltas for the three task-token rows: {'wte': [3, C]} (+ {'lm_head': [C, 3]} for an
    untied output head)."""
    out = {"wte": jnp.zeros((3, model_cfg.n_embd), jnp.float32)}
    if not model_cfg.tie_embeddings:
        out["lm_head"] = jnp.zeros((model_cfg.n_embd, 3), jnp.float32)
    return out


def task_token_embeds(model_cfg: GPTConfig, decoder: dict, deltas: dict,
                      tokens_NxT: jax.Array) -> jax.Array:
    """The token embeddings [N, T, C] of `tokens_NxT`, with the task tokens' deltas added: the
    frozen table's rows (fp32, or a weight-only bf16/int8 table's rows dequantized) plus
    deltas['wte'][id - V0] for the last three ids V0..V0+2."""
    dt = jnp.dtype(model_cfg.dtype)
    table = decoder["wte"]
    if "embedding_q" in table:
        rows_NxTxC = quant.take(table["embedding_q"], tokens_NxT, dt)
    else:
        rows_NxTxC = jnp.take(table["embedding"], tokens_NxT, axis=0).astype(dt)
    idx_NxT = tokens_NxT - (model_cfg.vocab_size - 3)
    extra_NxTxC = jnp.take(deltas["wte"], jnp.clip(idx_NxT, 0, 2), axis=0)
    return rows_NxTxC + jnp.where((idx_NxT >= 0)[..., None], extra_NxTxC, 0).astype(dt)


def task_token_logits(model_cfg: GPTConfig, deltas: dict, logits_NxTxV: jax.Array,
                      hidden_NxTxC: jax.Array) -> jax.Array:
    """The LM logits with the task tokens' output rows moved by their deltas (the last three
    columns get hidden @ delta)."""
    d_CxK = deltas["wte"].T if model_cfg.tie_embeddings else deltas["lm_head"]
    extra_NxTxK = jnp.einsum("NTC,CK->NTK", hidden_NxTxC.astype(jnp.float32), d_CxK)
    return logits_NxTxV.at[..., model_cfg.vocab_size - 3:].add(extra_NxTxK)


def _lora_dropout(params: dict) -> float:
    ads = jax.tree_util.tree_leaves(params.get(LORA, {}),
                                    is_leaf=lambda x: isinstance(x, Adapter))
    return max([a.dropout for a in ads if isinstance(a, Adapter)], default=0.0)


# ================================================================================ losses
def task_loss(outputs: jax.Array, labels_B: jax.Array, head_cfg: HeadConfig,
              weights_B: Optional[jax.Array] = None) -> jax.Array:
    """L2, the supervised loss: cross-entropy over classes or candidates, or squared error.

    Args:
      outputs: `head_outputs` of the batch.
      labels_B: class / candidate indices (int), or targets (float) for regression.
      head_cfg: the head.
      weights_B: per-example weights (0 for padding rows of a partial batch); None = all 1.

    Returns:
      The weighted mean loss, fp32 (0 when every weight is 0).
    """
    if head_cfg.regression:
        per_B = jnp.square(outputs.astype(jnp.float32) - labels_B.astype(jnp.float32))
    else:
        per_B = optax.softmax_cross_entropy_with_integer_labels(
            outputs.astype(jnp.float32), labels_B.astype(jnp.int32))
    if weights_B is None:
        return jnp.mean(per_B)
    w_B = weights_B.astype(jnp.float32)
    return jnp.sum(per_B * w_B) / jnp.maximum(jnp.sum(w_B), 1e-8)


def lm_targets(tokens_BxKxT: jax.Array, lengths_BxK: jax.Array,
               weights_B: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Next-token targets and weights for the auxiliary LM loss over the real tokens.

    Position t predicts token t+1 for t < length - 1, so every token after the start token is
    a target, the delimiter and extract tokens included (as in GPT-1's code).

    Returns:
      (targets_BxKxT, weights_BxKxT); the last position's target is padding with weight 0.
    """
    T = tokens_BxKxT.shape[-1]
    targets = jnp.concatenate([tokens_BxKxT[..., 1:], jnp.zeros_like(tokens_BxKxT[..., :1])], -1)
    w_BxKxT = (jnp.arange(T) < (lengths_BxK[..., None] - 1)).astype(jnp.float32)
    if weights_B is not None:
        w_BxKxT = w_BxKxT * weights_B.astype(jnp.float32)[:, None, None]
    return targets, w_BxKxT


def finetune_loss(model_cfg: GPTConfig, params: dict, batch: dict, head_cfg: HeadConfig, *,
                  deterministic: bool = False,
                  rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """L3 = L2 + lambda * L1: the task loss plus `head_cfg.lm_coef` times the LM loss.

    Args:
      model_cfg: the decoder's architecture.
      params: {'decoder', 'head'}.
      batch: 'tokens' [B, K, T], 'lengths' [B, K], 'labels' [B], optional 'weights' [B].
      head_cfg: the head (task type, lambda, dropout).
      deterministic: no dropout (evaluation).
      rng: dropout key when training.

    Returns:
      (L3, {'loss', 'task_loss', 'lm_loss', 'outputs'}).
    """
    weights_B = batch.get("weights")
    outputs, logits_BxKxTxV = forward(model_cfg, params, batch["tokens"], batch["lengths"],
                                      head_cfg, deterministic=deterministic, rng=rng)
    l2 = task_loss(outputs, batch["labels"], head_cfg, weights_B)
    targets, w_BxKxT = lm_targets(batch["tokens"], batch["lengths"], weights_B)
    l1 = lm_loss(logits_BxKxTxV, targets, w_BxKxT)
    total = l2 + head_cfg.lm_coef * l1 if head_cfg.lm_coef else l2
    return total, {"loss": total, "task_loss": l2, "lm_loss": l1, "outputs": outputs}


def predictions(outputs: jax.Array, head_cfg: HeadConfig) -> jax.Array:
    """Predicted class / candidate index (argmax), or the regression value itself."""
    if head_cfg.regression:
        return outputs
    return jnp.argmax(outputs, axis=-1)
