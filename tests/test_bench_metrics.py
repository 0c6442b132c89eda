"""benchmarks/metrics.py against small cases computed by hand (and scikit-learn where it agrees)."""

import math

import numpy as np
import pytest

from benchmarks.metrics import (
    accuracy,
    auroc,
    binary_auroc,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    mean_std,
)


def test_macro_f1_and_accuracy_by_hand():
    y_true = [0, 0, 1, 1, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0]
    # class 0: TP 1, FP 1, FN 1 -> 2/4;  class 1: TP 2, FP 1, FN 0 -> 4/5;  class 2: TP 1, FN 1 -> 2/3
    assert macro_f1(y_true, y_pred, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert accuracy(y_true, y_pred) == pytest.approx(4 / 6)
    assert confusion_matrix(y_true, y_pred, 3).tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]


def test_macro_f1_leaves_out_classes_absent_from_truth_and_predictions():
    # class 2 never occurs: averaging over 0 and 1 only (sklearn / torchmetrics do the same)
    assert macro_f1([0, 0, 1], [0, 1, 1], num_classes=3) == pytest.approx(2 / 3)
    # a class that is predicted but never true counts, with F1 0
    assert macro_f1([0, 0], [0, 1], num_classes=2) == pytest.approx((2 / 3 + 0) / 2)


def test_macro_f1_matches_sklearn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    y_true, y_pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    assert macro_f1(y_true, y_pred, 4) == pytest.approx(f1_score(y_true, y_pred, average="macro"))


def test_binary_auroc_by_hand_with_ties():
    assert binary_auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(3 / 4)
    # pos 0.5 vs neg 0.5 is a tie: half a pair
    assert binary_auroc([0, 0, 1, 1], [0.2, 0.5, 0.5, 0.9]) == pytest.approx((1 + 0.5 + 2) / 4)
    assert binary_auroc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert binary_auroc([1, 1], [0.2, 0.3]) is None  # no negatives: undefined


def test_auroc_binary_uses_the_positive_class_column():
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.65, 0.35], [0.2, 0.8]])
    assert auroc([0, 0, 1, 1], probs) == pytest.approx(3 / 4)


def test_auroc_macro_one_vs_rest_by_hand():
    y = [0, 1, 2, 2]
    probs = np.array([[.6, .3, .1], [.2, .5, .3], [.1, .2, .7], [.3, .4, .3]])
    # class 0: 1.0; class 1: 1.0; class 2: positives .7 .3 vs negatives .1 .3 -> (2 + 1 + .5) / 4
    assert auroc(y, probs) == pytest.approx((1 + 1 + 0.875) / 3)
    from sklearn.metrics import roc_auc_score

    assert auroc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


def test_auroc_skips_classes_without_positives_and_is_none_when_nothing_is_defined():
    probs = np.array([[.7, .2, .1], [.2, .7, .1], [.6, .3, .1]])
    assert auroc([0, 1, 0], probs) == pytest.approx(1.0)  # class 2 absent: left out
    assert auroc([0, 0, 0], probs) is None


def test_classification_metrics_bundle():
    probs = np.array([[.8, .2], [.3, .7], [.6, .4], [.1, .9]])
    m = classification_metrics([0, 1, 1, 1], probs)
    assert m["accuracy"] == pytest.approx(3 / 4)
    assert m["confusion_matrix"] == [[1, 0], [1, 2]]
    assert m["per_class_f1"] == pytest.approx([2 / 3, 0.8])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    assert m["auroc"] == pytest.approx(1.0)
    assert m["n"] == 4


def test_mean_std_uses_the_sample_std_and_ignores_missing_values():
    mean, std, n = mean_std([0.5, 0.7, None])
    assert (mean, n) == (pytest.approx(0.6), 2)
    assert std == pytest.approx(math.sqrt(0.02))  # ((.1)² + (.1)²) / (2 - 1)
    assert mean_std([0.4]) == (0.4, None, 1)
    assert mean_std([None, float("nan")]) == (None, None, 0)
