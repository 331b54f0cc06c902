"""The study's results: fine-tuned cells read back, summarised per mode and N, and SSL compared
with the baseline (seed-carrying paired bootstrap interval, per-seed McNemar, paired tests over
test images and across seeds with Holm's correction across N, convergence, label efficiency).

A cell is <finetune>/<mode>/<key>_s<seed>.{json,npz} plus <curves>/<mode>/<key>_s<seed>.csv.
"""
import csv
from pathlib import Path

import numpy as np

from stages.lib import metrics, plots
from stages.lib.cli import UserError, log
from stages.lib.io import load_npz, read_json

CELL_KEYS = ("mode", "fraction", "key", "seed", "labeled_images", "best_epoch", "epochs_run", "seconds", "device",
             "settings")
CURVE_COLUMNS = ("epoch", "train_loss", "val_accuracy", "lr")
# Summary values per cell: (name, source in the cell, decimals when rounded).
SCALARS = (
    ("accuracy", "accuracy", 4), ("precision", "precision_macro", 4), ("recall", "recall_macro", 4),
    ("f1", "f1_macro", 4), ("precision_weighted", "precision_weighted", 4),
    ("recall_weighted", "recall_weighted", 4), ("f1_weighted", "f1_weighted", 4),
    ("convergence_epoch", "convergence_epoch", 2), ("best_epoch", "best_epoch", 2),
    ("epochs_run", "epochs_run", 2), ("seconds", "seconds", 1),
)
# From this many paired seeds on, the paired t-test across seeds is run and is the primary test.
MIN_SEEDS_FOR_SEEDS_TEST = 3


def load_cells(finetune_dir, curves_dir, num_classes, tolerance):
    """Every fine-tuned cell as a dict: the JSON's fields, `y_true`/`y_pred` (n_test,),
    `curve` {column: float array over epochs}, `metrics` (test) and `convergence_epoch`."""
    paths = sorted(Path(finetune_dir).glob("*/*.json"))
    if not paths:
        raise UserError(f"no fine-tune results (<mode>/<key>_s<seed>.json) in {finetune_dir}; run: dvc repro finetune")
    cells = []
    for path in paths:
        cell = read_json(path, "fine-tune result")
        missing = [k for k in CELL_KEYS if not isinstance(cell, dict) or k not in cell]
        if missing:
            raise UserError(f"{path} lacks {', '.join(missing)}; rerun the fine-tune stage")
        if cell["mode"] != path.parent.name:
            raise UserError(f"{path} says mode {cell['mode']!r} but lies in {path.parent.name}/")
        if not isinstance(cell["fraction"], (int, float)) or not 0 < cell["fraction"] <= 1:
            raise UserError(f"{path}: fraction {cell['fraction']!r} must be a number in (0, 1]")
        cell["y_true"], cell["y_pred"] = read_predictions(path.with_suffix(".npz"))
        try:
            cell["metrics"] = metrics.classification_metrics(cell["y_true"], cell["y_pred"], num_classes)
        except ValueError as error:
            raise UserError(f"{path.with_suffix('.npz')}: {error}") from None
        curve_path = Path(curves_dir) / path.parent.name / f"{path.stem}.csv"
        cell["curve"] = read_curve(curve_path)
        cell["convergence_epoch"] = metrics.convergence_epoch(cell["curve"]["val_accuracy"], tolerance)
        cells.append(cell)
    log(f"evaluate: {len(cells)} cells from {finetune_dir}")
    return cells


def read_predictions(path):
    """(y_true, y_pred) int64 arrays (n_test,) of one cell."""
    y_true, y_pred = load_npz(path, ("y_true", "y_pred"), "test predictions", "rerun the fine-tune stage")
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or y_true.size == 0:
        raise UserError(f"{path}: y_true {y_true.shape} and y_pred {y_pred.shape} must be equal, non-empty 1-D arrays")
    return y_true.astype(np.int64), y_pred.astype(np.int64)


def read_curve(path):
    """{column: float array over epochs 1..E} of one cell's per-epoch CSV."""
    if not path.is_file():
        raise UserError(f"training curve not found: {path}; rerun the fine-tune stage")
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"{path} is not a CSV file ({error})") from None
    missing = [c for c in CURVE_COLUMNS if not rows or c not in rows[0]]
    if missing:
        raise UserError(f"{path} has no rows or lacks columns {', '.join(missing)}")
    try:
        return {column: np.array([float(row[column]) for row in rows]) for column in rows[0]}
    except (TypeError, ValueError) as error:
        raise UserError(f"{path} holds a non-numeric value ({error})") from None


def _groups(cells):
    """{(mode, key): [cells sorted by seed]}."""
    groups = {}
    for cell in sorted(cells, key=lambda c: c["seed"]):
        groups.setdefault((cell["mode"], cell["key"]), []).append(cell)
    return groups


def _value(cell, source):
    return cell["metrics"][source] if source in cell["metrics"] else cell[source]


def summarise(cells, classes):
    """summary {mode: {key: {fraction, seeds, settings, <scalar>[, <scalar>_std]}}} (mean over seeds,
    sample std when several; `settings`: the fine-tuning choices the cells ran with, the same for every
    seed, since a cell is reused only when its config matches) and per_class {mode: {key:
    {per_class_recall, confusion}}} pooled over seeds."""
    summary, per_class = {}, {}
    for (mode, key), group in _groups(cells).items():
        entry = {"fraction": group[0]["fraction"], "seeds": len(group), "labeled_images": group[0]["labeled_images"],
                 "settings": group[0]["settings"]}
        for name, source, digits in SCALARS:
            values = np.array([_value(c, source) for c in group], dtype=float)
            entry[name] = _rounded(values.mean(), digits, len(group))
            if len(group) > 1:
                entry[f"{name}_std"] = round(float(values.std(ddof=1)), max(digits, 2))
        summary.setdefault(mode, {})[key] = entry
        confusion = np.sum([c["metrics"]["confusion"] for c in group], axis=0)
        recall = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
        per_class.setdefault(mode, {})[key] = {
            "per_class_recall": {name: round(float(r), 4) for name, r in zip(classes, recall)},
            "confusion": confusion.tolist(),
        }
    return summary, per_class


def _rounded(value, digits, seeds):
    if seeds == 1 and digits < 4 and float(value).is_integer():
        return int(value)
    return round(float(value), digits)


def compare(cells, settings, seed):
    """{key: SSL vs baseline on the seeds both ran, "label_efficiency": {...}}, or {"note"}.
    `settings` is params' EvaluateParams; `seed` seeds the bootstrap.

    Per key (fraction) the entry of compare_pair, with each family of p-values (`p_images`,
    `p_seeds`) Holm-corrected across the compared fractions (`p_images_holm`, `p_seeds_holm`;
    metrics.holm). The primary test is the across-seeds one with MIN_SEEDS_FOR_SEEDS_TEST or more
    paired seeds, else the one over test images; `significant` is its Holm p (`p_primary_holm`)
    below 1 - confidence. p-values keep 4 significant digits.
    """
    groups = _groups(cells)
    keys = sorted({k for m, k in groups if m == "ssl" and ("baseline", k) in groups},
                  key=lambda k: -groups[("ssl", k)][0]["fraction"])
    raw = {}
    for key in keys:
        entry = compare_pair(groups[("baseline", key)], groups[("ssl", key)], settings, seed)
        if entry is not None:
            raw[key] = entry
    if not raw:
        return {"note": "No comparison: SSL and baseline fine-tuning results with a common fraction and seed are "
                        "both needed (set finetune.modes to include baseline and ssl)."}
    holm = {name: _holm_family(raw, name) for name in ("p_images", "p_seeds")}
    comparison = {key: _with_holm(entry, holm["p_images"][key], holm["p_seeds"][key], settings.confidence)
                  for key, entry in raw.items()}
    comparison["label_efficiency"] = efficiency(groups, [e["fraction"] for e in raw.values()])
    return comparison


def compare_pair(baseline, ssl, settings, seed):
    """Paired comparison of one fraction on the seeds both modes ran, test images matched.

    Accuracies are means over those seeds (fractions). The interval is the seed-carrying
    paired bootstrap (metrics.bootstrap_diff_ci on (seeds, test images) arrays), McNemar's
    test runs per seed, `p_images` is metrics.images_test, and `p_seeds` the paired t-test
    of per-seed accuracies (MIN_SEEDS_FOR_SEEDS_TEST or more seeds, else None). p-values are
    unrounded here; `convergence` is _convergence's. None when the modes share no seed.
    """
    by_seed = {c["seed"]: c for c in baseline}
    pairs = [(by_seed[c["seed"]], c) for c in ssl if c["seed"] in by_seed]
    if not pairs:
        log(f"evaluate: {ssl[0]['key']}: ssl and baseline share no seed, not compared")
        return None
    for b, s in pairs:
        if not (np.array_equal(b["y_true"], s["y_true"]) and np.array_equal(s["y_true"], pairs[0][1]["y_true"])):
            raise UserError(f"{s['key']} seed {s['seed']}: test labels differ between modes or seeds "
                            f"(test images not paired); rerun the fine-tune stages on one test set")
    correct_b = np.stack([b["y_pred"] == b["y_true"] for b, _ in pairs])  # (seeds, test images)
    correct_s = np.stack([s["y_pred"] == s["y_true"] for _, s in pairs])
    accuracy_b, accuracy_s = correct_b.mean(axis=1), correct_s.mean(axis=1)  # (seeds,)
    low, high = metrics.bootstrap_diff_ci(correct_s, correct_b, settings.bootstrap_samples,
                                          settings.confidence, seed)
    p_images, images_test = metrics.images_test(correct_s, correct_b)
    across_seeds = len(pairs) >= MIN_SEEDS_FOR_SEEDS_TEST
    base, ours = float(accuracy_b.mean()), float(accuracy_s.mean())
    return {
        "fraction": ssl[0]["fraction"], "seeds": len(pairs), "test_images": int(correct_s.shape[1]),
        "baseline_accuracy": round(base, 4), "ssl_accuracy": round(ours, 4),
        "difference": round(ours - base, 4), "relative": round((ours - base) / base, 4) if base > 0 else None,
        "ci_low": round(low, 4), "ci_high": round(high, 4), "confidence": settings.confidence,
        "mcnemar_p_per_seed": {str(s["seed"]): _p(metrics.mcnemar_p(cs, cb))
                               for (_, s), cs, cb in zip(pairs, correct_s, correct_b)},
        "images_test": images_test, "p_images": p_images,
        "seeds_test": metrics.SEEDS_TEST if across_seeds else None,
        "p_seeds": metrics.t_test_p(accuracy_s - accuracy_b) if across_seeds else None,
        "convergence": _convergence(pairs, settings.convergence_tolerance),
    }


def _p(value):
    """A p-value with 4 significant digits (None stays None)."""
    return None if value is None else float(f"{value:.4g}")


def _holm_family(entries, name):
    """{key: Holm-adjusted entries[key][name]} across the keys that have that p-value (else None)."""
    keys = [k for k, e in entries.items() if e[name] is not None]
    adjusted = dict(zip(keys, metrics.holm([entries[k][name] for k in keys])))
    return {k: adjusted.get(k) for k in entries}


def _with_holm(entry, p_images_holm, p_seeds_holm, confidence):
    """compare_pair's entry with rounded p-values, the Holm-adjusted ones, the primary test and `significant`."""
    primary = "seeds" if entry["p_seeds"] is not None else "images"
    p_primary = p_seeds_holm if primary == "seeds" else p_images_holm
    tests = {"images_test": entry["images_test"], "p_images": _p(entry["p_images"]),
             "p_images_holm": _p(p_images_holm), "seeds_test": entry["seeds_test"], "p_seeds": _p(entry["p_seeds"]),
             "p_seeds_holm": _p(p_seeds_holm), "primary_test": primary, "p_primary_holm": _p(p_primary),
             "significant": bool(p_primary < 1 - confidence)}
    head = {k: v for k, v in entry.items() if k not in tests and k != "convergence"}
    return {**head, **tests, "convergence": entry["convergence"]}


def _convergence(pairs, tolerance):
    """Epochs to convergence of one fraction, both definitions, means over the paired seeds.

    pairs: [(baseline cell, ssl cell)] of one seed each; tolerance in points. `threshold` is
    the mean over seeds of each seed's common threshold, min(best validation accuracy of the
    two modes) - tolerance (an accuracy); `<mode>_epochs` the epochs that mode needs to reach
    it (metrics.common_convergence, per seed, then averaged); `<mode>_epochs_own_best` the
    per-cell definition (within tolerance of the cell's own best; metrics.convergence_epoch).
    """
    common = np.array([metrics.common_convergence(b["curve"]["val_accuracy"], s["curve"]["val_accuracy"], tolerance)
                       for b, s in pairs])  # (seeds, 3): threshold, baseline epochs, ssl epochs
    own = np.array([[b["convergence_epoch"], s["convergence_epoch"]] for b, s in pairs])  # (seeds, 2)
    seeds = len(pairs)
    return {"tolerance_points": tolerance, "threshold": round(float(common[:, 0].mean()), 4),
            "baseline_epochs": _rounded(common[:, 1].mean(), 2, seeds),
            "ssl_epochs": _rounded(common[:, 2].mean(), 2, seeds),
            "baseline_epochs_own_best": _rounded(own[:, 0].mean(), 2, seeds),
            "ssl_epochs_own_best": _rounded(own[:, 1].mean(), 2, seeds)}


def _mean_accuracy(group):
    return float(np.mean([c["metrics"]["accuracy"] for c in group]))


def efficiency(groups, fractions):
    """How many labels the baseline needs to match SSL at the smallest compared fraction."""
    ssl_fraction = min(fractions)
    ssl_group = next(g for (m, _), g in groups.items() if m == "ssl" and g[0]["fraction"] == ssl_fraction)
    target = _mean_accuracy(ssl_group)
    grid = sorted((g[0]["fraction"], _mean_accuracy(g)) for (m, _), g in groups.items() if m == "baseline")
    needed = metrics.label_efficiency([f for f, _ in grid], [a for _, a in grid], target)
    at = f"SSL's {100 * target:.1f}% test accuracy with {plots.n_label(ssl_fraction)} of the labels"
    if needed is None:
        note = (f"The baseline does not reach {at} anywhere on its grid (up to {plots.n_label(grid[-1][0])}): "
                f"it would need more than the whole grid of labels.")
    elif grid[0][1] >= target:
        note = (f"The baseline already reaches {at} with its smallest fraction, {plots.n_label(grid[0][0])} "
                f"({100 * grid[0][1]:.1f}%): SSL saves no labels there.")
    else:
        note = (f"To match {at}, the baseline would need about {plots.n_label(round(needed, 4))} "
                f"({needed / ssl_fraction:.1f} times as many labels; accuracy interpolated linearly in "
                f"log(fraction) between the baseline's grid points).")
    return {"ssl_fraction": ssl_fraction, "ssl_accuracy": round(target, 4),
            "baseline_fraction_needed": None if needed is None else round(needed, 4), "note": note}

