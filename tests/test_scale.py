"""Scaling up, for real, on tiny synthetic data: DVC's experiment queue running two
experiments at once into one local MLflow store, an MLflow tracking server, and a DVC
remote round trip (push, clone, pull)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from tests.conftest import REPO, copy_project, make_archive, run_module, write_params, write_tree
from tests.test_pipeline import BIN, TINY, init_repo, sh

QUEUE_TIMEOUT = 300  # seconds for both queued experiments together


def local_store(*args, cwd, **kwargs):
    """sh() with MLflow's default store, <repo root>/mlflow.db (found from DVC_ROOT or git)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("DVC_ROOT", raising=False)
        return sh(*args, cwd=cwd, **kwargs)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One `dvc repro` of the tiny study in a git + DVC repository, committed; shared by the tests."""
    root = tmp_path_factory.mktemp("scale")
    write_tree(root / "tree", n_train=30, n_test=10)
    archive = make_archive(root / "tree", root / "cifar.tar.gz")  # absolute: temp folders find it
    repo = copy_project(root / "repo")
    # One fraction keeps this repro short; the queued experiments change it.
    write_params(repo / "params.yaml", **TINY, **{"data.source": str(archive), "fraction": 1.0})
    init_repo(repo, plots=False)
    local_store("dvc", "repro", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "study", cwd=repo)
    return repo


def runs_by_exp(tracking_uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("ssl-label-budget")
    runs = {}
    for run in client.search_runs([experiment.experiment_id], max_results=1000):
        runs.setdefault(run.data.tags.get("dvc.exp_name"), []).append(run)
    return runs


def queue_status(repo):
    """{experiment name: status} from `dvc queue status`."""
    out = sh("dvc", "queue", "status", cwd=repo).stdout
    return dict(re.findall(r"^\s*[0-9a-f]{7}\s+(\S+)\s+.*?\s(Queued|Running|Success|Failed)\s*$", out, re.M))


def start_queue(repo, jobs):
    """`dvc queue start`, its output to a file: its workers keep the caller's stdout open.
    One torch thread per experiment: parallel experiments share the CPU cores."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "OMP_NUM_THREADS": "1"}
    with open(repo.parent / "queue-start.log", "w") as log:
        subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], cwd=repo, env=env,
                       stdout=log, stderr=subprocess.STDOUT, timeout=120, check=True)


def stop_workers(repo):
    """Workers stop by themselves when the queue is empty, but with DVC 3.67 one sometimes
    misses its shutdown message and idles on: end any left, by their pid files."""
    pids = [int(f.read_text()) for f in (repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid")]
    alive = [pid for pid in pids if b"queue-worker" in _cmdline(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGTERM)  # a warm shutdown: a task still running finishes first
    deadline = time.monotonic() + 30
    while (alive := [pid for pid in alive if b"queue-worker" in _cmdline(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in alive:
        os.kill(pid, signal.SIGKILL)


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_queued_experiments_run_in_parallel_into_one_store(study, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the stages find <repo>/mlflow.db themselves
    store = study / "mlflow.db"
    store.unlink()  # both workers' first stages now create the store at once
    sh("dvc", "exp", "run", "--queue", "-S", "fraction=0.1", "-n", "a", cwd=study)
    sh("dvc", "exp", "run", "--queue", "-S", "fraction=0.5", "-n", "b", cwd=study)
    assert queue_status(study) == {"a": "Queued", "b": "Queued"}
    start_queue(study, jobs=2)
    try:
        deadline = time.monotonic() + QUEUE_TIMEOUT
        while (status := queue_status(study)) and any(s in ("Queued", "Running") for s in status.values()):
            assert time.monotonic() < deadline, f"queue not done after {QUEUE_TIMEOUT} s: {status}"
            time.sleep(2)
    finally:
        stop_workers(study)
    if status != {"a": "Success", "b": "Success"}:
        logs = "\n".join(sh("dvc", "queue", "logs", n, cwd=study, check=False).stdout[-3000:] for n in "ab")
        pytest.fail(f"queue status {status}:\n{logs}")

    shown = json.loads(sh("dvc", "exp", "show", "--json", cwd=study).stdout)
    exps = {exp["name"]: exp for row in shown for group in row.get("experiments") or [] for exp in group["revs"]}
    for name, fraction, key in (("a", 0.1, "n10"), ("b", 0.5, "n50")):
        data = exps[name]["data"]
        assert data["params"]["params.yaml"]["data"]["fraction"] == fraction
        headline = {path for path in data["metrics"] if path.startswith("metrics/headline/")}
        assert headline == {f"metrics/headline/{key}.json", "metrics/headline/study.json"}
        assert set(data["metrics"][f"metrics/headline/{key}.json"]["data"]["accuracy"]) == {"baseline", "ssl"}

    # The queued runs' stages found the main repository's store (DVC_ROOT), and none was lost.
    runs = runs_by_exp(f"sqlite:///{store}")
    assert set(runs) == {"a", "b"}
    for name, fraction in (("a", 0.1), ("b", 0.5)):
        assert sorted(run.data.tags["dvc.stage"] for run in runs[name]) == [
            "evaluate", "finetune@baseline", "finetune@ssl", "split",
        ]
        assert {run.info.status for run in runs[name]} == {"FINISHED"}
        split = next(run for run in runs[name] if run.data.tags["dvc.stage"] == "split")
        assert yaml.safe_load(split.data.params["fraction"]) in (fraction, [fraction])
    artifacts = (study / "mlartifacts").as_uri()
    assert all(run.info.artifact_uri.startswith(artifacts) for rs in runs.values() for run in rs)
    # -j 2: the two experiments ran at the same time.
    spans = {name: (min(r.info.start_time for r in rs), max(r.info.end_time for r in rs)) for name, rs in runs.items()}
    assert spans["a"][0] < spans["b"][1] and spans["b"][0] < spans["a"][1], spans


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free local port with its own store; yields its URI."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts")],
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "mlflow server not healthy after 90 s"
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def data_stage(tmp_path, tracking_uri, synthetic_archive):
    params = write_params(tmp_path / "params.yaml", **TINY, **{"data.source": str(synthetic_archive)})
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    return run_module("stages.data", "--params", params, "--out", tmp_path / "out",
                      "--download-dir", tmp_path / "download", env=env, timeout=120)


def test_stage_logs_to_a_tracking_server(tmp_path, mlflow_server, synthetic_archive):
    result = data_stage(tmp_path, mlflow_server, synthetic_archive)
    assert result.returncode == 0, result.stderr
    runs = runs_by_exp(mlflow_server)["workspace"]
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["dvc.stage"] == "data"
    assert run.data.tags["git.commit"] == sh("git", "rev-parse", "HEAD", cwd=REPO).stdout.strip()
    assert run.data.metrics["train_images"] == 300
    from mlflow.tracking import MlflowClient

    # Artifacts go through the server into its --artifacts-destination.
    assert [a.path for a in MlflowClient(mlflow_server).list_artifacts(run.info.run_id)] == ["meta.json"]
    assert list((tmp_path / "server-artifacts").rglob("meta.json"))


def test_unreachable_tracking_server_fails_fast_before_work(tmp_path, synthetic_archive):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    result = data_stage(tmp_path, uri, synthetic_archive)
    assert time.monotonic() - start < 30
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.stderr
    assert uri in lines[-1] and "MLFLOW_TRACKING_URI" in lines[-1]
    assert not (tmp_path / "out").exists()


def test_dvc_remote_round_trip(study, tmp_path):
    remote = tmp_path / "remote"
    sh("dvc", "remote", "add", "-d", "local", str(remote), cwd=study)
    sh("dvc", "push", cwd=study)
    sh("git", "add", ".dvc/config", cwd=study)
    sh("git", "commit", "-qm", "remote", cwd=study)
    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(study), str(clone), cwd=tmp_path)
    assert not (clone / "data/init/ssl.pt").exists()
    sh("dvc", "pull", cwd=clone)
    assert "Data and pipelines are up to date" in sh("dvc", "status", cwd=clone).stdout
    assert (clone / "data/init/ssl.pt").read_bytes() == (study / "data/init/ssl.pt").read_bytes()
    assert (clone / "data/prepared/train.npz").read_bytes() == (study / "data/prepared/train.npz").read_bytes()
