"""The metrics GLUE reports, in numpy: accuracy, Matthews correlation, F1, Pearson, Spearman.

Each matches its scipy / scikit-learn counterpart (tests compare them on random inputs), including
the degenerate cases: a correlation with a constant input is 0 here for Matthews (as sklearn) and
NaN for Pearson and Spearman (as scipy); F1 with no positive prediction or label is 0 (sklearn's
`zero_division` default, minus the warning).

    compute_metrics(("f1", "accuracy"), preds, labels)   # {'f1': ..., 'accuracy': ...}
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _as_1d(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    return a


def _pair(preds, labels) -> tuple[np.ndarray, np.ndarray]:
    p, y = _as_1d(preds, "preds"), _as_1d(labels, "labels")
    if p.shape != y.shape:
        raise ValueError(f"preds has {p.shape[0]} entries, labels {y.shape[0]}: they must match")
    if p.size == 0:
        raise ValueError("metrics need at least one prediction")
    return p, y


def accuracy(preds, labels) -> float:
    """Fraction of exact matches."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def matthews_corrcoef(preds, labels) -> float:
    """Matthews correlation (CoLA's metric), multiclass form (Gorodkin 2004), as sklearn.

    MCC = (c * s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2)) with c correct
    predictions, s samples, p_k / t_k how often class k is predicted / true; 0 when undefined.
    """
    p, y = _pair(preds, labels)
    classes, inv = np.unique(np.concatenate([y, p]), return_inverse=True)
    y_i, p_i = inv[: y.size], inv[y.size:]
    n = classes.size
    conf = np.zeros((n, n), np.float64)
    np.add.at(conf, (y_i, p_i), 1.0)
    t_k, p_k = conf.sum(axis=1), conf.sum(axis=0)
    c, s = np.trace(conf), conf.sum()
    cov_yp = c * s - t_k @ p_k
    cov_pp = s * s - p_k @ p_k
    cov_yy = s * s - t_k @ t_k
    if cov_pp * cov_yy == 0:
        return 0.0
    return float(cov_yp / np.sqrt(cov_pp * cov_yy))


def f1(preds, labels, positive=1) -> float:
    """Binary F1 of the `positive` class (MRPC, QQP): 2 TP / (2 TP + FP + FN); 0 if undefined."""
    p, y = _pair(preds, labels)
    tp = float(np.sum((p == positive) & (y == positive)))
    fp = float(np.sum((p == positive) & (y != positive)))
    fn = float(np.sum((p != positive) & (y == positive)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def pearson(preds, labels) -> float:
    """Pearson correlation (STS-B); NaN when either input is constant, as scipy."""
    p, y = _pair(preds, labels)
    p, y = p.astype(np.float64), y.astype(np.float64)
    dp, dy = p - p.mean(), y - y.mean()
    denom = np.sqrt(np.sum(dp * dp) * np.sum(dy * dy))
    if denom == 0:
        return float("nan")
    # Clipped like scipy: rounding can push |r| a hair above 1.
    return float(np.clip(np.sum(dp * dy) / denom, -1.0, 1.0))


def rankdata(x) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata 'average')."""
    a = _as_1d(x, "x")
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    # Start of each run of equal values, and the run each sorted element belongs to.
    new_run = np.concatenate([[True], sorted_a[1:] != sorted_a[:-1]])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [a.size]])
    avg_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks start+1 .. end
    ranks = np.empty(a.size, np.float64)
    ranks[order] = avg_rank[run_id]
    return ranks


def spearman(preds, labels) -> float:
    """Spearman rank correlation (STS-B): Pearson of the tie-averaged ranks, as scipy."""
    p, y = _pair(preds, labels)
    return pearson(rankdata(p), rankdata(y))


METRICS: dict[str, Callable] = {
    "accuracy": accuracy,
    "matthews": matthews_corrcoef,
    "f1": f1,
    "pearson": pearson,
    "spearman": spearman,
}


def compute_metrics(names: Sequence[str], preds, labels) -> dict[str, float]:
    """The named metrics of `preds` against `labels`.

    Args:
      names: metric names from METRICS.
      preds, labels: 1-D arrays of equal length.

    Returns:
      {name: value}.
    """
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; allowed: {sorted(METRICS)}")
    return {n: METRICS[n](preds, labels) for n in names}
