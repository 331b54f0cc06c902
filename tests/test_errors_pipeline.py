"""Pipeline faults: weights and checkpoints that do not fit, bad intermediate files, NaN losses, atomic outputs."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from stages.lib import study, train
from stages.lib.cli import StageError, UserError, run_stage
from stages.lib.io import atomic_path, removed_on_failure
from stages.lib.models import load_backbone
from tests.conftest import prepared_split, save_data, synthetic_images
from tests.faults import (
    last_line, npy_bytes, npz_bytes,
)


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
            load_backbone(tmp_path / name, "resnet18", 4, "cifar")
        assert str(tmp_path / name) in str(error.value) and culprit in str(error.value)
    with pytest.raises(UserError, match="width 8 weights with the cifar stem, but params ask for resnet18 width 4"):
        load_backbone(project / "init/wide.pt", "resnet18", 4, "cifar")


def test_checkpoint_of_another_config_is_not_resumed(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train.Checkpoint(path, {"pretrain": {"lr": 0.1}}).save({"epoch": 1, "step": 0})
    with pytest.raises(UserError, match=f"checkpoint {path} was written with other params"):
        train.Checkpoint(path, {"pretrain": {"lr": 0.2}}).load()
    assert train.Checkpoint(path, {"pretrain": {"lr": 0.1}}).load()["epoch"] == 1
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="not a readable PyTorch file"):
        train.Checkpoint(path, {}).load()



PREPARED_FILES = [
    ("truncated", lambda: npz_bytes(x=np.zeros((4, 32, 32, 3), np.uint8), y=np.zeros(4, np.int64))[:300]),
    ("garbage", lambda: os.urandom(500)),
    ("npy-inside", lambda: npy_bytes(np.zeros((4, 32, 32, 3), np.uint8))),
    ("key-missing", lambda: npz_bytes(images=np.zeros((4, 32, 32, 3), np.uint8))),
    ("wrong-shape", lambda: npz_bytes(x=np.zeros((4, 28, 28), np.uint8), y=np.zeros(4, np.int64))),
]


@pytest.mark.parametrize("content", [c[1] for c in PREPARED_FILES], ids=[c[0] for c in PREPARED_FILES])
def test_bad_prepared_data_is_named(tmp_path, content):
    save_data(tmp_path, synthetic_images(1), synthetic_images(1))
    (tmp_path / "train.npz").write_bytes(content())
    with pytest.raises(UserError, match=f"{tmp_path / 'train.npz'}.*rerun: dvc repro -f data"):
        prepared_split(tmp_path, "train")


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
        self.steps_per_epoch = 6

    def restore(self, state):
        self.weight = state["weight"]
        return state["epoch"], state["step"], state["loss_sum"]

    def state(self, epoch, step, loss_sum):
        return {"epoch": epoch, "step": step, "loss_sum": loss_sum, "weight": self.weight}

    def step(self, epoch, step):
        self.weight += 1
        return torch.tensor(float("nan") if (epoch, step) == self.bad else 1.0)

    def end_epoch(self, epoch, mean_loss):
        pass


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    checkpoint = train.Checkpoint(tmp_path / "checkpoint.pt", {"config": 1})
    with pytest.raises(StageError) as error:
        train.run_epochs(NaNTask(bad=(2, 3)), 5, checkpoint, 0, "pretrain")
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


