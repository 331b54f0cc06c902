"""End to end, for real: `dvc repro` in a temporary git repository on tiny synthetic data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_project, write_params

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


@pytest.fixture
def project(tmp_path, synthetic_archive):
    """A git + DVC repository holding a copy of the project, set up for tiny synthetic runs."""
    repo = copy_project(tmp_path / "repo")
    write_params(repo / "params.yaml", **TINY, **{"data.source": str(synthetic_archive)})
    sh("git", "init", "-q", cwd=repo)
    sh("git", "config", "user.email", "test@example.com", cwd=repo)
    sh("git", "config", "user.name", "test", cwd=repo)
    sh("dvc", "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "init", cwd=repo)
    return repo


def test_dvc_repro_data_and_split(project):
    sh("dvc", "repro", "split", cwd=project)
    meta = json.loads((project / "data/cifar10/meta.json").read_text())
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
    experiment = client.get_experiment_by_name("simclr-cifar10")
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
    shown = sh("dvc", "metrics", "show", "--json", cwd=project).stdout
    assert "n10" in shown and "knn_accuracy" in shown
    stages = [run.data.tags["dvc.stage"] for run in mlflow_runs()]
    assert stages.count("finetune@ssl") == 3 and stages.count("finetune@baseline") == 3
    assert "evaluate" in stages and "pretrain" in stages

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
