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
# Names of the paired tests over test images (images_test) and across seeds, as reported.
IMAGES_TEST_ONE_SEED = "McNemar"
IMAGES_TEST = "one-sample t-test of d_i over test images"
SEEDS_TEST = "paired t-test of per-seed accuracies"


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


def epochs_to_reach(val_accuracy, threshold):
    """First 1-based epoch whose validation accuracy reaches `threshold`, or None if none does.

    val_accuracy: accuracies in [0, 1] for epochs 1..E; threshold: an accuracy in [0, 1].
    An epoch counts when accuracy >= threshold (within 1e-12, to tolerate float rounding).
    """
    values = _accuracies(val_accuracy)
    reached = np.flatnonzero(values >= threshold - 1e-12)
    return int(reached[0]) + 1 if reached.size else None


def convergence_epoch(val_accuracy, tolerance_points):
    """First 1-based epoch whose accuracy is within `tolerance_points` points of the curve's own best.

    val_accuracy: accuracies in [0, 1] for epochs 1..E. An epoch counts when
    accuracy >= best - tolerance_points / 100.
    """
    values = _accuracies(val_accuracy)
    return epochs_to_reach(values, values.max() - tolerance_points / 100)


def common_convergence(val_accuracy_a, val_accuracy_b, tolerance_points):
    """Epochs two curves need to reach one common threshold: (threshold, epochs_a, epochs_b).

    val_accuracy_a, val_accuracy_b: accuracies in [0, 1] per epoch (lengths may differ).
    threshold = min(best of a, best of b) - tolerance_points / 100, an accuracy (fraction);
    epochs_a, epochs_b: the first 1-based epochs at or above it (both curves reach it, as
    it lies at or below each curve's best).
    """
    a, b = _accuracies(val_accuracy_a), _accuracies(val_accuracy_b)
    threshold = min(a.max(), b.max()) - tolerance_points / 100
    return float(threshold), epochs_to_reach(a, threshold), epochs_to_reach(b, threshold)


def _paired(correct_a, correct_b, seeds_axis=False):
    """Bool arrays of one shape: (n,), or with seeds_axis (S, n) returned as (S, n) ((n,) as (1, n))."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    shape = "(n,) or (seeds, n)" if seeds_axis else "(n,)"
    if a.ndim not in ((1, 2) if seeds_axis else (1,)) or a.shape != b.shape or a.size == 0:
        raise ValueError(f"correct_a and correct_b must be non-empty arrays {shape} of one shape, "
                         f"got {a.shape}, {b.shape}")
    return (np.atleast_2d(a), np.atleast_2d(b)) if seeds_axis else (a, b)


def _seed_sums(correct_a, correct_b):
    """(S, n) int32 sums over seeds of a - b per test image: S * d_i, with S the number of seeds."""
    a, b = _paired(correct_a, correct_b, seeds_axis=True)
    return (a.astype(np.int32) - b.astype(np.int32)).sum(axis=0), len(a)


def bootstrap_diff_ci(correct_a, correct_b, samples, confidence, seed):
    """Paired percentile bootstrap interval of the mean-over-seeds accuracy difference a - b.

    correct_a, correct_b: bool arrays (S, n) (seeds x test images; (n,) is one seed), item
    [s, i] of both answered on test image i by the models of seed s. Per image,
    d_i = mean over seeds of (a[s, i] - b[s, i]) in [-1, 1]. Each of `samples` resamples
    draws n image indices with replacement and carries every seed's answers for them (the
    seeds are not independent test images); the statistic is mean(d) over the resample.
    With one seed this is the classic paired bootstrap of mean(a) - mean(b).
    Returns (low, high), accuracy differences in [-1, 1]: the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles.
    """
    sums, seeds = _seed_sums(correct_a, correct_b)
    n = len(sums)
    rng = np.random.default_rng(seed)
    chunk = max(1, BOOTSTRAP_CHUNK_ITEMS // n)
    totals = []
    for start in range(0, samples, chunk):
        indices = rng.integers(0, n, size=(min(chunk, samples - start), n))
        totals.append(sums[indices].sum(axis=1, dtype=np.int64))
    means = np.concatenate(totals) / (n * seeds)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def mcnemar_p(correct_a, correct_b):
    """Two-sided p-value of McNemar's test that a and b have the same accuracy.

    correct_a, correct_b: bool arrays (n,), one model each, item i answered on test image i
    (one seed: never pool seeds here, their answers on one image are not independent).
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


def t_test_p(differences):
    """Two-sided p-value of the one-sample t-test that the mean of `differences` is 0.

    differences: (k,) numbers, k >= 2, any unit (the test is scale-free); paired data give
    the paired t-test. t = mean / (sd / sqrt(k)) with the sample sd (ddof 1), on k - 1
    degrees of freedom. When every difference is equal (sd 0): 1.0 if they are 0, else 0.0.
    """
    d = np.asarray(differences, dtype=float)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"a t-test needs a 1-D array of at least 2 differences, got shape {d.shape}")
    sd = d.std(ddof=1)
    if sd == 0:
        return 1.0 if d[0] == 0 else 0.0
    t = d.mean() / (sd / math.sqrt(d.size))
    return float(2 * stats.t.sf(abs(t), d.size - 1))


def images_test(correct_a, correct_b):
    """Paired test over test images that a and b have the same mean-over-seeds accuracy.

    correct_a, correct_b: bool arrays (S, n) (seeds x test images; (n,) is one seed).
    One seed: McNemar's test (mcnemar_p). Several: the two-sided one-sample t-test
    (t_test_p) of d_i against 0, with d_i the mean over seeds of a[s, i] - b[s, i] on
    image i, n - 1 degrees of freedom. Returns (p-value, name of the test).
    """
    a, b = _paired(correct_a, correct_b, seeds_axis=True)
    if len(a) == 1:
        return mcnemar_p(a[0], b[0]), IMAGES_TEST_ONE_SEED
    return t_test_p(_seed_sums(a, b)[0]), IMAGES_TEST


def holm(p_values):
    """Holm's step-down adjustment of m p-values for multiple comparisons (family-wise error).

    p_values: sequence of m p-values in [0, 1]. The j-th smallest (j = 1..m) is multiplied
    by m - j + 1; a running maximum in that order keeps the adjusted values monotone; they
    are capped at 1. Returns a list of m adjusted p-values in the input order.
    """
    p = np.asarray(p_values, dtype=float)
    if p.ndim != 1 or np.any(np.isnan(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError(f"p_values must be a 1-D sequence of numbers in [0, 1], got {p_values!r}")
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty(len(p))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted.tolist()


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
