"""Metric functions: agreement with scikit-learn and scipy, and hand-checked answers."""
import math
import time

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

from stages.lib import metrics
from tests.conftest import paired_correct


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


def test_epochs_to_reach_and_common_convergence_on_hand_made_curves():
    assert metrics.epochs_to_reach([0.2, 0.5, 0.7], 0.5) == 2
    assert metrics.epochs_to_reach([0.2, 0.5, 0.7], 0.71) is None
    # A learns fast and plateaus at 0.60; B starts slowly and ends higher, at 0.80. Against its own
    # best each "converges" late (epoch 3 vs 6); against the common threshold 0.60 - 0.01 = 0.59,
    # A needs 2 epochs and B 4: A learns faster up to the level both reach.
    a = [0.50, 0.595, 0.60, 0.60, 0.60, 0.60]
    b = [0.20, 0.40, 0.55, 0.65, 0.75, 0.80]
    assert (metrics.convergence_epoch(a, 1.0), metrics.convergence_epoch(b, 1.0)) == (2, 6)
    threshold, epochs_a, epochs_b = metrics.common_convergence(a, b, 1.0)
    assert threshold == pytest.approx(0.59) and (epochs_a, epochs_b) == (2, 4)
    assert metrics.common_convergence(b, a, 1.0)[1:] == (4, 2)  # symmetric
    assert metrics.common_convergence(a, [0.7, 0.9], 0.0)[1:] == (3, 1)  # lengths may differ


def test_holm_hand_worked():
    # Sorted 0.01, 0.03, 0.04 -> x3, x2, x1 = 0.03, 0.06, 0.04 -> running max 0.03, 0.06, 0.06.
    assert metrics.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert metrics.holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert metrics.holm([0.02]) == pytest.approx([0.02]) and metrics.holm([]) == []
    assert metrics.holm([0.01, 0.01, 0.2]) == pytest.approx([0.03, 0.03, 0.2])  # ties
    with pytest.raises(ValueError, match="0, 1"):
        metrics.holm([0.1, 1.5])


def test_seed_carrying_bootstrap_known_answers():
    n = 400
    # Seed 0: a right, b wrong on every image; seed 1: both right. d_i = (1 + 0) / 2 = 0.5 everywhere.
    a = np.ones((2, n), bool)
    b = np.stack([np.zeros(n, bool), np.ones(n, bool)])
    assert metrics.bootstrap_diff_ci(a, b, 300, 0.95, 0) == (0.5, 0.5)
    one_a, one_b = np.random.default_rng(5).random((2, n)) < 0.6
    # One seed as (1, n) is the classic paired bootstrap of (n,).
    assert metrics.bootstrap_diff_ci(one_a[None], one_b[None], 500, 0.9, 7) == metrics.bootstrap_diff_ci(
        one_a, one_b, 500, 0.9, 7)


def test_seed_carrying_bootstrap_is_wider_than_pooling_correlated_seeds():
    # Three seeds that answer every image alike: they add no information about the test images,
    # so the interval is the one-seed interval; pooling them as 3n images shrinks it by ~sqrt(3).
    n = 2000
    rng = np.random.default_rng(2)
    one_a, one_b = rng.random(n) < 0.7, rng.random(n) < 0.6
    a, b = np.tile(one_a, (3, 1)), np.tile(one_b, (3, 1))
    low, high = metrics.bootstrap_diff_ci(a, b, 2000, 0.95, 0)
    assert (low, high) == pytest.approx(metrics.bootstrap_diff_ci(one_a, one_b, 2000, 0.95, 0))
    pooled_low, pooled_high = metrics.bootstrap_diff_ci(a.ravel(), b.ravel(), 2000, 0.95, 0)
    assert (high - low) / (pooled_high - pooled_low) == pytest.approx(math.sqrt(3), rel=0.1)


def test_t_test_against_scipy_and_by_hand():
    d = np.array([0.3, -0.1, 0.5, 0.2, 0.0, 0.4])
    assert metrics.t_test_p(d) == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    # Per-seed accuracies matched by seed: d = (5, 4, 7) points, mean 16/3, sd sqrt(7/3), so
    # t = 16 / sqrt(7); with 2 degrees of freedom the two-sided p is 1 - t / sqrt(t^2 + 2) = 1 - 16 / sqrt(270).
    base, ssl = np.array([0.50, 0.52, 0.51]), np.array([0.55, 0.56, 0.58])
    assert metrics.t_test_p(ssl - base) == pytest.approx(1 - 16 / math.sqrt(270))
    assert metrics.t_test_p(ssl - base) == pytest.approx(stats.ttest_rel(ssl, base).pvalue)
    assert metrics.t_test_p([0, 0, 0]) == 1.0 and metrics.t_test_p([2, 2]) == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        metrics.t_test_p([0.1])


def test_images_test_one_seed_is_mcnemar_several_a_t_test_of_d():
    a, b = paired_correct(9, 2)
    assert metrics.images_test(a, b) == (metrics.mcnemar_p(a, b), "McNemar")
    assert metrics.images_test(a[None], b[None]) == (metrics.mcnemar_p(a, b), "McNemar")
    # Two seeds on 8 images: d_i = mean over seeds of a - b.
    a2 = np.array([[1, 1, 1, 0, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1, 1, 0]], bool)
    b2 = np.array([[0, 1, 0, 0, 1, 0, 0, 1], [1, 0, 0, 1, 0, 1, 0, 1]], bool)
    d = np.array([0.5, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, -0.5])
    assert np.array_equal(a2.astype(int).mean(0) - b2.astype(int).mean(0), d)
    p, name = metrics.images_test(a2, b2)
    assert p == pytest.approx(stats.ttest_1samp(d, 0).pvalue) and name == metrics.IMAGES_TEST


def test_mcnemar_known_answers():
    assert metrics.mcnemar_p(*paired_correct(0, 0)) == 1.0
    assert metrics.mcnemar_p(*paired_correct(10, 0)) == pytest.approx(2 * 0.5**10)  # exact, b + c = 10
    assert metrics.mcnemar_p(*paired_correct(3, 3)) == pytest.approx(1.0)
    assert metrics.mcnemar_p(*paired_correct(7, 2)) == pytest.approx(stats.binomtest(7, 9, 0.5).pvalue)
    # b + c = 24 is still exact; 25 switches to chi-square with continuity correction.
    assert metrics.mcnemar_p(*paired_correct(16, 8)) == pytest.approx(stats.binomtest(16, 24, 0.5).pvalue)
    assert metrics.mcnemar_p(*paired_correct(40, 20)) == pytest.approx(stats.chi2.sf((20 - 1) ** 2 / 60, 1))
    assert metrics.mcnemar_p(*paired_correct(15, 10)) == pytest.approx(stats.chi2.sf(16 / 25, 1))
    assert metrics.mcnemar_p(*paired_correct(20, 40)) == metrics.mcnemar_p(*paired_correct(40, 20))  # symmetric


def test_label_efficiency_on_a_hand_made_grid():
    fractions, accuracy = [1.0, 0.5, 0.1], [0.80, 0.70, 0.50]  # any order
    # 0.75 lies halfway between 0.5 (0.70) and 1.0 (0.80) in accuracy -> halfway in log fraction.
    assert metrics.label_efficiency(fractions, accuracy, 0.75) == pytest.approx(math.sqrt(0.5))
    assert metrics.label_efficiency(fractions, accuracy, 0.60) == pytest.approx(math.sqrt(0.05))
    assert metrics.label_efficiency(fractions, accuracy, 0.70) == pytest.approx(0.5)
    assert metrics.label_efficiency(fractions, accuracy, 0.80) == pytest.approx(1.0)
    assert metrics.label_efficiency(fractions, accuracy, 0.81) is None  # more than the whole grid
    assert metrics.label_efficiency(fractions, accuracy, 0.45) == pytest.approx(0.1)  # already reached
