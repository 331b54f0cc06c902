"""Bad input, faults and interruptions, as a careless user would cause them.

Every failure is one clear line (the last on stderr) naming the culprit, exit code 2 for
bad input or params and 1 for other failures, no traceback unless asked for, and no output
or temporary file left behind. A signal during training saves a checkpoint, and the next
run resumes to exactly the weights of a run that was never interrupted.

Most cases call the library in-process (fast); a representative set runs every stage's
command line as a subprocess to check the exit-code and no-traceback contract.
"""
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from stages.lib import cifar, params, splits, study, train
from stages.lib.cli import StageError, UserError, run_stage
from stages.lib.io import atomic_path, removed_on_failure
from stages.lib.models import ResNet, load_backbone, save_backbone
from tests.conftest import REPO, make_archive, png_bytes, run_module, synthetic_images, write_params, write_tree

# A study small enough for seconds on a CPU (see tests/test_pipeline.py).
TINY = {
    "data.val_size": 40, "fraction": [1.0], "model.width": 4,
    "pretrain.epochs": 3, "pretrain.batch_size": 32, "pretrain.compile": False, "pretrain.warmup_epochs": 1,
    "pretrain.proj_hidden": 32, "pretrain.proj_dim": 16, "pretrain.knn_every": 1, "pretrain.checkpoint_every": 1,
    "finetune.max_epochs": 2, "finetune.batch_size": 32, "finetune.compile": False, "finetune.checkpoint_every": 1,
    "evaluate.bootstrap_samples": 100,
}


# ---------------------------------------------------------------------------------------------
# Helpers


def last_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def leftovers(root):
    """Temporaries of atomic writes (.<name>.tmp-<pid>) anywhere under root."""
    return sorted(str(p) for p in Path(root).rglob(".*.tmp-*"))


def assert_failed(result, code, culprits, outputs=(), root=None):
    """The CLI contract: exit code, culprit named on the last stderr line, no traceback, nothing left."""
    line = last_line(result.stderr)
    assert result.returncode == code, result.stderr
    assert line.startswith("error: "), result.stderr
    for culprit in culprits:
        assert str(culprit) in line, f"{culprit!r} not in last line: {line}"
    assert "Traceback" not in result.stderr, result.stderr
    for path in outputs:
        assert not Path(path).exists(), f"{path} left behind"
    if root is not None:
        assert leftovers(root) == []


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory):
    """One MLflow store for the module's subprocesses (created once), artifacts kept in a temp dir."""
    root = tmp_path_factory.mktemp("mlflow")
    # One thread per process: the reference runs go on in the background beside the tests.
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "DVC_ROOT": str(root),
            "OMP_NUM_THREADS": "1"}


def prepare_project(root):
    """params.yaml (TINY), prepared data, splits and init weights (baseline, ssl, and ssl of width 8)."""
    root.mkdir(parents=True, exist_ok=True)
    params_path = write_params(root / "params.yaml", **TINY)
    train, test = synthetic_images(16, seed=1), synthetic_images(4, seed=2)
    cifar.save_prepared(root / "data", {"train": train, "test": test}, {"classes": list(cifar.CLASSES)})
    val, labeled = splits.make_splits(train[1], TINY["data.val_size"], TINY["fraction"], 0)
    splits.save_splits(root / "splits", val, labeled)
    p = params.load(params_path, "seed", "model")
    for name, origin, width in (("baseline", "random", 4), ("ssl", "simclr", 4), ("wide", "simclr", 8)):
        torch.manual_seed(0)
        save_backbone(root / "init" / f"{name}.pt", ResNet("resnet18", width), origin=origin, params=p)
    return root


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return prepare_project(tmp_path_factory.mktemp("project"))


def edited_params(path, edit, **overrides):
    """Write the repository's params.yaml, TINY-sized and changed by edit(dict), to path."""
    write_params(path, **{**TINY, **overrides})
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _parent(raw, dotted):
    """(the mapping that holds a dotted key, the key's last part)."""
    *parents, key = dotted.split(".")
    for name in parents:
        raw = raw[name]
    return raw, key


def setter(dotted, value):
    def edit(raw):
        node, key = _parent(raw, dotted)
        node[key] = value

    return edit


def deleter(dotted):
    def edit(raw):
        node, key = _parent(raw, dotted)
        del node[key]

    return edit


def renamer(old, new):
    def edit(raw):
        raw[new] = raw.pop(old)

    return edit


# ---------------------------------------------------------------------------------------------
# 1. Params: type and range of every key, unknown and missing keys, broken files


PARAM_CASES = [
    ("fraction-zero", setter("fraction", 0), ["fraction = 0", "(0, 1]"]),
    ("fraction-above-one", setter("fraction", [1.0, 1.5]), ["fraction = [1.0, 1.5]", "(0, 1]"]),
    ("fraction-repeated", setter("fraction", [0.5, 0.5]), ["fraction", "distinct"]),
    ("fraction-empty", setter("fraction", []), ["fraction = []", "non-empty"]),
    ("seed-negative", setter("seed", -1), ["seed = -1", ">= 0"]),
    ("seed-bool", setter("seed", True), ["seed = True", "integer"]),
    ("val-size-text", setter("data.val_size", "5000"), ["data.val_size = '5000'", "integer"]),
    ("limit-tiny", setter("data.limit", 3), ["data.limit = 3", "null or"]),
    ("source-empty", setter("data.source", ""), ["data.source = ''", "non-empty"]),
    ("arch-unknown", setter("model.arch", "resnet50"), ["model.arch = 'resnet50'", "resnet18, resnet34"]),
    ("width-float", setter("model.width", 6.5), ["model.width = 6.5", "integer >= 4"]),
    ("epochs-zero", setter("pretrain.epochs", 0), ["pretrain.epochs = 0", ">= 1"]),
    ("batch-one", setter("pretrain.batch_size", 1), ["pretrain.batch_size = 1", ">= 2"]),
    ("temperature-zero", setter("pretrain.temperature", 0.0), ["pretrain.temperature = 0.0", "> 0"]),
    ("temperature-nan", setter("pretrain.temperature", float("nan")), ["pretrain.temperature = nan", "> 0"]),
    ("lr-negative", setter("pretrain.lr", -0.1), ["pretrain.lr = -0.1", "> 0"]),
    ("optimizer-unknown", setter("pretrain.optimizer", "adam"), ["pretrain.optimizer = 'adam'", "sgd, lars"]),
    ("flip-p-above-one", setter("pretrain.flip_p", 1.5), ["pretrain.flip_p = 1.5", "[0, 1]"]),
    ("grayscale-p-negative", setter("pretrain.grayscale_p", -0.2), ["pretrain.grayscale_p = -0.2", "[0, 1]"]),
    ("crop-scale-one", setter("pretrain.crop_scale_min", 1.0), ["pretrain.crop_scale_min = 1.0", "(0, 1)"]),
    ("compile-text", setter("pretrain.compile", "maybe"), ["pretrain.compile = 'maybe'", "true or false"]),
    ("patience-zero", setter("finetune.patience", 0), ["finetune.patience = 0", ">= 1"]),
    ("max-epochs-text", setter("finetune.max_epochs", "ten"), ["finetune.max_epochs = 'ten'", ">= 1"]),
    ("mode-unknown", setter("finetune.modes", ["ssl", "sll"]), ["finetune.modes = ['ssl', 'sll']", "baseline, ssl"]),
    ("seeds-negative", setter("finetune.seeds", [0, -1]), ["finetune.seeds = [0, -1]", ">= 0"]),
    ("confidence-one", setter("evaluate.confidence", 1.0), ["evaluate.confidence = 1.0", "(0, 1)"]),
    ("section-typo", renamer("fraction", "fractions"), ["fractions: unknown key", "did you mean fraction?"]),
    ("top-level-extra", setter("learning_rate", 0.1), ["learning_rate: unknown key", "allowed: seed"]),
    ("key-typo", lambda raw: raw["pretrain"].update(epoch=raw["pretrain"].pop("epochs")),
     ["pretrain.epoch: unknown key", "did you mean pretrain.epochs?"]),
    ("key-missing", deleter("pretrain.temperature"), ["pretrain.temperature is missing", "> 0"]),
    ("section-missing", deleter("model"), ["model is missing", "a section with keys arch, width"]),
    ("section-not-mapping", setter("pretrain", 5), ["pretrain = 5", "a section with keys epochs"]),
]


@pytest.mark.parametrize("edit, culprits", [case[1:] for case in PARAM_CASES], ids=[c[0] for c in PARAM_CASES])
def test_bad_params_are_named(tmp_path, edit, culprits):
    path = edited_params(tmp_path / "params.yaml", edit)
    with pytest.raises(UserError) as error:
        params.load(path, *params.SCHEMA)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for culprit in culprits:
        assert culprit in message


BROKEN_FILES = [
    ("empty", "", ["is empty", "seed, fraction"]),
    ("comments-only", "# nothing here\n", ["is empty"]),
    ("a-list", "- seed\n- fraction\n", ["mapping", "not a list"]),
    ("a-string", "just some text\n", ["mapping", "not a str"]),
    ("bad-yaml", "seed: 0\nfraction: [1.0, 0.5\n", ["not valid YAML", "line 3"]),
    ("bad-indent", "seed: 0\n  fraction: 1.0\n", ["not valid YAML", "line 2"]),
    ("not-utf8", b"seed: \xff\xfe\x00\n", ["not valid YAML"]),
]


@pytest.mark.parametrize("content, culprits", [c[1:] for c in BROKEN_FILES], ids=[c[0] for c in BROKEN_FILES])
def test_broken_params_file_is_named(tmp_path, content, culprits):
    path = tmp_path / "params.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as error:
        params.load(path, "seed")
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    for culprit in culprits:
        assert culprit in str(error.value)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(UserError, match="params file not found: .*nowhere.yaml"):
        params.load(tmp_path / "nowhere.yaml", "seed")


def test_exponent_without_dot_is_a_number(tmp_path):
    """YAML 1.2 (and DVC's -S) read 1e-3 as a number; PyYAML alone would read text."""
    path = write_params(tmp_path / "params.yaml", **TINY)
    path.write_text(path.read_text().replace("  lr: 0.24", "  lr: 1e-3").replace("  lr: 0.1", "  lr: 2E-2"))
    p = params.load(path, "pretrain", "finetune")
    assert p["pretrain"]["lr"] == 0.001 and p["finetune"]["lr"] == 0.02


# ---------------------------------------------------------------------------------------------
# 2. Data: every bad source names the file or folder


def tree(tmp_path, top="cifar10"):
    write_tree(tmp_path / "tree", n_train=2, n_test=1, top=top)
    return tmp_path / "tree"


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def replace_image(root, rel, data):
    target = root / rel
    target.write_bytes(data)
    return root


def jpeg_bytes(size=32):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 120, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def empty_class(tmp_path):
    root = tree(tmp_path) / "cifar10"
    for image in (root / "test" / "frog").iterdir():
        image.unlink()
    return root


def two_trees(tmp_path):
    root = tree(tmp_path)
    write_tree(root, n_train=2, n_test=1, top="copy")
    return root


def without(tmp_path, rel):
    root = tree(tmp_path) / "cifar10"
    shutil.rmtree(root / rel)
    return root


def extra_class(root):
    mkdir(root / "cifar10/test/unicorn")
    (root / "cifar10/test/unicorn/0000.png").write_bytes(png_bytes(synthetic_images(1)[0][0]))
    return root


def write(path, data):
    path.write_bytes(data)
    return path


def mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


IMAGE = "cifar10/train/cat/0007.png"  # the cat of write_tree(n_train=2): images 6 and 7

DATA_CASES = [
    ("missing-path", lambda t: t / "nowhere.tar.gz", ["nowhere.tar.gz", "does not exist"]),
    ("truncated-tar-gz", lambda t: truncated(make_archive(tree(t), t / "c.tar.gz")), ["c.tar.gz", "truncated"]),
    ("truncated-tar", lambda t: truncated(make_archive(tree(t), t / "c.tar")), ["c.tar", "truncated"]),
    ("truncated-zip", lambda t: truncated(make_archive(tree(t), t / "c.zip")), ["c.zip", "truncated"]),
    ("random-bytes-tar-gz", lambda t: write(t / "c.tar.gz", os.urandom(4096)), ["c.tar.gz", "not a valid archive"]),
    ("text-as-zip", lambda t: write(t / "c.zip", b"hello, I am text\n"), ["c.zip", "not a valid archive"]),
    ("unsupported-suffix", lambda t: make_archive(tree(t), t / "c.tar").rename(t / "c.rar"),
     ["c.rar", "not a directory or a .tar"]),
    ("empty-directory", lambda t: mkdir(t / "empty"), ["empty", "no train/<class>/ images"]),
    ("no-test", lambda t: without(t, "test"), ["cifar10", "no test/<class>/ images"]),
    ("no-train", lambda t: without(t, "train"), ["cifar10", "no train/<class>/ images"]),
    ("class-missing", lambda t: without(t, "train/frog"), ["train/ class folders", "missing: frog"]),
    ("class-empty", empty_class, ["test/ class folders", "empty: frog"]),
    ("class-extra", lambda t: extra_class(tree(t)), ["test/ class folders", "unexpected: unicorn"]),
    ("two-trees", two_trees, ["several train/ and test/", "cifar10", "copy"]),
    ("text-as-png", lambda t: replace_image(tree(t), IMAGE, b"not an image\n"), [IMAGE, "not a readable image"]),
    ("truncated-png", lambda t: replace_image(tree(t), IMAGE, png_bytes(synthetic_images(1)[0][0])[:200]),
     [IMAGE, "not a readable image"]),
    ("truncated-jpeg", lambda t: replace_image(tree(t), IMAGE.replace(".png", ".jpg"), jpeg_bytes()[:300]),
     [IMAGE.replace(".png", ".jpg"), "not a readable image"]),
    ("not-32x32", lambda t: replace_image(tree(t), IMAGE, png_bytes(np.zeros((64, 48, 3), np.uint8))),
     [IMAGE, "48x64", "32x32"]),
    ("bad-image-in-archive", lambda t: make_archive(replace_image(tree(t), IMAGE, b"junk"), t / "c.zip"),
     [f"{IMAGE} in ", "c.zip", "not a readable image"]),
]


@pytest.mark.parametrize("build, culprits", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_source_is_named(tmp_path, build, culprits):
    source = build(tmp_path)
    with pytest.raises(UserError) as error:
        cifar.read_source(str(source), tmp_path / "download")
    assert "\n" not in str(error.value)
    for culprit in culprits:
        assert culprit in str(error.value)


@pytest.fixture
def fake_torchvision(monkeypatch):
    """Stand-in torchvision.datasets whose CIFAR10 is set by the test (no torch import, no network)."""
    datasets = types.ModuleType("torchvision.datasets")
    package = types.ModuleType("torchvision")
    package.datasets = datasets
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", datasets)
    return datasets


@pytest.mark.parametrize("error", [
    urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
    RuntimeError("File not found or corrupted."),
    ConnectionResetError("Connection reset by peer"),
], ids=["unreachable", "corrupted", "reset"])
def test_failed_download_says_how_to_use_a_local_copy(tmp_path, fake_torchvision, error):
    def cifar10(root, train, download):
        raise error

    fake_torchvision.CIFAR10 = cifar10
    with pytest.raises(UserError) as raised:
        cifar.read_source("torchvision", tmp_path / "download")
    message = str(raised.value)
    assert "could not download" in message and "data.source" in message and str(tmp_path / "download") in message
    assert str(error) in message


def test_torchvision_classes_in_another_order_are_refused(tmp_path, fake_torchvision):
    fake_torchvision.CIFAR10 = lambda root, train, download: types.SimpleNamespace(
        classes=list(reversed(cifar.CLASSES)), data=np.zeros((1, 32, 32, 3), np.uint8), targets=[0])
    with pytest.raises(UserError, match="truck.*not in CIFAR-10 label order"):
        cifar.read_source("torchvision", tmp_path / "download")


# ---------------------------------------------------------------------------------------------
# 3. Pipeline: weights and checkpoints that do not fit


def test_bad_weights_files_are_refused(project, tmp_path):
    (tmp_path / "garbage.pt").write_bytes(os.urandom(1000))
    torch.save([1, 2, 3], tmp_path / "list.pt")
    tampered = torch.load(project / "init/ssl.pt", weights_only=False)
    tampered["state_dict"].pop("stem.0.weight")
    torch.save(tampered, tmp_path / "tampered.pt")
    cases = [("missing.pt", "not found"), ("garbage.pt", "not a readable PyTorch file"),
             ("list.pt", "not a backbone weights file"), ("tampered.pt", "does not hold resnet18 width 4 weights")]
    for name, culprit in cases:
        with pytest.raises(UserError) as error:
            load_backbone(tmp_path / name, "resnet18", 4)
        assert str(tmp_path / name) in str(error.value) and culprit in str(error.value)
    with pytest.raises(UserError, match="width 8 weights, but params ask for resnet18 width 4"):
        load_backbone(project / "init/wide.pt", "resnet18", 4)


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train.Checkpoint(path, {"pretrain": {"lr": 0.1}}).save({"epoch": 1, "step": 0})
    with pytest.raises(UserError, match=f"checkpoint {path} was written with other params"):
        train.Checkpoint(path, {"pretrain": {"lr": 0.2}}).load()
    assert train.Checkpoint(path, {"pretrain": {"lr": 0.1}}).load()["epoch"] == 1
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        train.Checkpoint(path, {}).load()


def npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


PREPARED_FILES = [
    ("truncated", lambda: npz_bytes(x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))[:300]),
    ("garbage", lambda: os.urandom(500)),
    ("npy-inside", lambda: npy_bytes(np.zeros((4, 32, 32, 3), np.uint8))),
    ("key-missing", lambda: npz_bytes(images=np.zeros((4, 32, 32, 3), np.uint8))),
    ("wrong-shape", lambda: npz_bytes(x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))),
]


@pytest.mark.parametrize("content", [c[1] for c in PREPARED_FILES], ids=[c[0] for c in PREPARED_FILES])
def test_bad_prepared_data_is_named(tmp_path, content):
    (tmp_path / "train.npz").write_bytes(content())
    with pytest.raises(UserError, match=f"{tmp_path / 'train.npz'}.*rerun: dvc repro -f data"):
        cifar.load_prepared(tmp_path, "train")


def test_bad_fine_tune_results_are_named(tmp_path):
    (tmp_path / "n10_s0.npz").write_bytes(npz_bytes(y_true=np.zeros(5), y_pred=np.zeros(5))[:100])
    with pytest.raises(UserError, match="n10_s0.npz is not a test predictions file"):
        study.read_predictions(tmp_path / "n10_s0.npz")
    (tmp_path / "n10_s0.csv").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(UserError, match="n10_s0.csv is not a CSV file"):
        study.read_curve(tmp_path / "n10_s0.csv")


class NaNTask:
    """A stand-in training task whose loss becomes NaN at (epoch, step)."""

    def __init__(self, bad):
        self.device, self.bad, self.weight, self.images_per_step = torch.device("cpu"), bad, 0.0, 1

    def restore(self, state):
        self.weight = state["weight"]
        return state["epoch"], state["step"], state["loss_sum"]

    def state(self, epoch, step, loss_sum):
        return {"epoch": epoch, "step": step, "loss_sum": loss_sum, "weight": self.weight}

    def step(self, epoch, step):
        self.weight += 1
        return torch.tensor(float("nan") if (epoch, step) == self.bad else 1.0)

    def end_epoch(self, epoch, mean_loss):
        return False


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    checkpoint = train.Checkpoint(tmp_path / "checkpoint.pt", {"config": 1})
    with pytest.raises(StageError) as error:
        train.run_epochs(NaNTask(bad=(2, 3)), 5, 6, checkpoint, 1, "pretrain")
    assert "loss is nan at epoch 3, step 4" in str(error.value)
    assert f"the last good checkpoint is {tmp_path / 'checkpoint.pt'}" in str(error.value)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert (saved["epoch"], saved["step"], saved["weight"]) == (2, 0, 12)  # after epoch 2, before the NaN


# ---------------------------------------------------------------------------------------------
# 4. Atomic outputs


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("previous result")
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert (tmp_path / "out" / "old.txt").read_text() == "previous result"


def test_temporaries_of_killed_processes_are_cleaned(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".weights.pt.tmp-{dead.stdout.strip()}"
    stale.write_bytes(b"half a file")
    alive = tmp_path / f".weights.pt.tmp-{os.getppid()}"  # a running process's write is left alone
    alive.write_bytes(b"in progress")
    with atomic_path(tmp_path / "weights.pt") as tmp:
        tmp.write_bytes(b"whole")
    assert not stale.exists() and alive.exists()
    assert (tmp_path / "weights.pt").read_bytes() == b"whole"


def test_sigterm_cleans_up_temporaries_and_exits_with_a_message(tmp_path, capsys):
    def run(args):
        with atomic_path(tmp_path / "out") as tmp:
            tmp.mkdir()
            (tmp / "half.npz").write_bytes(b"half")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the signal interrupts this

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        run_stage("demo", "a demo stage", lambda parser: None, run, [])
    assert exit_info.value.code == 1
    assert last_line(capsys.readouterr().err) == "error: demo interrupted by SIGTERM; run it again"
    assert list(tmp_path.iterdir()) == [] and signal.getsignal(signal.SIGTERM) == before


def test_outputs_are_removed_when_a_stage_fails_after_writing(tmp_path):
    out = tmp_path / "summary.json"
    with pytest.raises(KeyboardInterrupt), removed_on_failure(out):
        out.write_text("{}")
        raise KeyboardInterrupt("SIGTERM")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 5/6. Every stage's command line: exit code, last line, no traceback, no output left


def bad_image_archive(base):
    write_tree(base / "tree", n_train=2, n_test=1)
    (base / "tree/cifar10/test/dog/0005.png").write_bytes(png_bytes(synthetic_images(1)[0][0])[:150])
    return make_archive(base / "tree", base / "bad.tar.gz")


def data_args(root, case, edit=lambda raw: None, **params_edits):
    path = edited_params(mkdir(root / case) / "params.yaml", edit, **params_edits)
    return ["--params", path, "--out", root / case / "out", "--download-dir", root / case / "download"]


def pretrain_args(root, case, **params_edits):
    path = write_params(mkdir(root / case) / "params.yaml", **{**TINY, **params_edits})
    out = root / case
    return ["--params", path, "--data", root / "data", "--val", root / "splits/val.npy",
            "--out", out / "ssl.pt", out / "linear.pt", "--metrics", out / "pretrain.json",
            "--curve", out / "pretrain.csv", "--checkpoint", out / "checkpoint.pt"]


def finetune_args(root, case, init, mode="ssl"):
    out = mkdir(root / case)
    return ["--params", root / "params.yaml", "--mode", mode, "--init", init, "--data", root / "data",
            "--splits", root / "splits", "--out", out / "out", "--curves", out / "curves", "--work", out / "work"]


def evaluate_args(root, case, plots_dir_is_a_file=False, **params_edits):
    from tests.test_evaluate import fabricate_cell, fabricate_data

    base = mkdir(root / case)
    for mode in ("baseline", "ssl"):
        fabricate_cell(base, mode, 1.0, 0, 0.6, epochs=3)
    fabricate_data(base, "synthetic")
    write_params(base / "params.yaml", **{**TINY, **params_edits})
    if plots_dir_is_a_file:
        (base / "plots").write_text("not a folder")
    return ["--params", base / "params.yaml", "--finetune", base / "finetune", "--curves", base / "curves",
            "--data", base / "data", "--pretrain", base / "pretrain.json",
            "--metrics-dir", base / "metrics", "--plots-dir", base / "plots", "--samples", base / "samples.png"]


# (id, module, args(project root, case name), exit code, culprits on the last line, outputs
# (in the case's folder) that must not exist)
CLI_CASES = [
    ("data-typo-top-level", "stages.data", lambda r, c: data_args(r, c, renamer("fraction", "fractions")),
     2, ["params.yaml", "fractions: unknown key", "did you mean fraction?"], ["out"]),
    ("data-bad-image-in-test", "stages.data",
     lambda r, c: data_args(r, c, **{"data.source": str(bad_image_archive(r / c))}),
     2, ["cifar10/test/dog/0005.png in ", "bad.tar.gz", "not a readable image"], ["out"]),
    ("split-fraction-zero", "stages.split",
     lambda r, c: ["--params", write_params(mkdir(r / c) / "params.yaml", **{**TINY, "fraction": [0.5, 0]}),
                   "--data", r / "data", "--out", r / c / "out"],
     2, ["fraction = [0.5, 0]", "(0, 1]"], ["out"]),
    ("split-missing-data", "stages.split",
     lambda r, c: ["--params", r / "params.yaml", "--data", r / "nodata", "--out", r / c / "out"],
     2, ["nodata/train.npz", "not found"], ["out"]),
    ("init-unknown-arch", "stages.init_weights",
     lambda r, c: ["--params", write_params(mkdir(r / c) / "params.yaml", **{**TINY, "model.arch": "resnet50"}),
                   "--out", r / c / "baseline.pt"],
     2, ["model.arch = 'resnet50'", "resnet18, resnet34"], ["baseline.pt"]),
    ("pretrain-batch-above-data", "stages.pretrain", lambda r, c: pretrain_args(r, c, **{"pretrain.batch_size": 1000}),
     2, ["pretrain.batch_size = 1000", "160 training images"], ["ssl.pt", "pretrain.json", "checkpoint.pt"]),
    ("pretrain-nan-loss", "stages.pretrain",
     lambda r, c: pretrain_args(r, c, **{"pretrain.lr": 1e30, "pretrain.warmup_epochs": 0}),
     1, ["loss is", "at epoch 1, step", "lower learning rate"],
     ["ssl.pt", "linear.pt", "pretrain.json", "pretrain.csv"]),
    ("finetune-ssl-without-weights", "stages.finetune", lambda r, c: finetune_args(r, c, r / "init/none.pt"),
     2, ["init/none.pt", "not found"], ["out", "curves"]),
    ("finetune-ssl-other-width", "stages.finetune", lambda r, c: finetune_args(r, c, r / "init/wide.pt"),
     2, ["init/wide.pt", "width 8", "width 4"], ["out", "curves"]),
    ("finetune-ssl-random-weights", "stages.finetune", lambda r, c: finetune_args(r, c, r / "init/baseline.pt"),
     2, ["init/baseline.pt", "random weights", "mode ssl needs simclr"], ["out", "curves"]),
    ("evaluate-confidence", "stages.evaluate", lambda r, c: evaluate_args(r, c, **{"evaluate.confidence": 1.5}),
     2, ["evaluate.confidence = 1.5", "(0, 1)"], ["metrics/summary.json"]),
    ("evaluate-fails-after-writing", "stages.evaluate", lambda r, c: evaluate_args(r, c, plots_dir_is_a_file=True),
     1, ["evaluate-fails-after-writing/plots"], ["metrics/summary.json", "metrics/comparison.json",
                                                 "metrics/per_class.json", "metrics/report.md"]),
]


@pytest.mark.parametrize("case, module, make_args, code, culprits, outputs", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_stage_fails_with_one_clear_line(project, stage_env, case, module, make_args, code, culprits, outputs):
    result = run_module(module, *make_args(project, case), env=stage_env)
    assert_failed(result, code, culprits, [project / case / o for o in outputs], root=project / case)


@pytest.mark.parametrize("how", ["--debug", "SSL_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, stage_env, how):
    path = edited_params(tmp_path / "params.yaml", setter("fraction", 0))
    env = {**stage_env, "SSL_DEBUG": "1"} if how == "SSL_DEBUG=1" else stage_env
    args = ["--params", path, "--data", tmp_path / "data", "--out", tmp_path / "splits"]
    result = run_module("stages.split", *args, *(["--debug"] if how == "--debug" else []), env=env)
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert last_line(result.stderr).startswith("error: ") and "fraction = 0" in last_line(result.stderr)


def test_unknown_mode_is_a_usage_error(project, stage_env):
    result = run_module("stages.finetune", *finetune_args(project, "usage", project / "init/ssl.pt", mode="simclr"),
                        env=stage_env)
    assert result.returncode == 2 and "invalid choice: 'simclr'" in last_line(result.stderr)
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------------------
# 5. Interruptions: SIGINT / SIGTERM save a checkpoint; kill -9 loses at most a few epochs;
#    the resumed run ends with exactly the weights of an uninterrupted one


class Running:
    """A stage run in the background whose stderr lines are collected as they come."""

    def __init__(self, module, args, env):
        self.proc = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern, timeout=120):
        """Wait for a stderr line matching the regular expression `pattern`."""
        deadline, marker = time.monotonic() + timeout, re.compile(pattern)
        while not any(marker.search(line) for line in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                self.reader.join(5)
                raise AssertionError(f"{pattern!r} never came:\n" + "\n".join(self.lines))
            time.sleep(0.01)

    def finish(self, timeout=120):
        self.proc.wait(timeout)
        self.reader.join(10)
        return self.proc.returncode, "\n".join(self.lines)


def epoch_done(label, epoch):
    """A log line that ends the epoch: 'pretrain epoch 1: loss ...' or a full progress bar."""
    return rf"^{label} epoch {epoch}(/\d+)?(: loss| \[#{{20}}\])"


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module", autouse=True)
def references(project, stage_env):
    """The uninterrupted runs that resumed ones must match. They take a while, so they start in
    the background with the module, and only the tests that compare with them wait for them."""
    runs = {"pretrain": Running("stages.pretrain", pretrain_args(project, "reference"), stage_env),
            "finetune": Running("stages.finetune", finetune_args(project, "ft-reference", project / "init/ssl.pt"),
                                stage_env)}
    yield runs
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
        run.finish()


def finished(references, name):
    code, stderr = references[name].finish(timeout=300)
    assert code == 0, stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_pretraining_resumes_to_the_same_weights(project, stage_env, references, sig):
    case = f"pretrain-{sig.name}"
    args, out = pretrain_args(project, case), project / case
    running = Running("stages.pretrain", args, stage_env)
    # kill -9 gives no chance to save: wait for a periodic checkpoint (every epoch here).
    running.wait_for(epoch_done("pretrain", 2 if sig == signal.SIGKILL else 1))
    running.proc.send_signal(sig)
    code, stderr = running.finish()
    if sig == signal.SIGKILL:
        assert code == -signal.SIGKILL
    else:
        assert code == 1 and "Traceback" not in stderr, stderr
        line = last_line(stderr)
        assert f"stopped by {sig.name}" in line and f"checkpoint saved to {out / 'checkpoint.pt'}" in line, line
    assert (out / "checkpoint.pt").exists()
    assert not (out / "ssl.pt").exists() and not (out / "pretrain.json").exists()

    resumed = run_module("stages.pretrain", *args, env=stage_env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoint.pt'}" in resumed.stderr
    finished(references, "pretrain")
    assert_same_weights(weights(out / "ssl.pt"), weights(project / "reference/ssl.pt"))
    assert not (out / "checkpoint.pt").exists() and leftovers(out) == []


def test_interrupted_finetuning_resumes_to_the_same_result(project, stage_env, references):
    args, out = finetune_args(project, "ft-sigint", project / "init/ssl.pt"), project / "ft-sigint"
    running = Running("stages.finetune", args, stage_env)
    running.wait_for(epoch_done("ssl n100_s0", 1))
    running.proc.send_signal(signal.SIGINT)
    code, stderr = running.finish()
    assert code == 1 and "Traceback" not in stderr, stderr
    assert "stopped by SIGINT" in last_line(stderr) and "checkpoint saved to" in last_line(stderr)
    assert (out / "work/n100_s0/checkpoint.pt").exists() and not (out / "out").exists()

    resumed = run_module("stages.finetune", *args, env=stage_env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    finished(references, "finetune")
    with np.load(out / "out/n100_s0.npz") as got, np.load(project / "ft-reference/out/n100_s0.npz") as want:
        np.testing.assert_array_equal(got["y_pred"], want["y_pred"])
    got, want = (json.loads((d / "out/n100_s0.json").read_text()) for d in (out, project / "ft-reference"))
    assert {k: v for k, v in got.items() if k != "seconds"} == {k: v for k, v in want.items() if k != "seconds"}
    curves = [study.read_curve(d / "curves/n100_s0.csv") for d in (out, project / "ft-reference")]
    for column in ("epoch", "val_loss", "val_accuracy", "lr"):
        np.testing.assert_array_equal(curves[0][column], curves[1][column])
    np.testing.assert_allclose(curves[0]["train_loss"], curves[1]["train_loss"], rtol=1e-6)
    assert not (out / "work").exists() and leftovers(out) == []
