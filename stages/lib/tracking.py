"""MLflow tracking shared by every stage: one run per stage invocation (per cell it trains, for the fine-tuning stages).

Store: $MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db; a SQLite store keeps
its artifacts beside it (<repo root>/mlartifacts by default). The repo root is $DVC_ROOT
(set by DVC, and pointing at the main repository even for queued experiments run in a
temporary folder), else the git top level, else the current directory.
Experiment: $MLFLOW_EXPERIMENT_NAME or 'ssl-label-budget', tagged as model training (EXPERIMENT_KIND).
Each run is tagged with its DVC stage, experiment and pipeline run (the `dvc` invocation that
ran it: the runs table groups by `dvc.pipeline_run`); each run that reads the prepared arrays logs
that data set as an input.
Several processes may share one SQLite store (parallel queued experiments): its creation
is serialised with a file lock, and busy writes are retried.
"""
import contextlib
import hashlib
import os
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

from stages.lib.cli import UserError, log

DEFAULT_EXPERIMENT = "ssl-label-budget"
# The experiment's kind for MLflow 3: model training, not GenAI (MLflow 3.17's UI picks its view with
# the switch atop its sidebar, though: README, Tracking).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def repo_root():
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    return Path(_git("rev-parse", "--show-toplevel") or ".").resolve()


def _git(*args):
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def tracking_uri():
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def flatten(params, prefix=""):
    """{'a': {'b': 1}} -> {'a.b': 1}; other values (lists too) are kept as they are."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _retry(action, what, attempts=8):
    """Run action(), retrying briefly when a shared SQLite store is busy."""
    for attempt in range(attempts):
        try:
            return action()
        except Exception as error:  # noqa: BLE001 - narrowed below
            if "locked" not in str(error).lower() or attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError(what)


def _experiment_id(mlflow, uri):
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    try:
        experiment = _retry(lambda: mlflow.get_experiment_by_name(name), "read experiment")
        if experiment is not None:
            if EXPERIMENT_KIND[0] not in experiment.tags:  # made before the kind was set
                client = mlflow.MlflowClient()
                _retry(lambda: client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND), "tag experiment")
            return experiment.experiment_id
        location = None
        if uri.startswith("sqlite:///"):  # artifacts beside the database file
            location = (Path(uri[len("sqlite:///"):].split("?")[0]).resolve().parent / "mlartifacts").as_uri()
        elif "://" not in uri:
            location = (repo_root() / "mlartifacts").as_uri()
        return _retry(lambda: mlflow.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND])),
                      "create experiment")
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure here means the store is unusable
        if "already exists" in str(error):  # another process created it first
            return mlflow.get_experiment_by_name(name).experiment_id
        raise UserError(
            f"MLflow tracking store {uri} is not usable ({type(error).__name__}: {str(error).splitlines()[0]}); "
            "start the server or fix MLFLOW_TRACKING_URI (unset it to use the local sqlite store)"
        ) from None


class Run:
    """Thin wrapper over the active MLflow run."""

    def __init__(self, mlflow, run_id):
        self._mlflow, self.run_id = mlflow, run_id

    def log_metrics(self, metrics, step=None):
        values = {k: float(v) for k, v in metrics.items() if v is not None}
        _retry(lambda: self._mlflow.log_metrics(values, step=step), "log metrics")

    def log_artifact(self, path, folder=None):
        self._mlflow.log_artifact(str(path), artifact_path=folder)

    def log_artifacts(self, path, folder=None):
        self._mlflow.log_artifacts(str(path), artifact_path=folder)

    def log_dataset(self, data):
        """Log `data` (from `dataset`) as the run's input: the runs table's Dataset column."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        with warnings.catch_warnings():  # a local path fits two equal source types; either will do
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(data["source"])  # an http(s) URL: HTTPDatasetSource
        dataset = MetaDataset(source, name=data["name"], digest=data["digest"])
        _retry(lambda: self._mlflow.log_input(dataset, context=data["context"]), "log input")


def dataset(facts, context, subset=None):
    """The prepared data as a run input: {name, source, digest, context}, from its facts
    (prepared.DataFacts): the data set's name (cifar10, ... or the local source's file or folder
    name), where it came from (the download URL, or the local path) and the first 8 hex digits of
    the prepared arrays' SHA-256. `subset`, (name, fingerprint of its indices), names the part a run
    trains on, e.g. ('n10', '3fa2...'); its digest is then 8 hex digits of a SHA-256 of that digest
    and the fingerprint.
    """
    name, source = facts.name, facts.url or str(repo_root() / facts.source)  # an absolute path stays as it is
    digest = facts.content_sha256
    if subset is not None:
        name = f"{name}-{subset[0]}"
        digest = hashlib.sha256(f"{digest} {subset[1]}".encode()).hexdigest()
    return {"name": name, "source": source, "digest": digest[:8], "context": context}


def pipeline_run():
    """The `dvc` invocation that runs this stage, as the runs table can group by it: the DVC experiment
    ('workspace' for dvc repro) and when that `dvc` process started. None outside DVC."""
    if "DVC_STAGE" not in os.environ:
        return None
    import psutil  # a DVC dependency

    try:
        process = psutil.Process().parent()
        while process is not None and "dvc" not in [Path(arg).name for arg in process.cmdline()[:3]]:
            process = process.parent()
        if process is None:
            return None
        started = time.localtime(process.create_time())
    except psutil.Error:
        return None
    return f"{os.environ.get('DVC_EXP_NAME', 'workspace')} {time.strftime('%Y-%m-%d %H:%M:%S', started)}"


@contextlib.contextmanager
def _env_defaults(**values):
    """Set environment variables the user has not set, for the duration of the block."""
    added = [key for key in values if key not in os.environ]
    os.environ.update({key: str(values[key]) for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


@contextlib.contextmanager
def _store_lock(uri):
    """Hold an exclusive lock per SQLite store while it is opened: MLflow creates and migrates
    a new database without one, so two processes creating mlflow.db at once can break it."""
    if not uri.startswith("sqlite:"):
        yield
        return
    import fcntl

    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    with open(Path(tempfile.gettempdir()) / f"mlflow-store-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def connect():
    """Check the tracking store before any work starts; return the mlflow module.

    An unreachable server fails in seconds (one retry, short timeout); afterwards the run
    gets MLflow's usual retries, so a blip during a long training run is not fatal."""
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _env_defaults(MLFLOW_HTTP_REQUEST_MAX_RETRIES=1, MLFLOW_HTTP_REQUEST_TIMEOUT=10), _store_lock(uri):
        experiment_id = _experiment_id(mlflow, uri)
    mlflow.set_experiment(experiment_id=experiment_id)
    return mlflow


@contextlib.contextmanager
def stage_run(stage, params, run_name=None, tags=None, data=None):
    """Open an MLflow run for one stage invocation (in a fine-tuning stage, for one cell it trains), logging its
    params, standard tags and the data set it reads (`data`, from `dataset`)."""
    mlflow = connect()
    group = pipeline_run()
    all_tags = {
        "dvc.stage": os.environ.get("DVC_STAGE", stage),
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", "workspace"),
        **({"dvc.pipeline_run": group} if group else {}),
        "git.commit": _git("rev-parse", "HEAD") or "unknown",
        **(tags or {}),
    }
    run = _retry(lambda: mlflow.start_run(run_name=run_name or stage, tags=all_tags), "start run")
    with run:
        flat = {k: str(v) for k, v in flatten(params).items()}
        _retry(lambda: mlflow.log_params(flat), "log params")
        tracked = Run(mlflow, run.info.run_id)
        if data is not None:
            tracked.log_dataset(data)
        log(f"{stage}: MLflow run {run.info.run_id} in {tracking_uri()}")
        yield tracked
