"""End to end, for real: `dvc repro` in a temporary git repository on tiny synthetic data."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import copy_project, write_params

BIN = Path(sys.executable).parent


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
    write_params(repo / "params.yaml", **{"data.source": str(synthetic_archive), "data.val_size": 50})
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
