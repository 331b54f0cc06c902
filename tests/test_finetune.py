"""Fine-tuning: learns on synthetic data, keeps the best epoch, freezes what it should, and every
cell starts from its own weights although one classifier serves every cell of a process."""
import functools

import pytest
import torch

from stages import finetune as finetune_stage
from stages.lib import params as params_lib
from stages.lib import splits, train
from stages.lib.cli import StageError, UserError
from stages.lib.finetuning import FinetuneTask, build_classifier, compile_epochs
from stages.lib.models import ResNet, load_backbone, load_into, read_weights, save_backbone, save_backbones
from tests.conftest import STANDARDIZE, finetune_argv, interrupt_steps, save_data, synthetic_images, write_params

CPU = torch.device("cpu")


def finetune_params(tmp_path, **overrides):
    path = write_params(tmp_path / "params.yaml", **{
        "finetune.batch_size": 32, "finetune.compile": False, "finetune.max_epochs": 6,
        "finetune.warmup_epochs": 0, "finetune.lr": 0.05, "finetune.backbone_lr_scale": 1.0,
        "finetune.head_epochs": 0, **overrides})
    return params_lib.load(path, "finetune").finetune


def task_data():
    x, y = synthetic_images(24, seed=0)
    images, labels = train.images_to_device(x, CPU), torch.from_numpy(y)
    val = torch.arange(0, len(y), 4)  # every 4th image validates; the rest are labeled
    labeled = torch.tensor([i for i in range(len(y)) if i % 4])
    return {"images": images, "labels": labels, "labeled": labeled, "val_x": images[val], "val_y": labels[val]}


def copy_of(backbone):
    """A `start` callable that loads `backbone`'s weights."""
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    return lambda target: target.load_state_dict(state)


def make_task(mode, start, p, seed=0, classifier=None, on_epoch=lambda row: None):
    data = task_data()
    steps = len(data["labeled"]) // p.batch_size
    classifier = classifier or build_classifier(ResNet("resnet18", 4, "cifar"), 10, mode, p, CPU)
    return FinetuneTask(data, classifier, start, mode, p, STANDARDIZE, seed, steps, CPU, on_epoch=on_epoch)


def run(tmp_path, task, p):
    train.run_epochs(task, p.max_epochs, train.Checkpoint(tmp_path / "ck.pt", {}),
                     100_000, task.mode)
    return task


def test_fine_tuning_learns_and_keeps_the_best_epoch(tmp_path):
    torch.manual_seed(0)
    p = finetune_params(tmp_path, **{"finetune.max_epochs": 10})
    task = run(tmp_path, make_task("baseline", copy_of(ResNet("resnet18", 4, "cifar")), p), p)
    assert task.best_accuracy >= 0.5, task.history  # chance is 0.1
    assert len(task.history) == 10  # the whole schedule runs: it ends at max_epochs
    accuracies = [row["val_accuracy"] for row in task.history]
    assert task.best_epoch == accuracies.index(max(accuracies)) + 1
    assert task.history[-1]["lr"] < 0.01 * p.lr  # the cosine schedule has annealed
    assert len(task.test_predictions(task_data()["val_x"])) == 60


@pytest.mark.parametrize("mode, head_epochs", [("baseline", 0), ("ssl", 1), ("ssl", 2), ("linear", 1)])
def test_the_one_classifier_compiles_where_the_budget_counts_it(tmp_path, monkeypatch, mode, head_epochs):
    """torch.compile guards on train/eval: the classifier compiles in the first cell's first epoch and again in the
    epoch its backbone unfreezes (head_epochs), never in a later cell (its guards hold), where the budget charges it."""
    from torch._dynamo.utils import counters
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model: compile_(model, backend="eager"))  # dynamo's graphs only
    torch._dynamo.reset()
    counters.clear()
    p = finetune_params(tmp_path, **{"finetune.compile": True, "finetune.max_epochs": 3,
                                     "finetune.head_epochs": head_epochs})
    classifier = build_classifier(ResNet("resnet18", 4, "cifar"), 10, mode, p, CPU)
    graphs = []  # dynamo's graphs so far, after each epoch of each cell
    for cell in range(2):
        task = make_task(mode, copy_of(ResNet("resnet18", 4, "cifar")), p, cell, classifier,
                         on_epoch=lambda row: graphs.append(counters["stats"]["unique_graphs"]))
        train.run_epochs(task, p.max_epochs, train.Checkpoint(tmp_path / f"ck{cell}.pt", {}), 100_000, mode)
    # the epochs in which a graph was added: 0-2 are the first cell's, 3-5 the second's
    compiled_in = [i for i, n in enumerate(graphs) if n > ([0] + graphs)[i]]
    assert compiled_in == sorted(compile_epochs(mode, p)), graphs
    assert graphs[-1] == len(compile_epochs(mode, p)), graphs  # one graph in each such epoch, as the budget charges one


def test_linear_mode_trains_only_the_head(tmp_path):
    torch.manual_seed(0)
    backbone = ResNet("resnet18", 4, "cifar")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    p = finetune_params(tmp_path, **{"finetune.max_epochs": 2})
    task = make_task("linear", copy_of(backbone), p)
    head_before = task.model.head.weight.clone()
    run(tmp_path, task, p)
    for key, value in task.model.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)  # weights and BatchNorm statistics
    assert not torch.equal(task.model.head.weight, head_before)  # while the head trains
    # Its result reports what ran: no backbone lr, every epoch head-only.
    assert {group["part"] for group in task.optimizer.param_groups} == {"head"}
    reported = finetune_stage.settings(task)
    assert (reported["backbone_lr"], reported["head_epochs"]) == (0.0, len(task.history))
    ssl = finetune_stage.settings(make_task("ssl", copy_of(backbone), p))
    assert ssl["backbone_lr"] == p.lr * p.backbone_lr_scale


def test_head_epochs_freeze_the_backbone_then_release_it(tmp_path):
    torch.manual_seed(0)
    backbone = ResNet("resnet18", 4, "cifar")
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    p = finetune_params(tmp_path, **{"finetune.max_epochs": 3, "finetune.head_epochs": 2})
    task = make_task("ssl", copy_of(backbone), p)
    head_before = task.model.head.weight.clone()
    train.run_epochs(task, 2, train.Checkpoint(tmp_path / "a.pt", {}), 100_000, "ssl")
    for key, value in task.model.backbone.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not torch.equal(task.model.head.weight, head_before)
    # Epochs 1-3 again (no checkpoint; the head is already trained): two head-only, then one that trains
    # the backbone.
    train.run_epochs(task, 3, train.Checkpoint(tmp_path / "b.pt", {}), 100_000, "ssl")
    assert not torch.equal(task.model.backbone.stem[0].weight, before["stem.0.weight"])


@pytest.mark.parametrize("mode, head_epochs, fresh_momentum", [("ssl", 1, [0, 0, 1]), ("ssl", 0, [0, 1, 1]),
                                                              ("linear", 1, [0, 0, 0])])
def test_the_backbone_starts_training_without_the_head_epochs_momentum(tmp_path, mode, head_epochs, fresh_momentum):
    """Head-only epochs still build the backbone's momentum (its gradients flow at lr 0); the epoch where the backbone
    unfreezes drops it, so training starts from none. Per epoch: 1 where every backbone parameter has momentum as
    the epoch starts, 0 where none has (`linear` never trains its backbone)."""
    p = finetune_params(tmp_path, **{"finetune.max_epochs": 3, "finetune.head_epochs": head_epochs})
    task = make_task(mode, copy_of(ResNet("resnet18", 4, "cifar")), p)
    params, start_epoch, found = list(task.model.backbone.parameters()), task.start_epoch, []

    def start_and_count(epoch, fresh):
        start_epoch(epoch, fresh)
        found.append(sum(param in task.optimizer.state for param in params) / len(params))

    task.start_epoch = start_and_count
    train.run_epochs(task, p.max_epochs, train.Checkpoint(tmp_path / "m.pt", {}), 100_000, mode)
    assert found == fresh_momentum


@pytest.mark.parametrize("interrupt, error, message", [
    ({"stop_at": (0, 4)}, StageError, "stopped by SIGINT at epoch 1, step 5"),
    ({"stop_at": (1, 1)}, StageError, "stopped by SIGINT at epoch 2, step 2"),
    ({"crash_at": (1, 1)}, RuntimeError, "simulated kill -9"),
], ids=["on-an-epochs-last-step", "as-the-backbone-starts", "crash-after-the-head-epochs"])
def test_resume_after_a_stop_equals_an_uninterrupted_cell(tmp_path, interrupt, error, message):
    """A stop on an epoch's last step checkpoints (epoch, steps_per_epoch): the resume runs only that epoch's
    end. A stop inside the first epoch that trains the backbone keeps the momentum it had built by then. A crash
    in that epoch resumes from the checkpoint at its start (step 0): the backbone starts training afresh, without
    the momentum the head-only epochs left in the checkpoint (checkpoint_seconds 0: one after every epoch but the
    last)."""
    p = finetune_params(tmp_path, **{"finetune.max_epochs": 3, "finetune.head_epochs": 1})
    backbone = ResNet("resnet18", 4, "cifar")

    def cell(name, **interrupt):
        task = interrupt_steps(make_task("ssl", copy_of(backbone), p), **interrupt)
        train.run_epochs(task, p.max_epochs, train.Checkpoint(tmp_path / name, {}), 0, "ssl")
        return task

    reference = cell("a.pt")
    assert reference.steps_per_epoch == 5
    with pytest.raises(error, match=message):
        cell("b.pt", **interrupt)
    resumed = cell("b.pt")
    assert len(resumed.history) == 3
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    assert ([row["val_loss"] for row in resumed.history]
            == pytest.approx([row["val_loss"] for row in reference.history], abs=1e-6))


def test_backbone_learning_rate_is_scaled(tmp_path):
    p = finetune_params(tmp_path, **{"finetune.backbone_lr_scale": 0.1})
    task = make_task("ssl", copy_of(ResNet("resnet18", 4, "cifar")), p)
    task.step(0, 0)
    lrs = {group["part"]: group["lr"] for group in task.optimizer.param_groups}
    assert lrs["backbone"] == pytest.approx(0.1 * lrs["head"]) and lrs["head"] > 0


def test_cells_sharing_one_classifier_start_from_identical_weights(tmp_path):
    """One compiled classifier serves every cell of a process; each cell still starts afresh."""
    torch.manual_seed(0)
    backbones = {0: ResNet("resnet18", 4, "cifar"), 1: ResNet("resnet18", 4, "cifar")}
    save_backbones(tmp_path / "baseline.pt", backbones, "random", {})
    saved = read_weights(tmp_path / "baseline.pt", "resnet18", 4, "cifar")
    p = finetune_params(tmp_path, **{"finetune.max_epochs": 1})

    def start(seed):
        return functools.partial(load_into, saved=saved, seed=seed, path=tmp_path / "baseline.pt")

    fresh = {k: v.clone() for k, v in make_task("baseline", start(0), p).model.state_dict().items()}
    shared = build_classifier(ResNet("resnet18", 4, "cifar"), 10, "baseline", p, CPU)
    run(tmp_path, make_task("baseline", start(0), p, classifier=shared), p)  # a first cell trains it
    second = make_task("baseline", start(0), p, classifier=shared)  # the next cell, same seed
    for key, value in second.model.state_dict().items():
        torch.testing.assert_close(value, fresh[key], rtol=0, atol=0)
    other_seed = make_task("baseline", start(1), p, seed=1, classifier=shared).model.state_dict()
    assert not torch.equal(other_seed["backbone.stem.0.weight"], fresh["backbone.stem.0.weight"])
    assert not torch.equal(other_seed["head.weight"], fresh["head.weight"])


@pytest.mark.parametrize("mode", ["ssl", "baseline"])
def test_each_mode_starts_from_its_own_weights_file(tmp_path, mode):
    torch.manual_seed(1)
    save_backbone(tmp_path / "ssl.pt", ResNet("resnet18", 4, "cifar"), origin="simclr", params={})
    torch.manual_seed(2)
    save_backbones(tmp_path / "baseline.pt", {0: ResNet("resnet18", 4, "cifar")}, origin="random", params={})
    backbone, saved = load_backbone(tmp_path / f"{mode}.pt", "resnet18", 4, "cifar")
    in_file = saved["seeds"][0] if mode == "baseline" else saved["state_dict"]  # the tensors as written
    task = make_task(mode, copy_of(backbone), finetune_params(tmp_path))
    other = load_backbone(tmp_path / ("baseline.pt" if mode == "ssl" else "ssl.pt"), "resnet18", 4, "cifar")[0]
    weight = task.model.backbone.state_dict()["stem.0.weight"]
    torch.testing.assert_close(weight, backbone.state_dict()["stem.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(weight, in_file["stem.0.weight"], rtol=0, atol=0)
    assert not torch.equal(weight, other.state_dict()["stem.0.weight"])


def test_a_seed_without_starting_weights_is_refused(tmp_path):
    save_backbones(tmp_path / "baseline.pt", {0: ResNet("resnet18", 4, "cifar")}, origin="random", params={})
    with pytest.raises(UserError, match="starting weights for seeds \\[0\\], not for seed 3"):
        load_backbone(tmp_path / "baseline.pt", "resnet18", 4, "cifar", seed=3)


def test_a_finished_cell_of_other_data_is_not_reused(tmp_path, monkeypatch, capsys):
    """A finished cell's result.json is reused on data of the same pixels (in another folder), not on data of
    other pixels (same params, weights, image counts, labels and splits): its config carries the data's digest."""
    trained, run_epochs = [], train.run_epochs  # the data folder of each cell that trained

    def record(task, *args):
        trained.append(data.name)  # this run's data folder
        run_epochs(task, *args)

    def stop(*args):
        raise StageError("stopped before publishing: the finished cell stays in --work")

    monkeypatch.setattr(train, "run_epochs", record)
    monkeypatch.setattr(finetune_stage, "publish", stop)
    val, labeled = splits.make_splits(synthetic_images(4)[1], 10, [1.0], seed=0)
    splits.save_splits(tmp_path / "splits", val, labeled)
    params = write_params(tmp_path / "params.yaml", **{
        "fraction": [1.0], "model.width": 4, "finetune.seeds": [0], "finetune.max_epochs": 1,
        "finetune.batch_size": 16, "finetune.compile": False})
    save_backbones(tmp_path / "baseline.pt", {0: ResNet("resnet18", 4, "cifar")}, origin="random", params={})
    for run, pixels_seed in enumerate((0, 0, 1)):
        data = save_data(tmp_path / f"data{run}", synthetic_images(4, seed=pixels_seed), synthetic_images(1, seed=9))
        with pytest.raises(SystemExit):
            finetune_stage.main(finetune_argv(params, "baseline", tmp_path / "baseline.pt", data,
                                              tmp_path / "splits", tmp_path))
    assert capsys.readouterr().err.count("stopped before publishing") == 3  # each run got there
    assert trained == ["data0", "data2"]
