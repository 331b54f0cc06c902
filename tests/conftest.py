"""Shared test helpers: synthetic CIFAR-like data (no ../shared needed) and an isolated MLflow store."""
import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.lib.augment import Standardize
from stages.lib.sources import CIFAR10_CLASSES

CLASSES = tuple(CIFAR10_CLASSES)  # CIFAR-10's label order (alphabetical, as a folder copy sorts them)
REPO = Path(__file__).resolve().parents[1]
SHARED_ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
STANDARDIZE = Standardize((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))  # CIFAR-like statistics for the tests


@pytest.fixture(autouse=True)
def isolated_mlflow(tmp_path, monkeypatch):
    """Every test gets its own MLflow store, never the repository's mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.delenv("DVC_ROOT", raising=False)
    return tmp_path / "mlflow.db"


def synthetic_images(n_per_class, seed=0):
    """Images whose class is visible (a class-specific colour and stripe), so models can learn them."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(len(CLASSES)):
        base = np.zeros((32, 32, 3), dtype=np.float32)
        base[..., label % 3] = 80 + 17 * label
        base[:, (3 * label) % 32 : (3 * label) % 32 + 3, :] = 255
        for _ in range(n_per_class):
            noise = rng.normal(0, 20, size=(32, 32, 3))
            images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def save_data(root, train, test, source="synthetic", sha256=None, url=None, classes=CLASSES, unlabeled=None):
    """Prepared data as the data stage writes it (arrays and their facts) from (x, y) pairs and optional
    unlabeled images x; returns root."""
    from stages.lib import prepared

    arrays = {"train": train, "test": test, **({} if unlabeled is None else {"unlabeled": unlabeled})}
    facts = prepared.data_facts(arrays, classes, source=source, url=url, sha256=sha256, test_split="official",
                                limit=None)
    prepared.save_prepared(root, arrays, facts)
    return Path(root)


def prepared_split(data_dir, split):
    """A split of the prepared data in data_dir, as a stage loads it (its facts read first)."""
    from stages.lib import prepared

    return prepared.load_prepared(data_dir, split, prepared.read_facts(data_dir))


def png_bytes(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_tree(root, n_train=6, n_test=3, top="cifar10"):
    """Write an ImageFolder tree root/top/{train,test}/<class>/NNNN.png; return the arrays."""
    arrays = {"train": synthetic_images(n_train, seed=1), "test": synthetic_images(n_test, seed=2)}
    for split, (x, y) in arrays.items():
        for i, (image, label) in enumerate(zip(x, y)):
            path = Path(root) / top / split / CLASSES[label] / f"{i:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(png_bytes(image))
    return arrays


def make_archive(tree_root, out_path):
    """Pack tree_root's content into a .tar.gz, .tar or .zip (by out_path's suffix)."""
    out_path = Path(out_path)
    if out_path.suffix == ".zip":
        with zipfile.ZipFile(out_path, "w") as archive:
            for path in sorted(Path(tree_root).rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(tree_root).as_posix())
    else:
        mode = "w:gz" if out_path.name.endswith(".gz") else "w"
        with tarfile.open(out_path, mode) as archive:
            for child in sorted(Path(tree_root).iterdir()):
                archive.add(child, arcname=child.name)
    return out_path


@pytest.fixture
def synthetic_archive(tmp_path):
    """A .tar.gz of a small synthetic CIFAR-10 tree (10 classes x 30 train, x 10 test)."""
    write_tree(tmp_path / "tree", n_train=30, n_test=10)
    return make_archive(tmp_path / "tree", tmp_path / "cifar.tar.gz")


@pytest.fixture
def fake_torchvision(monkeypatch):
    """Stand-in torchvision.datasets whose classes the test sets (no torch import, no network)."""
    datasets = types.ModuleType("torchvision.datasets")
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return datasets


def run_module(module, *args, cwd=REPO, env=None, timeout=600):
    """Run `python -m module args` and return the CompletedProcess (text)."""
    return subprocess.run(
        [sys.executable, "-m", module, *map(str, args)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )


def pretrain_argv(params, data, val, out, checkpoint, outs=("ssl.pt",)):
    """The pretrain stage's arguments (strings), its outputs `outs`, metrics and curves in the folder `out`."""
    args = ["--params", params, "--data", data, "--val", val, "--out", *(out / name for name in outs),
            "--metrics", out / "pretrain.json", "--curve", out / "pretrain.csv",
            "--knn-curve", out / "pretrain_knn.csv", "--checkpoint", checkpoint]
    return [str(arg) for arg in args]


def finetune_argv(params, mode, init, data, splits, root):
    """The finetune stage's arguments (strings), its out/, curves/ and work/ in the folder `root`."""
    args = ["--params", params, "--mode", mode, "--init", init, "--data", data, "--splits", splits,
            "--out", root / "out", "--curves", root / "curves", "--work", root / "work"]
    return [str(arg) for arg in args]


def interrupt_steps(task, stop_at=None, crash_at=None):
    """Wrap `task.step`: at (epoch, step) `stop_at` send this process SIGINT, as Ctrl-C does (that step still
    runs); at `crash_at` raise RuntimeError instead of the step, as a kill -9 would end it. Returns task."""
    run_step = task.step

    def interrupted_step(epoch, step):
        if (epoch, step) == stop_at:
            os.kill(os.getpid(), signal.SIGINT)
        if (epoch, step) == crash_at:
            raise RuntimeError("simulated kill -9")
        return run_step(epoch, step)

    task.step = interrupted_step
    return task


def copy_project(dest):
    """Copy the project's code and pipeline (not its data or stores) into dest."""
    dest = Path(dest)
    shutil.copytree(REPO / "stages", dest / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        if (REPO / name).exists():
            shutil.copy(REPO / name, dest / name)
    return dest


def write_params(path, **overrides):
    """Write the repository's params.yaml to path with dotted-key overrides (data__limit=... or 'data.limit')."""
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for dotted, value in overrides.items():
        keys = dotted.replace("__", ".").split(".")
        node = params
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value
    Path(path).write_text(yaml.safe_dump(params, sort_keys=False))
    return Path(path)


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory):
    """One MLflow store for a module's stage subprocesses, artifacts in a temp dir, one thread each."""
    root = tmp_path_factory.mktemp("mlflow")
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DVC_ROOT": str(root),
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Tiny params, prepared data, splits and init weights for running single stages (tests.faults)."""
    from tests.faults import prepare_project

    return prepare_project(tmp_path_factory.mktemp("project"))


def paired_correct(only_a, only_b, both=5, neither=5):
    """Bool arrays (n,) of two models' correctness on the same test images, with `only_a` images only a
    gets right, `only_b` only b, `both` both and `neither` neither (McNemar's discordant counts)."""
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    return np.array(a), np.array(b)
