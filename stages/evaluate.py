"""DVC stage `evaluate`: test metrics of every fine-tuned cell, SSL vs baseline comparison
(seed-carrying bootstrap interval, per-seed McNemar, paired tests over test images and across
seeds, Holm-corrected across N), convergence (own best and common threshold), figures and the
markdown report.

Reads <finetune>/<mode>/<key>_s<seed>.{json,npz}, <curves>/<mode>/<key>_s<seed>.csv,
<data>/meta.json and train.npz, and the optional SimCLR metrics file. Writes
summary.json, comparison.json, per_class.json, report.md and the headline metrics that DVC
shows (headline/<key>.json, headline/study.json) to --metrics-dir, and the PNGs plus the CSV
files that DVC plots (val_accuracy, test_accuracy, ssl_gain) to --plots-dir.
"""
import os
from pathlib import Path

from stages.lib import dvc_views, params, plots, prepared, report, study, tracking
from stages.lib.cli import log, run_stage
from stages.lib.io import atomic_path, read_json, remove, removed_on_failure, write_csv, write_json, write_text

FIGURES = (
    ("Test accuracy vs label fraction", "accuracy_vs_fraction.png"), ("SSL gain over the baseline", "ssl_gain.png"),
    ("Validation accuracy per epoch", "val_accuracy.png"), ("Training loss per epoch", "train_loss.png"),
    ("Learning rate per epoch", "learning_rate.png"), ("Epochs to convergence", "convergence.png"),
    ("Confusion matrices", "confusion.png"),
)

METRIC_FILES = ("report.md", "summary.json", "comparison.json", "per_class.json")
HEADLINE = "headline"  # the folder of headline metrics in --metrics-dir (dvc_views.headline)
PLOT_TABLES = ("val_accuracy.csv", "test_accuracy.csv", "ssl_gain.csv")  # in --plots-dir, for dvc plots


def add_arguments(parser):
    parser.add_argument("--finetune", required=True, help="fine-tune results: <mode>/<key>_s<seed>.json and .npz")
    parser.add_argument("--curves", required=True, help="per-epoch curves: <mode>/<key>_s<seed>.csv")
    parser.add_argument("--data", required=True, help="prepared data directory (meta.json, train.npz)")
    parser.add_argument("--pretrain", required=True, help="SimCLR metrics JSON (skipped when absent)")
    parser.add_argument("--metrics-dir", required=True,
                        help="where summary.json, comparison.json, report.md and headline/ go")
    parser.add_argument("--plots-dir", required=True, help="where the PNGs and the CSV files for DVC plots go")
    parser.add_argument("--samples", required=True,
                        help="grid of sample training images (PNG); kept apart, as it shows the data itself")


def run(args):
    p = params.load(args.params, "seed", "evaluate")
    facts = prepared.read_facts(args.data)
    classes, tolerance = facts.classes, p.evaluate.convergence_tolerance
    cells = study.load_cells(args.finetune, args.curves, len(classes), tolerance)
    x, y = prepared.load_prepared(args.data, "train", facts)
    pretrain = read_json(args.pretrain, "pretrain metrics") if Path(args.pretrain).is_file() else None
    metrics_dir, plots_dir = Path(args.metrics_dir), Path(args.plots_dir)
    samples, data = Path(args.samples), tracking.dataset(facts, "evaluation")
    with removed_on_failure(*outputs(metrics_dir, plots_dir), samples), \
            tracking.stage_run("evaluate", p.as_dict(), data=data) as mlflow_run:
        summary, per_class = study.summarise(cells, classes)
        comparison = study.compare(cells, p.evaluate, p.seed)
        write_json(metrics_dir / "summary.json", summary)
        write_json(metrics_dir / "comparison.json", comparison)
        write_json(metrics_dir / "per_class.json", per_class)
        draw(cells, summary, comparison, per_class, classes, tolerance, plots_dir)
        headline = dvc_views.headline(summary, comparison, cells, pretrain)
        write_dvc_views(headline, cells, comparison, metrics_dir / HEADLINE, plots_dir)
        plots.sample_grid(x, y, classes, samples, seed=p.seed)
        devices = {m: sorted({c["device"] for c in cells if c["mode"] == m}) for m in summary}
        figures = [(title, os.path.relpath(plots_dir / name, metrics_dir)) for title, name in FIGURES]
        figures.append(("Sample training images", os.path.relpath(samples, metrics_dir)))
        text = report.build(summary, comparison, facts, devices, p.evaluate, pretrain, figures)
        write_text(metrics_dir / "report.md", text)
        mlflow_run.log_metrics(tracking.flatten({name.removesuffix(".json"): v for name, v in headline.items()}))
        for name in METRIC_FILES:
            mlflow_run.log_artifact(metrics_dir / name)
        mlflow_run.log_artifacts(metrics_dir / HEADLINE, HEADLINE)
        mlflow_run.log_artifacts(plots_dir, "plots")
        mlflow_run.log_artifact(samples, "plots")
    log(f"evaluate: {len(cells)} cells -> {metrics_dir / 'report.md'}, figures in {plots_dir}")


def outputs(metrics_dir, plots_dir):
    """Every file this stage writes: none may outlive a failed run."""
    return ([metrics_dir / name for name in (*METRIC_FILES, HEADLINE)]
            + [plots_dir / name for _, name in FIGURES] + [plots_dir / name for name in PLOT_TABLES])


def draw(cells, summary, comparison, per_class, classes, tolerance, plots_dir):
    """Write every figure of the results into plots_dir (tolerance: points)."""
    for column, label, name in (("val_accuracy", "Validation accuracy", "val_accuracy.png"),
                                ("train_loss", "Training loss", "train_loss.png"),
                                ("lr", "Learning rate", "learning_rate.png")):
        plots.curves(cells, column, label, plots_dir / name)
    plots.convergence_bars(summary, comparison, tolerance, plots_dir / "convergence.png")
    plots.gain_with_ci(comparison, plots_dir / "ssl_gain.png")
    plots.accuracy_vs_fraction(summary, plots_dir / "accuracy_vs_fraction.png")
    pooled = [{"mode": m, "fraction": summary[m][k]["fraction"], "confusion": v["confusion"]}
              for m, cells_of_mode in per_class.items() for k, v in cells_of_mode.items()]
    plots.confusion_matrices(pooled, classes, plots_dir / "confusion.png")


def write_dvc_views(headline, cells, comparison, headline_dir, plots_dir):
    """The headline metrics files ({name: numbers}) into headline_dir, replaced whole, and PLOT_TABLES."""
    with atomic_path(headline_dir) as tmp:
        tmp.mkdir()
        for name, numbers in headline.items():
            write_json(tmp / name, numbers)
    tables = (dvc_views.curve_rows(cells), dvc_views.accuracy_rows(cells),
              dvc_views.gain_rows(comparison))
    for name, rows in zip(PLOT_TABLES, tables):
        if rows:
            write_csv(plots_dir / name, rows)
        else:  # nothing compared: no gains, and no stale file from an earlier run
            remove(plots_dir / name)


def main(argv=None):
    run_stage("evaluate", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
