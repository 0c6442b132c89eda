"""Classification metrics (the papers' macro-F1, accuracy, AUROC) and mean ± std over seeds.

Plain numpy so they can be checked by hand. Conventions follow scikit-learn / torchmetrics:
- macro-F1 averages the per-class F1 over the classes that occur in y_true or y_pred (a class
  absent from both says nothing about the model and is left out);
- AUROC is one-vs-rest per class (Mann-Whitney U with average ranks for ties), macro-averaged
  over the classes that have both positives and negatives; the binary case is the AUROC of the
  positive class's score. None where no class qualifies (e.g. a test split of one class).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """(K, K) counts: rows are true classes, columns predicted classes."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 per class = 2TP / (2TP + FP + FN); NaN where the class is absent from truth and
    predictions alike."""
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    denom = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2 * tp / denom, np.nan)


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int | None = None) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = num_classes or int(max(y_true.max(initial=0), y_pred.max(initial=0)) + 1)
    f1 = per_class_f1(confusion_matrix(y_true, y_pred, k))
    return float(np.nanmean(f1)) if np.isfinite(f1).any() else 0.0


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float((y_true == y_pred).mean()) if len(y_true) else 0.0


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of x, ties sharing the mean of their ranks."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    start = 0
    for end in range(1, len(x) + 1):
        if end == len(x) or xs[end] != xs[start]:
            ranks[order[start:end]] = (start + 1 + end) / 2.0  # mean of ranks start+1 .. end
            start = end
    return ranks


def binary_auroc(is_positive: Sequence[bool], score: Sequence[float]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting half."""
    pos = np.asarray(is_positive, dtype=bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(score, dtype=np.float64))
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc(y_true: Sequence[int], probs: np.ndarray) -> float | None:
    """Macro one-vs-rest AUROC from (N, K) class scores; binary (K=2): AUROC of class 1."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if probs.shape[1] == 2:
        return binary_auroc(y_true == 1, probs[:, 1])
    per_class = [binary_auroc(y_true == c, probs[:, c]) for c in range(probs.shape[1])]
    defined = [a for a in per_class if a is not None]
    return float(np.mean(defined)) if defined else None


def classification_metrics(y_true: Sequence[int], probs: np.ndarray) -> dict:
    """Everything a result records about one split, from true labels and (N, K) probabilities."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    k = probs.shape[1]
    cm = confusion_matrix(y_true, y_pred, k)
    f1 = per_class_f1(cm)
    return {
        "macro_f1": macro_f1(y_true, y_pred, k),
        "accuracy": accuracy(y_true, y_pred),
        "auroc": auroc(y_true, probs),
        "per_class_f1": [None if math.isnan(v) else float(v) for v in f1],
        "confusion_matrix": cm.tolist(),
        "n": int(len(y_true)),
    }


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample standard deviation (ddof=1; None for one value), n) of the non-None values."""
    xs = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not xs:
        return None, None, 0
    if len(xs) == 1:
        return xs[0], None, 1
    return float(np.mean(xs)), float(np.std(xs, ddof=1)), len(xs)
