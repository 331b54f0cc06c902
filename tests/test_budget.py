"""The time budget's arithmetic on figures whose answer is worked by hand."""
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from stages.bench import augmentation_ops, study_from
from stages.lib import budget, train
from stages.lib import params as params_lib
from stages.lib.simclr import SimCLR
from tests.conftest import REPO, STANDARDIZE, run_module, save_data, synthetic_images, write_params

RATES = budget.Rates(train_views_per_s=1000, augment_views_per_s=4000, infer_images_per_s=2000,
                     decode_images_per_s=100, stage_start_s=5, compile_s=30, checkpoint_s=1, evaluate_s=7)
PRETRAIN = SimpleNamespace(epochs=4, batch_size=100, knn_every=2, checkpoint_seconds=2.0, compile=False)
FINETUNE = SimpleNamespace(max_epochs=3, batch_size=100, equal_steps=True, checkpoint_seconds=60.0, compile=True,
                           head_epochs=0)


def test_budget_rows_are_worked_by_hand():
    study = budget.Study(train_images=1000, unlabeled_images=0, test_images=200, val_images=200,
                         fractions=(1.0, 0.1), seeds=2, modes=("baseline", "ssl"), pretrain=PRETRAIN, finetune=FINETUNE)
    rows, total = budget.study_budget(RATES, study)
    by_stage = {row["stage"]: row for row in rows}
    # data: 1,000 train + 200 test = 1,200 images decoded at 100/s + start-up.
    assert by_stage["data"]["seconds"] == pytest.approx(5 + 12)
    # pretrain: 10 steps x 200 views an epoch at 1/1000 + 1/4000 s a view = 2.5 s; 4 epochs = 10 s;
    # kNN twice over 1,000 images at 2,000/s = 1 s; epochs outlast checkpoint_seconds: a checkpoint after each
    # but the last (run_epochs saves none after it), 3.
    assert by_stage["pretrain"]["seconds"] == pytest.approx(5 + 10 + 1 + 3)
    assert by_stage["pretrain"]["images"] == 4 * 10 * 100 * 2
    # finetune, one mode: equal steps (800 // 100 = 8 a epoch) x 3 epochs x 100 images x 2 fractions x 2 seeds
    # = 9,600 images at 1,000/s; validation 3 x 200 + test 200 = 800 per cell x 4 cells at 2,000/s = 1.6 s.
    finetune = by_stage["finetune x 2 modes"]
    assert finetune["images"] == 2 * 9600
    assert finetune["seconds"] == pytest.approx(2 * (5 + 30 + 9.6 + 1.6))
    assert by_stage["evaluate"]["seconds"] == pytest.approx(12)
    assert total == pytest.approx(17 + 5 + 19 + 5 + 2 * 46.2 + 12)
    assert "**whole study**" in budget.format_budget(rows, total)


class FakeTime:
    """Stands for the time module in stages.lib.train: its monotonic clock moves only when told."""

    def __init__(self):
        self.now = 0.0

    def monotonic(self):
        return self.now


class EpochTask:
    """What run_epochs reads of a Task: one step an epoch, whose end moves the clock on by that epoch's seconds."""

    device, images_per_step, steps_per_epoch = torch.device("cpu"), 1, 1

    def __init__(self, clock, epoch_seconds):
        self.clock, self.epoch_seconds = clock, epoch_seconds

    def step(self, epoch, step):
        return torch.tensor(1.0)

    def end_epoch(self, epoch, mean_loss):
        self.clock.now += self.epoch_seconds[epoch]

    def state(self, epoch, step, loss_sum):
        return {"epoch": epoch, "step": step}


@pytest.mark.parametrize("epochs, epoch_s, checkpoint_seconds, checkpoints", [
    (10, 10.0, 15.0, 4), (20, 4.0, 6.0, 9), (100, 1.0, 1.5, 49), (160, 1.57, 60.0, 4), (5, 2.0, 0.0, 4)])
def test_checkpoints_counted_as_run_epochs_saves_them(monkeypatch, epochs, epoch_s, checkpoint_seconds, checkpoints):
    # run_epochs saves at the end of an epoch once checkpoint_seconds have passed since the last save: with
    # 10 s epochs and 15 s, after epochs 2, 4, 6, 8 (none after the last), not every 15 s of the 90 s (6).
    rates = budget.Rates(**{**vars(RATES), "train_views_per_s": 2000 / epoch_s, "augment_views_per_s": float("inf"),
                            "infer_images_per_s": float("inf")})  # a kNN monitor of no time: see the test below
    pretrain = SimpleNamespace(**{**vars(PRETRAIN), "epochs": epochs, "checkpoint_seconds": checkpoint_seconds})
    rows, _ = budget.study_budget(rates, budget.Study(1000, 0, 200, 200, (1.0,), 1, ("ssl",), pretrain, FINETUNE))
    row = next(r for r in rows if r["stage"] == "pretrain")  # 10 steps x 200 views an epoch, epoch_s seconds
    assert row["epoch_s"] == pytest.approx(epoch_s)
    assert f", {checkpoints} checkpoints" in row["note"]
    # run_epochs itself, on epochs of epoch_s seconds, saves as many
    clock = FakeTime()
    assert run_epochs_saves(monkeypatch, clock, [epoch_s] * epochs, checkpoint_seconds) == checkpoints
    assert clock.now == pytest.approx(epochs * epoch_s)


def run_epochs_saves(monkeypatch, clock, epoch_seconds, checkpoint_seconds):
    """The checkpoints run_epochs saves on epochs of these seconds (on the fake clock)."""
    saves = []
    monkeypatch.setattr(train, "time", clock)
    checkpoint = SimpleNamespace(path=Path("unwritten.pt"), load=lambda: None, save=saves.append)
    train.run_epochs(EpochTask(clock, epoch_seconds), len(epoch_seconds), checkpoint, checkpoint_seconds, "pretrain")
    return len(saves)


@pytest.mark.parametrize("knn_every, compile_, checkpoint_seconds, epoch_seconds, knn_runs, checkpoints", [
    (5, False, 15.0, [10, 10, 10, 10, 40, 10, 10, 10, 10, 40], 2, 5),  # saves after epochs 2, 4, 5, 7, 9
    (10, True, 35.0, [40, 10, 10, 40], 1, 1),  # after epoch 1 (0 if the compile were left out)
    (10, True, 45.0, [40, 10, 40], 1, 1),  # after epoch 2 (0 if the compile were left out or spread over all)
])
def test_checkpoints_count_the_knn_and_compile_on_the_epochs_that_pay_them(
        monkeypatch, knn_every, compile_, checkpoint_seconds, epoch_seconds, knn_runs, checkpoints):
    # 10 s epochs; the kNN monitor (1,000 images at 1000/30 a second: 30 s) runs after every knn_every-th epoch and
    # the last, and compile (30 s) is paid in the first step: run_epochs' clock sees them in those epochs only, not
    # spread over all (in the first case a mean epoch of 16 s would save after every one but the last, 9).
    rates = budget.Rates(**{**vars(RATES), "train_views_per_s": 200.0, "augment_views_per_s": float("inf"),
                            "infer_images_per_s": 1000 / 30})
    pretrain = SimpleNamespace(**{**vars(PRETRAIN), "epochs": len(epoch_seconds), "knn_every": knn_every,
                                  "checkpoint_seconds": checkpoint_seconds, "compile": compile_})
    rows, _ = budget.study_budget(rates, budget.Study(1000, 0, 200, 200, (1.0,), 1, ("ssl",), pretrain, FINETUNE))
    row = next(r for r in rows if r["stage"] == "pretrain")
    assert f"kNN {knn_runs} x, {checkpoints} checkpoints" in row["note"]
    assert row["seconds"] == pytest.approx(5 + sum(epoch_seconds) + checkpoints * 1)
    assert run_epochs_saves(monkeypatch, FakeTime(), epoch_seconds, checkpoint_seconds) == checkpoints


@pytest.mark.parametrize("checkpoint_seconds, checkpoints", [(1.0, 4), (2.0, 1)])
def test_finetune_checkpoints_counted_per_cell(checkpoint_seconds, checkpoints):
    # Each cell is one run_epochs (as counted above): 3 epochs of 8 steps x 100 images at 1,000/s + 200 validation
    # images at 2,000/s = 0.9 s, and the first cell's first epoch also compiles the one classifier (30 s): 30.9 s.
    # checkpoint_seconds 1: the first cell saves after epoch 1, the others after epoch 2, 1 a cell, 4 cells;
    # 2: only the first cell saves, after epoch 1 (none if the compile were left out of its clock).
    finetune = SimpleNamespace(**{**vars(FINETUNE), "checkpoint_seconds": checkpoint_seconds})
    rows, _ = budget.study_budget(RATES, budget.Study(1000, 0, 200, 200, (1.0, 0.1), 2, ("ssl",), PRETRAIN, finetune))
    row = next(r for r in rows if r["stage"].startswith("finetune"))
    assert f", {checkpoints} checkpoints" in row["note"]
    assert row["seconds"] == pytest.approx(5 + 30 + 9.6 + 1.6 + checkpoints * 1)


@pytest.mark.parametrize("head_epochs, compiles", [(0, 1), (1, 2), (2, 2), (3, 1)])
def test_finetune_compiles_again_where_the_backbone_unfreezes(head_epochs, compiles):
    # The 4 cells of the case above (11.2 s; no checkpoint at 1,000 s): torch.compile guards on train/eval, so the
    # first cell compiles again (30 s) after head_epochs (2: in its last epoch), unless the backbone stays frozen all
    # 3 epochs (params refuses that; the budget still counts one compile). test_finetune measures where it compiles.
    finetune = SimpleNamespace(**{**vars(FINETUNE), "head_epochs": head_epochs, "checkpoint_seconds": 1000.0})
    rows, _ = budget.study_budget(RATES, budget.Study(1000, 0, 200, 200, (1.0, 0.1), 2, ("ssl",), PRETRAIN, finetune))
    row = next(r for r in rows if r["stage"].startswith("finetune"))
    assert row["seconds"] == pytest.approx(5 + compiles * 30 + 11.2)


@pytest.mark.parametrize("modes, compiles", [(("linear",), 1), (("baseline", "linear"), 3)])
def test_linear_compiles_once_as_its_backbone_never_unfreezes(modes, compiles):
    # The cells above with head_epochs 1: baseline compiles again in epoch 1 (30 s), linear's backbone stays frozen.
    finetune = SimpleNamespace(**{**vars(FINETUNE), "head_epochs": 1, "checkpoint_seconds": 1000.0})
    rows, _ = budget.study_budget(RATES, budget.Study(1000, 0, 200, 200, (1.0, 0.1), 2, modes, PRETRAIN, finetune))
    row = next(r for r in rows if r["stage"].startswith("finetune"))
    assert row["seconds"] == pytest.approx(len(modes) * (5 + 11.2) + compiles * 30)


def test_a_note_per_mode_where_the_modes_differ():
    # First cell's epochs (0.8 s of steps + 0.1 s validation, 30 s more where it compiles), a checkpoint once 30.5 s
    # have passed: baseline [30.9, 30.9, 0.9] saves 2, linear [30.9, 0.9, 0.9] 1; later cells' 1.8 s save none.
    finetune = SimpleNamespace(**{**vars(FINETUNE), "head_epochs": 1, "checkpoint_seconds": 30.5})
    study = budget.Study(1000, 0, 200, 200, (1.0, 0.1), 2, ("baseline", "linear"), PRETRAIN, finetune)
    row = next(r for r in budget.study_budget(RATES, study)[0] if r["stage"].startswith("finetune"))
    assert row["note"] == ("baseline: 4 cells x 3 epochs, 2 checkpoints, compile; "
                           "linear: 4 cells x 3 epochs, 1 checkpoints, compile")


def test_fewer_images_than_a_batch_take_no_pretraining_time_and_no_checkpoint():
    # 50 images, batch 100: no SimCLR step (the pretrain stage refuses this study; bench still prints its budget)
    rows, _ = budget.study_budget(RATES, budget.Study(50, 0, 20, 20, (1.0,), 1, ("ssl",), PRETRAIN, FINETUNE))
    row = next(r for r in rows if r["stage"] == "pretrain")
    assert row["epoch_s"] == 0 and ", 0 checkpoints" in row["note"]


def test_pretrain_checkpoints_are_due_on_run_epochs_clock_knn_monitor_included():
    # 10 epochs of 10 steps x 200 views at 200 views/s (10 s) + a kNN over 1,000 images each at 1,000/6 a second
    # (6 s): run_epochs' clock sees 16 s epochs, so with checkpoint_seconds 15 a save after each but the last, 9
    # (4 with 10 s epochs, as the parametrized case above).
    rates = budget.Rates(**{**vars(RATES), "train_views_per_s": 200, "augment_views_per_s": float("inf"),
                            "infer_images_per_s": 1000 / 6})
    pretrain = SimpleNamespace(**{**vars(PRETRAIN), "epochs": 10, "knn_every": 1, "checkpoint_seconds": 15.0})
    rows, _ = budget.study_budget(rates, budget.Study(1000, 0, 200, 200, (1.0,), 1, ("ssl",), pretrain, FINETUNE))
    assert ", 9 checkpoints" in next(r for r in rows if r["stage"] == "pretrain")["note"]


def test_checkpoint_seconds_0_saves_after_every_epoch_but_the_last_even_of_no_steps():
    pretrain = SimpleNamespace(**{**vars(PRETRAIN), "checkpoint_seconds": 0.0})  # 4 epochs; 50 images, batch 100
    rows, _ = budget.study_budget(RATES, budget.Study(50, 0, 20, 20, (1.0,), 1, ("ssl",), pretrain, FINETUNE))
    assert ", 3 checkpoints" in next(r for r in rows if r["stage"] == "pretrain")["note"]


def test_fewer_labels_train_fewer_steps_without_equal_steps():
    finetune = SimpleNamespace(**{**vars(FINETUNE), "equal_steps": False})
    study = budget.Study(1000, 0, 200, 200, (1.0, 0.1), 1, ("ssl",), PRETRAIN, finetune)
    rows, _ = budget.study_budget(RATES, study)
    # 800 and 80 labeled images: 8 steps and max(1, 0) = 1 step of 100 per epoch, 3 epochs.
    assert next(r for r in rows if r["stage"].startswith("finetune"))["images"] == (8 + 1) * 3 * 100


README_RATES = budget.Rates(train_views_per_s=67_700, augment_views_per_s=1_000_000, infer_images_per_s=200_000,
                           decode_images_per_s=6_300, stage_start_s=5, compile_s=40, checkpoint_s=0.5, evaluate_s=2)


def readme_study():
    """The study of the default params.yaml on CIFAR-10's counts, as bench reads it."""
    p = params_lib.load(REPO / "params.yaml", "fraction", "data", "model", "pretrain", "finetune")
    return study_from(p, SimpleNamespace(images={"train": 50_000, "test": 10_000}, unlabeled=0))


def test_readme_budget_table_is_the_budget_of_params_yaml_on_its_figures():
    """README's table is study_budget's, from README's figures and the default params.yaml on CIFAR-10's counts."""
    rates, study = README_RATES, readme_study()
    table = budget.format_budget(*budget.study_budget(rates, study))
    readme = (REPO / "README.md").read_text().splitlines()
    assert [line for line in table.splitlines() if line not in readme] == []
    figures = ("67,700 views/s", "1,000,000 views/s", "200,000 images/s", "6,300 images/s", "| 5 s |", "40 s / 0.5 s",
               "| 2 s |")  # the figures above, as README's figures table gives them
    assert [figure for figure in figures if figure not in "\n".join(readme)] == []


def test_readme_sizing_figures_are_the_budget_of_params_yaml_changed():
    """README's prose on what the sizing cost: 30 fine-tuning epochs, 200 SimCLR epochs, and compile's saving at
    issue 10's compiled rate (76,400 views/s), each study_budget's on README's figures."""
    study = readme_study()

    def total(pretrain=None, finetune=None):
        changed = replace(study, pretrain=study.pretrain.model_copy(update=pretrain or {}),
                          finetune=study.finetune.model_copy(update=finetune or {}))
        return budget.study_budget(README_RATES, changed)[1]

    def pretrain_seconds(rates):
        return next(row["seconds"] for row in budget.study_budget(rates, study)[0] if row["stage"] == "pretrain")

    compiled = replace(README_RATES, train_views_per_s=76_400)
    claims = (f"{compiled.train_views_per_s:,} compiled",  # README's figures table
              f"30 would add {total(finetune={'max_epochs': 30}) - total():.0f} s",
              f"200 would take {total(pretrain={'epochs': 200}) / 60:.1f} min",
              f"by {100 * (compiled.train_views_per_s / README_RATES.train_views_per_s - 1):.0f}%",
              f"saves about {pretrain_seconds(README_RATES) - pretrain_seconds(compiled):.0f} s over "
              f"{study.pretrain.epochs} SimCLR epochs")
    readme = " ".join((REPO / "README.md").read_text().split())  # its lines joined
    assert [claim for claim in claims if claim not in readme] == []


def test_benchmark_prints_its_figures_and_the_budget(tmp_path):
    params = write_params(tmp_path / "params.yaml", **{
        "model.width": 4, "pretrain.batch_size": 16, "pretrain.compile": False, "pretrain.proj_hidden": 32,
        "data.val_size": 20})
    data = save_data(tmp_path / "data", synthetic_images(10), synthetic_images(2))  # 100 train, 20 test images
    result = run_module("stages.bench", "--params", params, "--data", data, "--images", "64", "--repeats", "1",
                        "--json", tmp_path / "bench.json")
    assert result.returncode == 0, result.stderr[-2000:]
    figures = json.loads((tmp_path / "bench.json").read_text())
    for key in ("train step views/s", "epoch img/s", "epoch views/s", "inference img/s", "decode img/s",
                "stage start-up s", "augment whole pipeline views/s", "checkpoint write s"):
        assert figures[key] > 0, key
    assert figures["epoch views/s"] == pytest.approx(2 * figures["epoch img/s"], rel=0.01, abs=1)  # rounded apart
    assert [row["stage"] for row in figures["budget"]][:3] == ["data", "split", "pretrain"]
    assert figures["budget"][0]["images"] == 120  # the prepared data's images, not CIFAR-10's 60,000
    assert "| **whole study** |" in result.stdout


@pytest.mark.parametrize("size", [32, 64])
def test_benchmark_times_the_blur_where_the_augmentation_blurs(tmp_path, size):
    """bench's augmentation entries make the views they claim; the blur is timed only at blur_from px or more."""
    path = write_params(tmp_path / "params.yaml", **{"pretrain.augment.blur_from": 64})  # 32 px no, 64 px yes
    cfg = params_lib.load(path, "pretrain").pretrain
    method, generator = SimCLR(cfg, STANDARDIZE), torch.Generator().manual_seed(0)
    task = SimpleNamespace(images=torch.randint(0, 256, (6, 3, size, size), dtype=torch.uint8), images_per_step=4,
                           generator=generator, device=torch.device("cpu"), cfg=cfg, method=method,
                           make_views=lambda images: method.views(images, generator))  # as PretrainTask's on a CPU
    ops = augmentation_ops(task)
    assert ("blur" in ops) == (size == 64)
    for name, (fn, views) in ops.items():
        assert fn().shape[0] == views, name  # (views, 3, H, W) or, grayscale, (views, 1, H, W)
