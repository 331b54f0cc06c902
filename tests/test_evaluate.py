"""The evaluate stage on fabricated fine-tune outputs: metrics files, figures, report, errors."""
import csv
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from stages.lib import dvc_views, prepared, report, study, tracking
from stages.lib.splits import fraction_key
from stages.lib.params import EvaluateParams
from tests.conftest import CLASSES, run_module, save_data, synthetic_images, write_params

FRACTIONS = (1.0, 0.5, 0.1)
# Chance of a correct test prediction per mode and fraction: SSL better everywhere.
SKILL = {"baseline": {1.0: 0.60, 0.5: 0.50, 0.1: 0.35}, "ssl": {1.0: 0.75, 0.5: 0.70, 0.1: 0.62}}
N_TEST = 1000
PLOTS = ("val_accuracy", "train_loss", "learning_rate", "convergence", "ssl_gain",
         "accuracy_vs_fraction", "confusion")


def fabricate_cell(root, mode, fraction, seed, skill, epochs=6):
    """Write <root>/finetune/<mode>/<key>_s<seed>.{json,npz} and <root>/curves/... ; return accuracy."""
    rng = np.random.default_rng([sum(map(ord, mode)), int(fraction * 1000), seed])
    key = fraction_key(fraction)
    y_true = np.repeat(np.arange(10), N_TEST // 10).astype(np.int64)
    wrong = (y_true + rng.integers(1, 10, size=N_TEST)) % 10
    y_pred = np.where(rng.random(N_TEST) < skill, y_true, wrong).astype(np.int64)
    out = root / "finetune" / mode
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / f"{key}_s{seed}.npz", y_true=y_true, y_pred=y_pred)
    info = {"mode": mode, "fraction": fraction, "key": key, "seed": seed, "labeled_images": int(4500 * fraction),
            "best_epoch": epochs - 1, "epochs_run": epochs, "seconds": 12.5, "device": "cpu",
            "settings": {"lr": 0.1, "backbone_lr": 0.1, "head_epochs": 0, "epochs": epochs, "weight_decay": 0.0005,
                         "batch_size": 256, "equal_steps": True}}
    (out / f"{key}_s{seed}.json").write_text(json.dumps(info))
    curve_dir = root / "curves" / mode
    curve_dir.mkdir(parents=True, exist_ok=True)
    val = [skill * (1 - 0.5**e) for e in range(1, epochs + 1)]
    with open(curve_dir / f"{key}_s{seed}.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_loss", "val_loss", "val_accuracy", "val_precision", "val_recall",
                         "val_f1", "lr", "seconds"])
        for epoch, acc in enumerate(val, start=1):
            writer.writerow([epoch, 2.3 / epoch, 2.0 / epoch, acc, acc, acc, acc, 0.1 / epoch, 2.0])
    return float((y_pred == y_true).mean())


def fabricate_data(root, source):
    save_data(root / "data", synthetic_images(6, seed=1), synthetic_images(2, seed=2), source=source, sha256="ab" * 32)


def facts(source, url=None, sha256=None, limit=None, unlabeled=0, test_split="official"):
    """The data facts of a small synthetic data set from `source` (`limit`: its data.limit; `unlabeled`:
    how many unlabeled images it has, at most 10; `test_split`: how its test set was made)."""
    arrays = {"train": synthetic_images(2, seed=1), "test": synthetic_images(1, seed=2)}
    if unlabeled:
        arrays["unlabeled"] = synthetic_images(1, seed=3)[0][:unlabeled]
    return prepared.data_facts(arrays, CLASSES, source=source, url=url, sha256=sha256, test_split=test_split,
                               limit=limit)


def stage_args(root):
    return ["--params", root / "params.yaml", "--finetune", root / "finetune", "--curves", root / "curves",
            "--data", root / "data", "--pretrain", root / "pretrain.json",
            "--metrics-dir", root / "metrics", "--plots-dir", root / "plots", "--samples", root / "samples.png"]


def run_evaluate(root):
    # DVC_ROOT keeps MLflow's artifact folder inside the test's temporary directory.
    return run_module("stages.evaluate", *stage_args(root), env={**os.environ, "DVC_ROOT": str(root)})


@pytest.fixture
def fabricated(tmp_path):
    """Fabricated outputs of every earlier stage; returns (root, {mode: {key: accuracy}})."""
    accuracy = {m: {fraction_key(f): fabricate_cell(tmp_path, m, f, 0, SKILL[m][f]) for f in FRACTIONS}
                for m in SKILL}
    fabricate_data(tmp_path, "data/cifar10-jpeg.tar.gz")
    write_params(tmp_path / "params.yaml", **{"evaluate.bootstrap_samples": 500})
    pretrain = {"loss": 5.4321, "knn_accuracy": 0.6123, "epochs": 3, "seconds": 42.0,
                "images_per_second": 1234.5, "device": "cuda (NVIDIA H100)"}
    (tmp_path / "pretrain.json").write_text(json.dumps(pretrain))
    return tmp_path, accuracy


def test_evaluate_writes_metrics_figures_and_report(fabricated):
    root, accuracy = fabricated
    result = run_evaluate(root)
    assert result.returncode == 0, result.stderr
    summary = json.loads((root / "metrics/summary.json").read_text())
    keys = {"accuracy", "precision", "recall", "f1", "precision_weighted", "recall_weighted", "f1_weighted",
            "convergence_epoch", "best_epoch", "seconds"}
    assert set(summary) == {"baseline", "ssl"}
    for mode, cells in summary.items():
        assert set(cells) == {"n100", "n50", "n10"}
        for key, entry in cells.items():
            assert keys <= set(entry) and not any("." in k for k in entry)
            assert entry["accuracy"] == pytest.approx(accuracy[mode][key], abs=1e-4)
            assert entry["best_epoch"] == 5 and entry["seconds"] == 12.5
            assert 1 <= entry["convergence_epoch"] <= 6
    comparison = json.loads((root / "metrics/comparison.json").read_text())
    for key in ("n100", "n50", "n10"):
        entry = comparison[key]
        diff = accuracy["ssl"][key] - accuracy["baseline"][key]
        assert entry["difference"] == pytest.approx(diff, abs=2e-4)
        assert entry["ci_low"] < entry["difference"] < entry["ci_high"]
        assert entry["significant"] is True and entry["p_primary_holm"] < 0.05 and entry["confidence"] == 0.95
        assert entry["primary_test"] == "images" and entry["images_test"] == "McNemar"
        assert entry["p_images"] <= entry["p_images_holm"] == entry["p_primary_holm"]
        assert set(entry["mcnemar_p_per_seed"]) == {"0"} and entry["p_seeds"] is None
        # Curves skill * (1 - 0.5^epoch) peak at epoch 6; the baseline's is the lower best, so the common
        # threshold is its own-best threshold, which the better SSL curve reaches sooner than its own.
        convergence, fraction = entry["convergence"], entry["fraction"]
        assert convergence["threshold"] == pytest.approx(SKILL["baseline"][fraction] * 63 / 64 - 0.01, abs=1e-4)
        assert convergence["baseline_epochs"] == convergence["baseline_epochs_own_best"]
        assert convergence["ssl_epochs"] < convergence["ssl_epochs_own_best"] == 6 - (fraction == 0.1)
        assert entry["relative"] == pytest.approx(diff / accuracy["baseline"][key], abs=1e-3)
    efficiency = comparison["label_efficiency"]
    assert efficiency["ssl_fraction"] == 0.1 and efficiency["note"]
    per_class = json.loads((root / "metrics/per_class.json").read_text())
    assert set(per_class["ssl"]["n10"]["per_class_recall"]) == set(CLASSES)
    assert np.array(per_class["ssl"]["n10"]["confusion"]).sum() == N_TEST
    for path in [root / "plots" / f"{name}.png" for name in PLOTS] + [root / "samples.png"]:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100, path
    assert_dvc_views(root, accuracy, comparison)
    text = (root / "metrics/report.md").read_text()
    for heading in ("Metrics comparison per experiment", "Fine-tuning settings per cell", "Performance summary",
                    "Improvement analysis", "Convergence", "Data and device", "SimCLR pretraining", "Label efficiency"):
        assert f"## {heading}" in text
    assert "| baseline | 100% | 0.1 | 0.1 | 0 | 6 | 0.0005 | 256 | True | 5 |" in text  # settings, kept epoch
    for mode in accuracy:
        for value in accuracy[mode].values():
            assert f"{100 * value:.1f}%" in text
    assert "71.4%" in text and "39.6%" in text and "not reported" in text
    assert "JPEG (quality 75)" in text and "ab" * 32 in text and "61.2%" in text
    assert not list((root / "metrics").glob(".*tmp*")) and not list((root / "plots").glob(".*tmp*"))


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_dvc_views(root, accuracy, comparison):
    """The headline metrics (numbers only, a few per file) and the CSV files DVC plots (no empty cell)."""
    headline = {p.name: json.loads(p.read_text()) for p in (root / "metrics/headline").iterdir()}
    assert set(headline) == {"n100.json", "n50.json", "n10.json", "study.json"}
    for key in ("n100", "n50", "n10"):
        numbers, entry = headline[f"{key}.json"], comparison[key]
        assert numbers["accuracy"] == {m: pytest.approx(accuracy[m][key], abs=1e-4) for m in ("baseline", "ssl")}
        assert set(numbers["f1"]) == {"baseline", "ssl"}
        assert numbers["gain"] == {"accuracy": entry["difference"], "ci_lower": entry["ci_low"],
                                   "ci_upper": entry["ci_high"],
                                   "log10_p": pytest.approx(math.log10(entry["p_primary_holm"]), abs=0.01)}
    assert headline["study.json"] == {"knn_accuracy": 0.6123, "seconds": 42.0 + 6 * 12.5}
    for numbers in headline.values():
        values = list(tracking.flatten(numbers).values())
        assert len(values) <= 8 and all(type(v) in (int, float) for v in values), numbers
    val = read_csv(root / "plots/val_accuracy.csv")
    assert len(val) == 6 * 6 and {r["mode"] for r in val} == {"baseline", "ssl"}
    assert {r["N"] for r in val} == {"N = 100%", "N = 50%", "N = 10%"}
    test = read_csv(root / "plots/test_accuracy.csv")
    ssl_n10 = next(r for r in test if r["mode"] == "ssl" and r["fraction"] == "0.1")
    assert float(ssl_n10["test_accuracy_percent"]) == pytest.approx(100 * accuracy["ssl"]["n10"], abs=0.01)
    gain = read_csv(root / "plots/ssl_gain.csv")
    assert [r["N"] for r in gain] == ["N = 100%", "N = 50%", "N = 10%"]
    assert float(gain[0]["gain_points"]) == pytest.approx(100 * comparison["n100"]["difference"], abs=0.01)
    for row in val + test + gain:
        assert "" not in row.values(), row


def test_no_results_is_a_one_line_error(fabricated):
    root, _ = fabricated
    empty = root / "empty"
    empty.mkdir()
    args = stage_args(root)
    args[args.index("--finetune") + 1] = empty
    result = run_module("stages.evaluate", *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: no fine-tune results")
    assert str(empty) in result.stderr


def test_json_without_predictions_is_named(fabricated):
    root, _ = fabricated
    (root / "finetune/ssl/n50_s0.npz").unlink()
    result = run_module("stages.evaluate", *stage_args(root))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "n50_s0.npz" in result.stderr.strip().splitlines()[-1]
    assert not (root / "metrics/summary.json").exists()


def _cells(tmp_path, modes, seeds):
    for mode in modes:
        for fraction in FRACTIONS:
            for seed in seeds:
                fabricate_cell(tmp_path, mode, fraction, seed, SKILL.get(mode, SKILL["ssl"])[fraction] - 0.05 * seed)
    return study.load_cells(tmp_path / "finetune", tmp_path / "curves", 10, 1.0)


def _study(tmp_path, modes, seeds, confidence):
    """(cells, summary, comparison, settings) of _cells(tmp_path, modes, seeds), compared at `confidence`."""
    cells = _cells(tmp_path, modes, seeds)
    settings = EvaluateParams(convergence_tolerance=1.0, bootstrap_samples=200, confidence=confidence)
    summary, _ = study.summarise(cells, list(CLASSES))
    return cells, summary, study.compare(cells, settings, 0), settings


def test_several_seeds_give_mean_and_std(tmp_path):
    cells, summary, comparison, settings = _study(tmp_path, ("baseline", "ssl", "linear"), (0, 1), confidence=0.9)
    entry = summary["ssl"]["n10"]
    seeds = [c["metrics"]["accuracy"] for c in cells if c["mode"] == "ssl" and c["key"] == "n10"]
    assert entry["seeds"] == 2 and entry["accuracy"] == pytest.approx(np.mean(seeds), abs=1e-4)
    assert entry["accuracy_std"] == pytest.approx(np.std(seeds, ddof=1), abs=1e-4)
    assert {"f1_std", "convergence_epoch_std", "seconds_std"} <= set(entry)
    assert comparison["n10"]["test_images"] == N_TEST and comparison["n10"]["seeds"] == 2
    assert set(comparison["n10"]["mcnemar_p_per_seed"]) == {"0", "1"}
    assert comparison["n10"]["images_test"] == "one-sample t-test of d_i over test images"
    text = report.build(summary, comparison, facts("cifar10", url="https://example.org/cifar-10.tar.gz"),
                        {"ssl": ["cpu"]}, settings)
    rows = [r for r in dvc_views.curve_rows(cells) if r["mode"] == "ssl" and r["N"] == "N = 10%"]
    assert {r["seed"] for r in rows} == {0, 1} and len(rows) == 2 * 6  # every seed: the plot shows their spread
    assert f"{100 * entry['accuracy']:.1f} ± {100 * entry['accuracy_std']:.1f}%" in text
    assert "linear accuracy" in text and "90% CI" in text and "SimCLR pretraining" not in text
    assert "Holm" in text and "Common threshold" in text and "never on pooled seeds" in text
    assert "JPEG" not in text and "# SimCLR vs supervised baseline on cifar10" in text
    assert "Seed project" in text  # CIFAR-10: the seed project's numbers are shown beside ours


def test_baseline_only_has_no_comparison(tmp_path):
    cells, summary, comparison, settings = _study(tmp_path, ("baseline",), (0,), confidence=0.95)
    assert set(comparison) == {"note"}
    text = report.build(summary, comparison, facts("/data/my-flowers.zip"), {"baseline": ["cpu"]}, settings)
    assert "on my-flowers" in text and "Seed project" not in text  # not CIFAR-10: no seed-project table
    assert "## Improvement analysis" in text and comparison["note"] in text
    headline = dvc_views.headline(summary, comparison, cells)
    assert headline["n10.json"] == {"accuracy": {"baseline": summary["baseline"]["n10"]["accuracy"]},
                                    "f1": {"baseline": summary["baseline"]["n10"]["f1"]}}
    assert headline["study.json"] == {"seconds": 3 * 12.5} and dvc_views.gain_rows(comparison) == []


@pytest.mark.parametrize("unlabeled, stratified", [
    (0, "stratified by class; the test set is whole)"),
    (10, "stratified by class, and as many unlabeled ones; the test set is whole)")])
def test_a_data_limit_is_reported_and_hides_the_seed_project_table(tmp_path, unlabeled, stratified):
    """The seed project's numbers are for the whole of CIFAR-10, not a data.limit subset of it; the
    Subset line speaks of unlabeled images only where there are some."""
    _, summary, comparison, settings = _study(tmp_path, ("baseline", "ssl"), (0,), confidence=0.95)
    whole, subset = (report.build(summary, comparison, facts("cifar10", url="https://example.org/c10", limit=limit,
                                                             unlabeled=unlabeled),
                                  {"ssl": ["cpu"]}, settings) for limit in (None, 5000))
    assert "Seed project" in whole and "data.limit" not in whole
    assert "Seed project" not in subset
    assert "- Subset: `data.limit` = 5000 (at most that many labeled training images, " + stratified in subset


def test_a_held_out_test_set_hides_the_seed_project_table(tmp_path):
    """The seed project's numbers are on CIFAR-10's own test set, not on one held out of its training
    images (a local copy without a test/ folder)."""
    _, summary, comparison, settings = _study(tmp_path, ("baseline", "ssl"), (0,), confidence=0.95)
    held_out = "held out 20% of the labelled images (stratified, seed 0)"
    own, held = (report.build(summary, comparison, facts("data/cifar10-jpeg", test_split=split), {"ssl": ["cpu"]},
                              settings) for split in ("test/ folder", held_out))
    assert "Seed project" in own
    assert "Seed project" not in held


def test_many_classes_keep_the_sample_grid_readable(tmp_path):
    """CIFAR-100: at most 20 class rows in the sample grid (a random 20), not 100."""
    from stages.lib import plots

    x, y = np.zeros((60, 8, 8, 3), np.uint8), np.repeat(np.arange(30), 2)
    names = [f"class{i}" for i in range(30)]
    plots.sample_grid(x, y, names, tmp_path / "thirty.png", seed=0)
    plots.sample_grid(x[:20], y[:20], names[:10], tmp_path / "ten.png", seed=0)
    with Image.open(tmp_path / "thirty.png") as thirty, Image.open(tmp_path / "ten.png") as ten:
        assert thirty.height < 2.2 * ten.height  # 20 rows against 10; all 30 would be 2.9 times


def test_cifar10_is_recognised_by_the_data_name_and_cifar100_is_not():
    names = [facts(source, url=url).name for source, url in
             (("cifar10", "https://example.org/c10"), ("cifar100", "https://example.org/c100"),
              ("data/cifar10-jpeg.tar.gz", None), ("/data/cifar100_png", None), ("/data/my-flowers.zip", None))]
    assert [report.is_cifar10(name) for name in names] == [True, False, True, False, False]


def test_data_section_says_why_no_source_sha256_is_recorded():
    lines = [next(line for line in report.data_section(f, {}).splitlines() if "SHA-256" in line) for f in
             (facts("cifar10", url="https://example.org/c10"), facts("/data/flowers"),
              facts("/data/flowers.zip", sha256="ab" * 32))]
    assert lines == ["- SHA-256 of the source: none recorded (a torchvision download, checked by its own checksum)",
                     "- SHA-256 of the source: none recorded (a folder, not an archive file)",
                     f"- SHA-256 of the source: `{'ab' * 32}`"]
