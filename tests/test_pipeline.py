"""End to end, for real: `dvc repro` in a temporary git repository on tiny synthetic data."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages.lib import tracking
from tests.conftest import REPO, copy_project, write_params

BIN = Path(sys.executable).parent
# The whole study in seconds on a CPU: tiny model, two epochs everywhere.
TINY = {
    "data.val_size": 50, "model.width": 4,
    "pretrain.epochs": 2, "pretrain.batch_size": 64, "pretrain.compile": False, "pretrain.knn_every": 1,
    "pretrain.proj_hidden": 32, "pretrain.proj_dim": 16, "pretrain.warmup_epochs": 1,
    "finetune.max_epochs": 2, "finetune.batch_size": 32, "finetune.compile": False,
    "evaluate.bootstrap_samples": 200,
}


def sh(*args, cwd, check=True, timeout=900):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def init_repo(repo, plots=True):
    """Make `repo` a git + DVC repository; with `plots`, holding the project's DVC plot templates."""
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "test@example.com", cwd=repo)
    sh("git", "config", "user.name", "test", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    if plots:
        shutil.copytree(REPO / ".dvc/plots", repo / ".dvc/plots")


@pytest.fixture
def project(tmp_path, synthetic_archive):
    """A git + DVC repository holding a copy of the project, set up for tiny synthetic runs."""
    repo = copy_project(tmp_path / "repo")
    write_params(repo / "params.yaml", **TINY, **{"data.source": str(synthetic_archive)})
    init_repo(repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "init", cwd=repo)
    return repo


def test_dvc_repro_data_and_split(project):
    sh("dvc", "repro", "split", cwd=project)
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert sum(meta["counts"]["train"].values()) == 300
    assert sorted(p.name for p in (project / "data/splits").iterdir()) == [
        "train_n10.npy", "train_n100.npy", "train_n50.npy", "val.npy",
    ]
    assert "Data and pipelines are up to date" in sh("dvc", "repro", "split", cwd=project).stdout
    stages = sorted(run.data.tags["dvc.stage"] for run in mlflow_runs())
    assert stages == ["data", "split"]


def mlflow_runs():
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("ssl-label-budget")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # "model training"
    return client.search_runs([experiment.experiment_id])


def test_dvc_repro_runs_the_whole_study(project):
    sh("dvc", "repro", cwd=project)
    summary = json.loads((project / "metrics/summary.json").read_text())
    keys = {"accuracy", "precision", "recall", "f1", "convergence_epoch", "best_epoch", "seconds"}
    for mode in ("baseline", "ssl"):
        assert set(summary[mode]) == {"n100", "n50", "n10"}
        for cell in summary[mode].values():
            assert keys <= set(cell)
    comparison = json.loads((project / "metrics/comparison.json").read_text())
    assert {"n100", "n50", "n10", "label_efficiency"} <= set(comparison)
    for png in (project / "plots/evaluate").glob("*.png"):
        from PIL import Image

        with Image.open(png) as image:
            assert image.size[0] > 100 and image.size[1] > 100
    assert len(list((project / "plots/evaluate").glob("*.png"))) == 7
    assert (project / "plots/samples.png").exists()
    # The grid shows the data itself: DVC's cache keeps it, git ignores it.
    assert sh("git", "check-ignore", "plots/samples.png", cwd=project, check=False).returncode == 0
    assert "Improvement analysis" in (project / "metrics/report.md").read_text()
    assert_headline_metrics(project)
    assert_plots(json.loads(sh("dvc", "plots", "show", "--json", cwd=project).stdout), {"workspace"})
    runs = mlflow_runs()
    assert sorted(run.data.tags["dvc.stage"] for run in runs) == [
        "data", "evaluate", *["finetune@baseline"] * 3, *["finetune@ssl"] * 3, "init", "pretrain", "split"]
    assert_mlflow_inputs(project, runs)

    # An experiment on 10% of the labels reuses the data, splits' validation and pretraining.
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "study", cwd=project)
    out = sh("dvc", "exp", "run", "-S", "fraction=0.1", cwd=project)
    assert "Running stage 'pretrain'" not in out.stdout
    summary = json.loads((project / "metrics/summary.json").read_text())
    assert set(summary["ssl"]) == {"n10"} and set(summary["baseline"]) == {"n10"}
    diff = sh("dvc", "metrics", "diff", "--json", cwd=project).stdout
    assert "n10" in diff
    assert "ssl" in sh("dvc", "exp", "show", "--json", cwd=project).stdout
    assert_plots(json.loads(sh("dvc", "plots", "diff", "--json", "HEAD", cwd=project).stdout), {"HEAD", "workspace"})
    experiment = [run for run in mlflow_runs() if run.data.tags["dvc.exp_name"] != "workspace"]
    assert len({run.data.tags["dvc.pipeline_run"] for run in experiment}) == 1
    assert experiment[0].data.tags["dvc.pipeline_run"].startswith(experiment[0].data.tags["dvc.exp_name"] + " ")


def assert_headline_metrics(project):
    """dvc metrics show: the headline files only, a few numbers each and nothing else."""
    shown = json.loads(sh("dvc", "metrics", "show", "--json", cwd=project).stdout)
    files = shown[""]["data"]
    assert sorted(files) == [f"metrics/headline/{name}.json" for name in ("n10", "n100", "n50", "study")]
    assert set(files["metrics/headline/study.json"]["data"]) == {"knn_accuracy", "seconds"}
    for path, content in files.items():
        values = tracking.flatten(content["data"])
        assert len(values) <= 8 and all(type(v) in (int, float) for v in values.values()), (path, values)
    assert set(tracking.flatten(files["metrics/headline/n10.json"]["data"])) == {
        "accuracy.baseline", "accuracy.ssl", "f1.baseline", "f1.ssl",
        "gain.accuracy", "gain.ci_lower", "gain.ci_upper", "gain.log10_p"}
    table = sh("dvc", "metrics", "show", cwd=project).stdout
    assert max(len(line) for line in table.splitlines()) <= 250, table


PLOTS = {"SimCLR loss per epoch", "SimCLR kNN accuracy on the validation split",
         "Validation accuracy per epoch, baseline vs SSL, per label fraction N",
         "Test accuracy against label fraction N", "SSL gain over the baseline, with its bootstrap interval"}


def assert_plots(shown, revisions):
    """dvc plots show/diff --json: the study's plots and no other, no empty value, axes titled in words,
    baseline and SSL on the same axes, every revision in each plot."""
    plots = shown["data"]
    assert set(plots) == PLOTS and not shown.get("errors"), shown.get("errors")
    for name, (plot,) in plots.items():
        spec = plot["content"]
        rows = spec["data"]["values"]
        assert rows and all("" not in row.values() for row in rows), name
        assert {row["rev"] for row in rows} == revisions, name
        titles = [value for key, value in _items(spec) if key == "title" and isinstance(value, str)]
        assert not {"y", "x", "step"} & set(titles) and not any("<DVC_METRIC" in t for t in titles), (name, titles)
    for name in ("Validation accuracy per epoch, baseline vs SSL, per label fraction N",
                 "Test accuracy against label fraction N"):
        assert {row["mode"] for row in plots[name][0]["content"]["data"]["values"]} == {"baseline", "ssl"}


def _items(node):
    """Every (key, value) in a nested JSON value."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _items(value)
    elif isinstance(node, list):
        for value in node:
            yield from _items(value)


def assert_mlflow_inputs(project, runs):
    """One pipeline run groups this repro's runs; each run that reads the data logs it as its input."""
    assert len({run.data.tags["dvc.pipeline_run"] for run in runs}) == 1
    assert runs[0].data.tags["dvc.pipeline_run"].startswith("workspace ")
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    digest, source = meta["content_sha256"][:8], meta["source"]
    for run in runs:
        inputs = [(i.dataset.name, i.dataset.digest, i.dataset.source) for i in run.inputs.dataset_inputs]
        stage, fraction = run.data.tags["dvc.stage"], run.data.tags.get("fraction")
        if stage == "init":
            assert inputs == []
        elif stage.startswith("finetune@"):
            ((name, _, where),) = inputs
            assert name == "cifar-n" + {"1.0": "100", "0.5": "50", "0.1": "10"}[fraction] and source in where
        else:
            assert [(name, code) for name, code, _ in inputs] == [("cifar", digest)], stage  # cifar.tar.gz
