"""Pure metric functions on predictions and curves (numpy / scipy; no files, no plotting).

Accuracies are fractions in [0, 1] everywhere; "points" are percentage points (0.01 = 1 point).
"""
import math

import numpy as np
from scipy import stats

# Below this many discordant pairs McNemar's test uses the exact binomial distribution.
MCNEMAR_EXACT_BELOW = 25
# Bootstrap resamples are drawn in chunks of about this many indices, to bound memory.
BOOTSTRAP_CHUNK_ITEMS = 2_000_000


def _labels(y, num_classes, name):
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D integer array, got {y.dtype} {y.shape}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    return y.astype(np.int64)


def confusion_matrix(y_true, y_pred, num_classes):
    """(C, C) int64 counts; rows are the true class, columns the predicted class."""
    y_true = _labels(y_true, num_classes, "y_true")
    y_pred = _labels(y_pred, num_classes, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _ratio(numerator, denominator):
    """Element-wise numerator / denominator, 0 where the denominator is 0 (zero_division=0)."""
    numerator, denominator = np.asarray(numerator, float), np.asarray(denominator, float)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def classification_metrics(y_true, y_pred, num_classes):
    """Accuracy, macro and weighted precision/recall/F1, per-class recall and the confusion matrix.

    y_true, y_pred: int arrays (n,) with labels in 0..num_classes-1. Every class in
    range(num_classes) counts in the averages, also when absent; a ratio with a zero
    denominator is 0. This equals scikit-learn's precision_recall_fscore_support(...,
    labels=range(num_classes), zero_division=0), computed from the confusion matrix so it
    stays fast enough to call every epoch.
    Returns floats `accuracy`, `precision_macro`, `recall_macro`, `f1_macro`,
    `precision_weighted`, `recall_weighted`, `f1_weighted`, `per_class_recall` (list of C
    floats) and `confusion` (C x C list of ints, rows = true class).
    """
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    true_positive = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    precision = _ratio(true_positive, predicted)
    recall = _ratio(true_positive, support)
    f1 = _ratio(2 * true_positive, support + predicted)
    weights = _ratio(support, support.sum())
    result = {"accuracy": float(_ratio(true_positive.sum(), support.sum()))}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        result[f"{name}_macro"] = float(values.mean())
        result[f"{name}_weighted"] = float((values * weights).sum())
    result["per_class_recall"] = [float(r) for r in recall]
    result["confusion"] = confusion.tolist()
    return result


def _accuracies(val_accuracy):
    values = np.asarray(val_accuracy, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError("val_accuracy must be a non-empty sequence (one value per epoch)")
    return values


def best_epoch(val_accuracy):
    """1-based epoch of the highest validation accuracy (the first one on ties)."""
    return int(np.argmax(_accuracies(val_accuracy))) + 1


def convergence_epoch(val_accuracy, tolerance_points):
    """First 1-based epoch whose accuracy is within `tolerance_points` points of the best.

    val_accuracy: accuracies in [0, 1] for epochs 1..E. An epoch counts when
    accuracy >= best - tolerance_points / 100.
    """
    values = _accuracies(val_accuracy)
    threshold = values.max() - tolerance_points / 100 - 1e-12  # tolerate float rounding
    return int(np.argmax(values >= threshold)) + 1


def _paired(correct_a, correct_b):
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"correct_a and correct_b must be non-empty 1-D arrays of one length, got {a.shape}, {b.shape}")
    return a, b


def bootstrap_diff_ci(correct_a, correct_b, samples, confidence, seed):
    """Paired percentile bootstrap interval of mean(correct_a) - mean(correct_b).

    correct_a, correct_b: bool arrays (n,), item i of both answered by the same test image.
    Each of `samples` resamples draws n item indices with replacement, used for both arrays.
    Returns (low, high): the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles.
    """
    a, b = _paired(correct_a, correct_b)
    diff = a.astype(np.int8) - b.astype(np.int8)
    n = len(diff)
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CHUNK_ITEMS // n)
    sums = []
    for start in range(0, samples, chunk):
        indices = rng.integers(0, n, size=(min(chunk, samples - start), n))
        sums.append(diff[indices].sum(axis=1, dtype=np.int64))
    means = np.concatenate(sums) / n
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mcnemar_p(correct_a, correct_b):
    """Two-sided p-value of McNemar's test that a and b have the same accuracy.

    b = items only a got right, c = items only b got right. With b + c < 25 the exact
    binomial test (b of b + c at p = 0.5); otherwise chi-square with continuity
    correction, (|b - c| - 1)^2 / (b + c) on 1 degree of freedom. 1.0 when b + c == 0.
    """
    a, b_ = _paired(correct_a, correct_b)
    only_a, only_b = int((a & ~b_).sum()), int((~a & b_).sum())
    discordant = only_a + only_b
    if discordant == 0:
        return 1.0
    if discordant < MCNEMAR_EXACT_BELOW:
        return float(min(1.0, stats.binomtest(only_a, discordant, 0.5).pvalue))
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant
    return float(stats.chi2.sf(statistic, df=1))


def label_efficiency(fractions, baseline_acc, target_acc):
    """Label fraction the baseline would need to reach `target_acc`.

    fractions, baseline_acc: the baseline's grid (any order), accuracies in [0, 1].
    Between grid points accuracy is taken as linear in log(fraction); the first crossing
    counts. Returns the smallest fraction when the baseline already reaches the target
    there, None when the target is above every baseline accuracy on the grid.
    """
    if len(fractions) != len(baseline_acc) or not len(fractions):
        raise ValueError("fractions and baseline_acc must be non-empty and of one length")
    order = np.argsort(np.asarray(fractions, dtype=float))
    grid = np.asarray(fractions, dtype=float)[order]
    acc = np.asarray(baseline_acc, dtype=float)[order]
    if acc[0] >= target_acc:
        return float(grid[0])
    reached = np.flatnonzero(acc >= target_acc)
    if reached.size == 0:
        return None
    hi = int(reached[0])
    lo = hi - 1
    share = (target_acc - acc[lo]) / (acc[hi] - acc[lo])
    log_fraction = math.log(grid[lo]) + share * (math.log(grid[hi]) - math.log(grid[lo]))
    return float(math.exp(log_fraction))
