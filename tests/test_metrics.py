"""Metric functions: agreement with scikit-learn and scipy, and hand-checked answers."""
import math
import time

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from stages.lib import metrics


def test_classification_metrics_match_scikit_learn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 10, size=500)
    y_pred = np.where(rng.random(500) < 0.6, y_true, rng.integers(0, 10, size=500))
    y_pred[y_pred == 7] = 3  # class 7 never predicted: zero_division matters
    result = metrics.classification_metrics(y_true, y_pred, 10)
    assert result["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(y_true, y_pred, labels=range(10), average=average, zero_division=0)
        got = [result[f"{name}_{average}"] for name in ("precision", "recall", "f1")]
        assert got == pytest.approx(expected[:3])
    _, recall, _, _ = precision_recall_fscore_support(y_true, y_pred, labels=range(10), average=None, zero_division=0)
    assert result["per_class_recall"] == pytest.approx(recall)
    assert result["confusion"] == confusion_matrix(y_true, y_pred, labels=range(10)).tolist()
    assert all(isinstance(result[k], float) for k in ("accuracy", "f1_macro", "precision_weighted"))


def test_classification_metrics_count_absent_classes():
    # Classes 2 and 3 never occur: they count as 0 in the macro averages, as in scikit-learn.
    y_true, y_pred = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    result = metrics.classification_metrics(y_true, y_pred, 4)
    expected = precision_recall_fscore_support(y_true, y_pred, labels=range(4), average="macro", zero_division=0)
    assert [result["precision_macro"], result["recall_macro"], result["f1_macro"]] == pytest.approx(expected[:3])
    assert result["confusion"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_classification_metrics_reject_bad_labels():
    with pytest.raises(ValueError, match="outside"):
        metrics.classification_metrics(np.array([0, 10]), np.array([0, 1]), 10)
    with pytest.raises(ValueError, match="items"):
        metrics.classification_metrics(np.array([0, 1]), np.array([0]), 10)


def test_best_and_convergence_epoch():
    curve = [0.30, 0.50, 0.695, 0.70, 0.68, 0.70]
    assert metrics.best_epoch(curve) == 4  # first of the tied maxima
    assert metrics.convergence_epoch(curve, 1.0) == 3  # 0.695 >= 0.70 - 0.01
    assert metrics.convergence_epoch(curve, 0.0) == 4
    assert metrics.convergence_epoch(curve, 25.0) == 2  # 0.50 >= 0.45
    assert metrics.convergence_epoch([0.5], 1.0) == 1
    assert metrics.convergence_epoch([0.60, 0.61], 1.0) == 1  # exactly 1 point below counts


def test_bootstrap_known_answers():
    a = np.random.default_rng(1).random(1000) < 0.5
    assert metrics.bootstrap_diff_ci(a, a, 500, 0.95, 0) == (0.0, 0.0)
    ones, zeros = np.ones(1000, bool), np.zeros(1000, bool)
    assert metrics.bootstrap_diff_ci(ones, zeros, 500, 0.95, 0) == (1.0, 1.0)
    assert metrics.bootstrap_diff_ci(zeros, ones, 500, 0.95, 0) == (-1.0, -1.0)


def test_bootstrap_interval_covers_the_difference_and_is_seeded():
    n = 10_000
    a = np.zeros(n, bool)
    b = np.zeros(n, bool)
    a[:6000], b[:5000] = True, True  # a 60%, b 50%, strongly paired: d is 1 on 10% of items
    start = time.perf_counter()
    low, high = metrics.bootstrap_diff_ci(a, b, 10_000, 0.95, seed=3)
    assert time.perf_counter() - start < 10
    assert low < 0.1 < high and high - low < 0.02
    # Binomial standard error of the mean of d: sqrt(0.1 * 0.9 / n) = 0.003, so the 95% width is ~0.0118.
    assert high - low == pytest.approx(2 * 1.96 * math.sqrt(0.09 / n), rel=0.1)
    assert metrics.bootstrap_diff_ci(a, b, 1000, 0.95, seed=3) == metrics.bootstrap_diff_ci(a, b, 1000, 0.95, seed=3)
    assert metrics.bootstrap_diff_ci(a, b, 1000, 0.95, seed=3) != metrics.bootstrap_diff_ci(a, b, 1000, 0.95, seed=4)


def _pairs(only_a, only_b, both=5, neither=5):
    """Paired correctness with the given discordant counts."""
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return np.array(a), np.array(b)


def test_mcnemar_known_answers():
    assert metrics.mcnemar_p(*_pairs(0, 0)) == 1.0
    assert metrics.mcnemar_p(*_pairs(10, 0)) == pytest.approx(2 * 0.5**10)  # exact, b + c = 10
    assert metrics.mcnemar_p(*_pairs(3, 3)) == pytest.approx(1.0)
    assert metrics.mcnemar_p(*_pairs(7, 2)) == pytest.approx(stats.binomtest(7, 9, 0.5).pvalue)
    # b + c = 24 is still exact; 25 switches to chi-square with continuity correction.
    assert metrics.mcnemar_p(*_pairs(16, 8)) == pytest.approx(stats.binomtest(16, 24, 0.5).pvalue)
    assert metrics.mcnemar_p(*_pairs(40, 20)) == pytest.approx(stats.chi2.sf((20 - 1) ** 2 / 60, 1))
    assert metrics.mcnemar_p(*_pairs(15, 10)) == pytest.approx(stats.chi2.sf(16 / 25, 1))
    assert metrics.mcnemar_p(*_pairs(20, 40)) == metrics.mcnemar_p(*_pairs(40, 20))  # symmetric


def test_label_efficiency_on_a_hand_made_grid():
    fractions, accuracy = [1.0, 0.5, 0.1], [0.80, 0.70, 0.50]  # any order
    # 0.75 lies halfway between 0.5 (0.70) and 1.0 (0.80) in accuracy -> halfway in log fraction.
    assert metrics.label_efficiency(fractions, accuracy, 0.75) == pytest.approx(math.sqrt(0.5))
    assert metrics.label_efficiency(fractions, accuracy, 0.60) == pytest.approx(math.sqrt(0.05))
    assert metrics.label_efficiency(fractions, accuracy, 0.70) == pytest.approx(0.5)
    assert metrics.label_efficiency(fractions, accuracy, 0.80) == pytest.approx(1.0)
    assert metrics.label_efficiency(fractions, accuracy, 0.81) is None  # more than the whole grid
    assert metrics.label_efficiency(fractions, accuracy, 0.45) == pytest.approx(0.1)  # already reached
