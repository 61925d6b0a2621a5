"""GPT-1's zero-shot heuristics (Radford et al. 2018, section 5): tasks scored by the LM alone.

Multiple choice picks the answer with the highest average token log-probability given the
context; SST-2 appends " very" and compares " positive" with " negative". The method of a task is
its `TaskSpec.zero_shot` ('choice', 'sentiment', or '' for none). CoLA thresholds the average
token log-probability (`zero_shot_cola`: fitted on train, reported on dev); Winograd / DPRD are
in gptjax.eval.gpt2_zeroshot (`winograd`'s `accuracy_mean`, GPT-1's per-token average).

    acc = zero_shot_accuracy(get_task("story_cloze"), config, params, tokenizer, examples)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from gptjax.config import GPTConfig
from gptjax.data.tasks import TASKS, Example, TaskSpec
from gptjax.eval.scoring import score_continuations
from gptjax.eval.text_metrics import matthews

SENTIMENT_PROMPT = " very"
SENTIMENT_WORDS = (" negative", " positive")  # in SST-2's label order (0, 1)


def zero_shot_choice(model_cfg: GPTConfig, params, tokenizer, examples: Sequence[Example],
                     normalize: str = "mean", batch_size: int = 32) -> np.ndarray:
    """GPT-1's zero-shot multiple choice: the candidate with the highest average token
    log-probability given the context (normalize='mean'), or the highest total ('sum').

    Args:
      model_cfg, params: the decoder.
      tokenizer: its tokenizer.
      examples: multiple-choice examples (text_a the context, choices the candidates).
      normalize: 'mean' or 'sum' of the candidate's token log-probabilities.
      batch_size: sequences per forward pass.

    Returns:
      The predicted candidate index of every example.
    """
    if normalize not in ("mean", "sum"):
        raise ValueError(f"normalize={normalize!r}: allowed values are 'mean', 'sum'")
    pairs = []
    for ex in examples:
        ctx = tokenizer.encode(ex.text_a)
        for c in ex.choices:
            # A space joins context and answer, so the answer's first word is tokenized as a
            # word that follows text (GPT-2 BPE: 'Ġword').
            pairs.append((ctx, tokenizer.encode(" " + c)))
    logp, count = score_continuations(model_cfg, params, pairs, batch_size)
    score = logp / np.maximum(count, 1) if normalize == "mean" else logp
    preds = np.zeros(len(examples), np.int64)
    k = 0
    for i, ex in enumerate(examples):
        preds[i] = int(np.argmax(score[k:k + len(ex.choices)]))
        k += len(ex.choices)
    return preds


def zero_shot_sentiment(model_cfg: GPTConfig, params, tokenizer, examples: Sequence[Example],
                        batch_size: int = 32) -> np.ndarray:
    """GPT-1's zero-shot SST-2: append " very" and compare p(" positive") with p(" negative").

    Words of several tokens are compared by their total log-probability, which for one-token
    words is GPT-1's comparison of the two next-token probabilities.

    Args:
      model_cfg, params: the decoder.
      tokenizer: its tokenizer.
      examples: the sentences (text_a).
      batch_size: sequences per forward pass.

    Returns:
      1 (positive) or 0 (negative) for every example.
    """
    words = [tokenizer.encode(w) for w in SENTIMENT_WORDS]
    pairs = [(tokenizer.encode(ex.text_a + SENTIMENT_PROMPT), w) for ex in examples
             for w in words]
    logp, _ = score_continuations(model_cfg, params, pairs, batch_size)
    return np.argmax(logp.reshape(len(examples), len(words)), axis=1)


def check_zero_shot(spec: TaskSpec) -> None:
    """Raises ValueError naming the tasks that have a zero-shot method unless `spec` has one."""
    if not spec.zero_shot:
        raise _no_method(spec)


def _no_method(spec: TaskSpec) -> ValueError:
    allowed = sorted(t.name for t in TASKS.values() if t.zero_shot)
    return ValueError(f"task {spec.name!r} has no zero-shot method; allowed: {allowed}")


def zero_shot_predict(spec: TaskSpec, model_cfg: GPTConfig, params, tokenizer,
                      examples: Sequence[Example], normalize: str = "mean",
                      batch_size: int = 32) -> np.ndarray:
    """Zero-shot predictions with the task's method (TaskSpec.zero_shot).

    Args:
      spec: the task.
      model_cfg, params, tokenizer: the decoder and its tokenizer.
      examples: the task's examples.
      normalize: multiple choice: 'mean' or 'sum' (see `zero_shot_choice`).
      batch_size: sequences per forward pass.

    Returns:
      The predicted label (sentiment) or candidate index (choice) of every example.
    """
    if spec.zero_shot == "sentiment":
        return zero_shot_sentiment(model_cfg, params, tokenizer, examples, batch_size)
    if spec.zero_shot == "choice":
        return zero_shot_choice(model_cfg, params, tokenizer, examples, normalize, batch_size)
    raise _no_method(spec)


def zero_shot_accuracy(spec: TaskSpec, model_cfg: GPTConfig, params, tokenizer,
                       examples: Sequence[Example], normalize: str = "mean",
                       batch_size: int = 32) -> float:
    """Accuracy of `zero_shot_predict` on labelled examples (same arguments).

    Returns:
      The fraction of examples predicted right.
    """
    if any(ex.label is None for ex in examples):
        raise ValueError(f"{spec.name}: zero-shot accuracy needs labelled examples")
    preds = zero_shot_predict(spec, model_cfg, params, tokenizer, examples, normalize, batch_size)
    return float(np.mean(preds == np.array([ex.label for ex in examples])))


# ================================================================================ CoLA
def sentence_logprobs(model_cfg: GPTConfig, params, tokenizer, sentences: Sequence[str],
                      batch_size: int = 32) -> np.ndarray:
    """Average token log-probability of each sentence under the LM (its first token given the
    end-of-text token, or given nothing when the tokenizer has none: it is then not scored)."""
    pairs = []
    for s in sentences:
        ids = tokenizer.encode(s)
        pairs.append(([tokenizer.eos_id], ids) if tokenizer.eos_id is not None
                     else (ids[:1], ids[1:] or ids[:1]))
    logp, count = score_continuations(model_cfg, params, pairs, batch_size)
    return logp / np.maximum(count, 1)


def fit_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold t (predict 1 when score > t) with the best Matthews correlation on
    (scores, labels): each midpoint between sorted scores is tried."""
    s = np.sort(np.unique(scores))
    cands = np.concatenate([[s[0] - 1.0], (s[:-1] + s[1:]) / 2, [s[-1] + 1.0]])
    mcc = [matthews((scores > t).astype(int), labels) for t in cands]
    return float(cands[int(np.argmax(mcc))])


def zero_shot_cola(model_cfg: GPTConfig, params, tokenizer, train: Sequence[Example],
                   dev: Sequence[Example], batch_size: int = 32) -> dict:
    """GPT-1's zero-shot CoLA: a sentence is acceptable when its average token log-probability
    exceeds a threshold fitted (best MCC) on `train`; reported on `dev`.

    Returns:
      {'threshold', 'train_mcc', 'mcc', 'accuracy', 'n'}.
    """
    y_tr = np.array([int(ex.label) for ex in train])
    y_dev = np.array([int(ex.label) for ex in dev])
    s_tr = sentence_logprobs(model_cfg, params, tokenizer, [ex.text_a for ex in train], batch_size)
    s_dev = sentence_logprobs(model_cfg, params, tokenizer, [ex.text_a for ex in dev], batch_size)
    t = fit_threshold(s_tr, y_tr)
    pred = (s_dev > t).astype(int)
    return {"threshold": t, "train_mcc": matthews((s_tr > t).astype(int), y_tr),
            "mcc": matthews(pred, y_dev), "accuracy": float(np.mean(pred == y_dev)),
            "n": len(dev)}
