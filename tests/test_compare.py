"""study.compare on hand-made cells: seed-carrying statistics, Holm across N, both convergence definitions."""
import math

import numpy as np
import pytest
from scipy import stats

from stages.lib import metrics, study
from stages.lib.params import EvaluateParams
from stages.lib.splits import fraction_key
from tests.conftest import paired_correct

SETTINGS = EvaluateParams(convergence_tolerance=1.0, bootstrap_samples=300, confidence=0.95)



def make_cell(mode, fraction, seed, correct, val_accuracy=(0.5, 0.6)):
    """A fine-tuned cell as study.load_cells makes it: correct is a bool sequence over the test images."""
    correct = np.asarray(correct, bool)
    y_true = np.zeros(len(correct), np.int64)
    y_pred = np.where(correct, 0, 1).astype(np.int64)
    return {"mode": mode, "fraction": fraction, "key": fraction_key(fraction), "seed": seed,
            "y_true": y_true, "y_pred": y_pred, "metrics": metrics.classification_metrics(y_true, y_pred, 2),
            "curve": {"val_accuracy": np.asarray(val_accuracy, float)},
            "convergence_epoch": metrics.convergence_epoch(val_accuracy, SETTINGS.convergence_tolerance)}


def test_one_seed_uses_mcnemar_and_holm_across_n():
    # Raw McNemar p-values 0.0215, 0.0391, 0.0391 are each below 0.05, but Holm-corrected across the
    # three N they are 3 x 0.0215 = 0.0645 and max(0.0645, 2 x 0.0391) = 0.0781: none is significant.
    counts = {1.0: (9, 1), 0.5: (8, 1), 0.1: (8, 1)}
    cells = []
    for fraction, (only_ssl, only_base) in counts.items():
        ssl, base = paired_correct(only_ssl, only_base)
        cells += [make_cell("ssl", fraction, 0, ssl), make_cell("baseline", fraction, 0, base)]
    comparison = study.compare(cells, SETTINGS, 0)
    raw = [stats.binomtest(9, 10).pvalue, stats.binomtest(8, 9).pvalue, stats.binomtest(8, 9).pvalue]
    assert raw[0] == pytest.approx(0.02148, abs=1e-5) and raw[1] == pytest.approx(0.03906, abs=1e-5)
    for key, p, adjusted in zip(("n100", "n50", "n10"), raw, (3 * raw[0], 2 * raw[1], 2 * raw[1])):
        entry = comparison[key]
        assert entry["images_test"] == "McNemar" and entry["primary_test"] == "images"
        assert entry["mcnemar_p_per_seed"] == {"0": pytest.approx(p, rel=1e-3)}
        assert entry["p_images"] == pytest.approx(p, rel=1e-3)
        assert entry["p_images_holm"] == pytest.approx(adjusted, rel=1e-3) == entry["p_primary_holm"]
        assert entry["p_seeds"] is None and entry["p_seeds_holm"] is None and entry["seeds_test"] is None
        assert entry["significant"] is False and entry["seeds"] == 1
        assert entry["test_images"] == sum(counts[entry["fraction"]]) + 10
    # Alone, the first fraction is significant: Holm over one p-value leaves it as it is.
    alone = study.compare([c for c in cells if c["fraction"] == 1.0], SETTINGS, 0)["n100"]
    assert alone["p_images_holm"] == alone["p_images"] and alone["significant"] is True


def seeded_cells(fraction, accuracies_ssl, accuracies_base, n=100):
    """One cell per seed and mode whose test accuracy is exactly the given fraction of n images."""
    cells = []
    for seed, (acc_s, acc_b) in enumerate(zip(accuracies_ssl, accuracies_base)):
        cells.append(make_cell("ssl", fraction, seed, np.arange(n) < round(acc_s * n)))
        cells.append(make_cell("baseline", fraction, seed, np.arange(n) < round(acc_b * n)))
    return cells


def test_three_seeds_make_the_paired_t_test_across_seeds_primary():
    # Per-seed differences 5, 4, 7 points: paired t-test p = 1 - 16 / sqrt(270) (see test_metrics).
    cells = seeded_cells(0.5, (0.55, 0.56, 0.58), (0.50, 0.52, 0.51))
    entry = study.compare(cells, SETTINGS, 0)["n50"]
    expected = 1 - 16 / math.sqrt(270)
    assert entry["seeds"] == 3 and entry["primary_test"] == "seeds" and entry["seeds_test"] == metrics.SEEDS_TEST
    assert entry["p_seeds"] == pytest.approx(expected, rel=1e-3) == entry["p_seeds_holm"] == entry["p_primary_holm"]
    assert entry["significant"] is True
    assert entry["difference"] == pytest.approx(16 / 300, abs=1e-4)
    assert entry["baseline_accuracy"] == pytest.approx(0.51)
    assert entry["ssl_accuracy"] == pytest.approx(0.5633, abs=1e-4)
    # Per seed McNemar: SSL right on 5, 4, 7 images more and never worse (exact binomial).
    assert entry["mcnemar_p_per_seed"] == {str(s): pytest.approx(2 * 0.5**k, rel=1e-3) for s, k in enumerate((5, 4, 7))}
    # Over test images: a t-test against 0 of d_i, the mean over seeds of SSL correct - baseline correct.
    d = np.mean([(np.arange(100) < a).astype(int) - (np.arange(100) < b) for a, b in ((55, 50), (56, 52), (58, 51))], 0)
    assert entry["images_test"] == metrics.IMAGES_TEST
    assert entry["p_images"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue, rel=1e-3)


def test_seed_count_decides_the_primary_test_per_n_and_holm_per_family():
    cells = seeded_cells(1.0, (0.55, 0.56, 0.58), (0.50, 0.52, 0.51)) + seeded_cells(0.1, (0.6, 0.7), (0.5, 0.5))
    comparison = study.compare(cells, SETTINGS, 0)
    many, two = comparison["n100"], comparison["n10"]
    assert many["primary_test"] == "seeds" and two["primary_test"] == "images" and two["p_seeds"] is None
    assert many["p_seeds_holm"] == many["p_seeds"]  # the only member of its family
    raw = [many["p_images"], two["p_images"]]
    assert [many["p_images_holm"], two["p_images_holm"]] == pytest.approx(metrics.holm(raw), rel=1e-3)
    assert two["p_primary_holm"] == two["p_images_holm"]


def test_mismatched_test_labels_across_seeds_are_refused():
    cells = seeded_cells(1.0, (0.6, 0.7), (0.5, 0.5))
    cells[2]["y_true"] = cells[2]["y_true"] + 1
    cells[3]["y_true"] = cells[3]["y_true"] + 1
    with pytest.raises(study.UserError, match="seed 1: test labels differ"):
        study.compare(cells, SETTINGS, 0)


def test_convergence_compares_the_modes_on_a_common_threshold():
    # Baseline plateaus early at 0.60; SSL starts slowly and ends at 0.80 (seed 0). Seed 1 is the
    # same with both curves 0.1 higher. Common threshold per seed: 0.59, 0.69 (mean 0.64);
    # baseline needs 2 epochs, SSL 4, on both seeds; own-best epochs are 2 and 6.
    base = np.array([0.50, 0.595, 0.60, 0.60, 0.60, 0.60])
    ssl = np.array([0.20, 0.40, 0.55, 0.65, 0.75, 0.80])
    cells = []
    for seed in (0, 1):
        correct = np.arange(10) < 5
        cells.append(make_cell("baseline", 0.5, seed, correct, base + 0.1 * seed))
        cells.append(make_cell("ssl", 0.5, seed, correct, ssl + 0.1 * seed))
    convergence = study.compare(cells, SETTINGS, 0)["n50"]["convergence"]
    assert convergence == {"tolerance_points": 1.0, "threshold": pytest.approx(0.64), "baseline_epochs": 2,
                           "ssl_epochs": 4, "baseline_epochs_own_best": 2, "ssl_epochs_own_best": 6}
