"""Text metrics of the zero-shot evaluations: CoQA/SQuAD F1 and exact match, ROUGE, BLEU, MCC.

CoQA's F1 is the official script's (and lm-eval's `coqa` task's): answers normalised (lower
case, ASCII punctuation and the articles a/an/the removed, whitespace collapsed), token-bag F1,
an empty answer scoring 1 only against an empty one; with several gold answers, the mean over
leaving each one out of the max. ROUGE comes from Google's `rouge-score` and BLEU from
`sacrebleu` (both in the `eval` extra), so the numbers are theirs.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD / CoQA normalisation: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def answer_f1(gold: str, pred: str) -> float:
    """Token-bag F1 of two normalised answers (1.0 for two empty answers, 0.0 for one)."""
    g, p = normalize_answer(gold).split(), normalize_answer(pred).split()
    if not g or not p:
        return float(g == p)
    same = sum((collections.Counter(g) & collections.Counter(p)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def answer_exact(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def coqa_scores(golds: Sequence[str], pred: str) -> dict:
    """{'em', 'f1'} of one prediction against a turn's gold answers, as CoQA's script scores
    them: with n > 1 answers, the mean over i of the max over the answers other than i."""
    if not golds:
        raise ValueError("a CoQA turn needs at least one gold answer")
    if len(golds) == 1:
        return {"em": answer_exact(golds[0], pred), "f1": answer_f1(golds[0], pred)}
    em = f1 = 0.0
    for i in range(len(golds)):
        rest = list(golds[:i]) + list(golds[i + 1:])
        em += max(answer_exact(g, pred) for g in rest)
        f1 += max(answer_f1(g, pred) for g in rest)
    return {"em": em / len(golds), "f1": f1 / len(golds)}


def exact_match(answers: Sequence[str], pred: str) -> float:
    """1.0 when the normalised prediction equals any normalised answer."""
    return max((answer_exact(a, pred) for a in answers), default=0.0)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Mean ROUGE-1/2/L F-measures (x100) by `rouge-score` (Porter stemming, as its CNN/DM
    reports use); ROUGE-L is the summary-level 'rougeLsum' over newline-separated sentences."""
    from rouge_score import rouge_scorer  # optional: the eval extra (rouge-score)

    keys = ("rouge1", "rouge2", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    sums = dict.fromkeys(keys, 0.0)
    for pred, ref in zip(predictions, references, strict=True):
        scores = scorer.score(ref, pred)
        for k in keys:
            sums[k] += scores[k].fmeasure
    n = max(len(predictions), 1)
    return {"rouge1": 100 * sums["rouge1"] / n, "rouge2": 100 * sums["rouge2"] / n,
            "rougeL": 100 * sums["rougeLsum"] / n}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU by `sacrebleu` (its default 13a tokenisation), one reference per sentence."""
    import sacrebleu  # optional: the eval extra (sacrebleu)

    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation of binary predictions (CoLA's metric); 0.0 when undefined."""
    p, y = np.asarray(preds, bool), np.asarray(labels, bool)
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


# The stop words of the LAMBADA filter: NLTK's English list (the usual choice for GPT-2's
# "stop-word filter"; the paper does not list its own).
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she
her hers herself it its itself they them their theirs themselves what which who whom this that
these those am is are was were be been being have has had having do does did doing a an the and
but if or because as until while of at by for with about against between into through during
before after above below to from up down in out on off over under again further then once here
there when where why how all any both each few more most other some such no nor not only own
same so than too very s t can will just don should now d ll m o re ve y ain aren couldn didn
doesn hadn hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn
""".split())
