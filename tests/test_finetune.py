"""Fine-tuning: learns on synthetic data, stops early, and starts from the right weights."""
import pytest
import torch

from stages.lib import params as params_lib
from stages.lib import train
from stages.lib.finetuning import FinetuneTask
from stages.lib.models import ResNet, load_backbone, save_backbone
from tests.conftest import synthetic_images, write_params


def finetune_params(tmp_path, **overrides):
    path = write_params(tmp_path / "params.yaml", **{
        "finetune.batch_size": 32, "finetune.compile": False, "finetune.max_epochs": 6, "finetune.patience": 3,
        "finetune.warmup_epochs": 0, "finetune.lr": 0.05, **overrides})
    return params_lib.load(path, "finetune")["finetune"]


def task_data():
    x, y = synthetic_images(24, seed=0)
    images, labels = train.images_to_device(x, torch.device("cpu")), torch.from_numpy(y)
    val = torch.arange(0, len(y), 4)  # every 4th image validates; the rest are labeled
    labeled = torch.tensor([i for i in range(len(y)) if i % 4])
    return {"images": images, "labels": labels, "labeled": labeled, "val_x": images[val], "val_y": labels[val]}


def run(tmp_path, mode, backbone, p):
    data = task_data()
    steps = len(data["labeled"]) // p["batch_size"]
    task = FinetuneTask(data, backbone, mode, p, 0, steps, torch.device("cpu"), 10, on_epoch=lambda row: None)
    train.run_epochs(task, p["max_epochs"], steps, train.Checkpoint(tmp_path / "ck.pt", {}), 100, mode)
    return task


def test_fine_tuning_learns_well_above_chance(tmp_path):
    torch.manual_seed(0)
    task = run(tmp_path, "baseline", ResNet("resnet18", 4), finetune_params(tmp_path, **{"finetune.max_epochs": 10, "finetune.patience": 10}))
    assert task.best_accuracy >= 0.5, task.history  # chance is 0.1
    assert len(task.test_predictions(task_data()["val_x"])) == 60


def test_early_stopping_stops_after_patience(tmp_path):
    torch.manual_seed(0)
    task = run(tmp_path, "linear", ResNet("resnet18", 4), finetune_params(tmp_path, **{"finetune.lr": 1e-12}))
    # Frozen backbone (BatchNorm statistics too) and a learning rate of ~0: validation accuracy
    # never improves after epoch 1.
    assert task.best_epoch == 1 and len(task.history) == 1 + 3


def test_linear_mode_trains_only_the_head(tmp_path):
    torch.manual_seed(0)
    backbone = ResNet("resnet18", 4)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    task = run(tmp_path, "linear", backbone, finetune_params(tmp_path, **{"finetune.max_epochs": 2}))
    for key, value in task.model.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # weights and BatchNorm statistics


@pytest.mark.parametrize("mode", ["ssl", "baseline"])
def test_each_mode_starts_from_its_own_weights_file(tmp_path, mode):
    torch.manual_seed(1)
    save_backbone(tmp_path / "ssl.pt", ResNet("resnet18", 4), origin="simclr", params={})
    torch.manual_seed(2)
    save_backbone(tmp_path / "baseline.pt", ResNet("resnet18", 4), origin="random", params={})
    backbone, saved = load_backbone(tmp_path / f"{mode}.pt", "resnet18", 4)
    data = task_data()
    task = FinetuneTask(data, backbone, mode, finetune_params(tmp_path), 0, 1, torch.device("cpu"), 10,
                        on_epoch=lambda row: None)
    other = load_backbone(tmp_path / ("baseline.pt" if mode == "ssl" else "ssl.pt"), "resnet18", 4)[1]
    weight = task.model.backbone.state_dict()["stem.0.weight"]
    torch.testing.assert_close(weight, saved["state_dict"]["stem.0.weight"], rtol=0, atol=0)
    assert not torch.equal(weight, other["state_dict"]["stem.0.weight"])
