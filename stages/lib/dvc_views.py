"""What DVC shows of the study: the headline metrics (`dvc metrics show`, `dvc exp show`) and the
CSV files that `dvc plots show` and `dvc plots diff` draw (dvc.yaml; templates in .dvc/plots/).

Headline files hold a few numbers each, so that `dvc metrics show` prints one short row per file
(its columns sorted by name, hence these names):
  <key>.json  per label fraction N: {accuracy: {<mode>}, f1: {<mode>} (macro), gain: {accuracy,
              ci_lower, ci_upper, log10_p}}; accuracies are fractions of the test images, the gain is
              SSL - baseline accuracy with its bootstrap interval (comparison.json's ci_low, ci_high)
              and log10_p the log10 of its primary test's Holm-corrected p (DVC would round 3.5e-27 to 0);
              gain only at an N where ssl and baseline were compared (both ran, on shared seeds)
  study.json  {knn_accuracy, seconds}: SimCLR's final kNN accuracy, and the training seconds of the
              study (SimCLR and every fine-tuning cell)
Plot files hold percentages and percentage points (columns *_percent, *_points), never an empty cell:
test_accuracy.csv one row per cell (mode, N, seed; the plots show the seeds' spread), val_accuracy.csv one
per cell and epoch, ssl_gain.csv one row per compared N with its interval, Holm-corrected p and number of
seeds (no file where nothing was compared).
"""
import math

from stages.lib.plots import compared, mode_order, n_label


def headline(summary, comparison, cells, pretrain=None):
    """{file name: numbers}: summary and comparison as study.summarise / study.compare give them,
    cells as study.load_cells, pretrain the SimCLR metrics (or None when pretraining did not run)."""
    files = {}
    for mode in mode_order(list(summary)):
        for key, entry in summary[mode].items():
            numbers = files.setdefault(f"{key}.json", {"accuracy": {}, "f1": {}})
            numbers["accuracy"][mode], numbers["f1"][mode] = entry["accuracy"], entry["f1"]
    for key, entry in compared(comparison):
        p = max(entry["p_primary_holm"], 1e-300)  # a p that underflowed to 0 stays finite
        files[f"{key}.json"]["gain"] = {"accuracy": entry["difference"], "ci_lower": entry["ci_low"],
                                        "ci_upper": entry["ci_high"], "log10_p": round(math.log10(p), 2)}
    seconds = sum(cell["seconds"] for cell in cells)
    study = {}
    if pretrain:
        study["knn_accuracy"] = pretrain["knn_accuracy"]
        seconds += pretrain["seconds"]
    files["study.json"] = {**study, "seconds": round(seconds, 1)}
    return files


def _ordered(cells):
    modes = mode_order({c["mode"] for c in cells})
    return sorted(cells, key=lambda c: (-c["fraction"], modes.index(c["mode"]), c["seed"]))


def _cell_columns(cell):
    return {"N": n_label(cell["fraction"]), "fraction": cell["fraction"], "mode": cell["mode"],
            "seed": cell["seed"]}


def curve_rows(cells):
    """Validation accuracy per epoch: a row per cell and epoch."""
    return [{"epoch": int(epoch), **_cell_columns(cell), "val_accuracy_percent": round(100 * float(value), 2)}
            for cell in _ordered(cells)
            for epoch, value in zip(cell["curve"]["epoch"], cell["curve"]["val_accuracy"])]


def accuracy_rows(cells):
    """Test accuracy of the best-validation weights: a row per cell."""
    return [{**_cell_columns(cell), "test_accuracy_percent": round(100 * cell["metrics"]["accuracy"], 2)}
            for cell in _ordered(cells)]


def gain_rows(comparison):
    """SSL minus baseline test accuracy per N, in points, with its interval and the primary test's Holm p."""
    return [{"N": n_label(e["fraction"]), "fraction": e["fraction"],
             "gain_points": round(100 * e["difference"], 2), "ci_low_points": round(100 * e["ci_low"], 2),
             "ci_high_points": round(100 * e["ci_high"], 2), "p_holm": e["p_primary_holm"], "seeds": e["seeds"]}
            for _, e in compared(comparison)]
