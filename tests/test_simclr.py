"""SimCLR pieces: NT-Xent against the paper, augmentations, backbone, and CPU pretraining."""
import math

import numpy as np
import pytest
import torch

from stages.lib import params as params_lib
from stages.lib import splits, train
from stages.lib.augment import SimCLRAugment, SupervisedAugment
from stages.lib.cli import StageError, UserError
from stages.lib.knn import KNNMonitor
from stages.lib.losses import nt_xent
from stages.lib.models import ResNet
from stages.lib.params import SupervisedAugmentParams
from stages.lib.pretraining import Method, PretrainTask
from stages.lib.simclr import SimCLR
from tests.conftest import (
    REPO, STANDARDIZE, interrupt_steps, pretrain_argv, save_data, synthetic_images, write_params,
)


def nt_xent_reference(z1, z2, temperature):
    """Algorithm 1 of Chen et al. (2020), written as loops: views 2k-1 and 2k are a pair."""
    z = []
    for a, b in zip(z1, z2):
        z += [a, b]
    n = len(z)

    def sim(u, v):
        return float(torch.dot(u, v) / (torch.linalg.norm(u) * torch.linalg.norm(v)))

    def loss(i, j):
        denominator = sum(math.exp(sim(z[i], z[k]) / temperature) for k in range(n) if k != i)
        return -math.log(math.exp(sim(z[i], z[j]) / temperature) / denominator)

    return sum(loss(2 * k, 2 * k + 1) + loss(2 * k + 1, 2 * k) for k in range(n // 2)) / n


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_paper_reference(temperature):
    generator = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    assert nt_xent(z1, z2, temperature).item() == pytest.approx(nt_xent_reference(z1, z2, temperature), rel=1e-5)


def test_nt_xent_of_identical_views_is_log_of_negatives():
    z = torch.ones(4, 3)  # every view identical: all similarities are 1
    assert nt_xent(z, z.clone(), 0.5).item() == pytest.approx(math.log(2 * 4 - 1), rel=1e-6)


def test_nt_xent_is_symmetric_and_has_gradients():
    z1 = torch.randn(8, 16, requires_grad=True)
    z2 = torch.randn(8, 16, requires_grad=True)
    loss = nt_xent(z1, z2, 0.2)
    assert loss.item() == pytest.approx(nt_xent(z2, z1, 0.2).item(), rel=1e-6)
    loss.backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_nt_xent_prefers_matching_pairs():
    z = torch.nn.functional.one_hot(torch.arange(8), 8).float()
    assert nt_xent(z, z, 0.1) < nt_xent(z, z.roll(1, 0), 0.1)


@pytest.fixture
def simclr_augment():
    return SimCLRAugment(params_lib.load(REPO / "params.yaml", "pretrain").pretrain.augment, STANDARDIZE)


def test_simclr_augment_shape_dtype_range(simclr_augment):
    images = torch.from_numpy(synthetic_images(4)[0]).permute(0, 3, 1, 2).contiguous()
    views = simclr_augment(images, torch.Generator().manual_seed(0))
    assert views.shape == images.shape and views.dtype == torch.float32
    assert torch.isfinite(views).all()
    # Standardized from [0, 1]: bounded by (0 - mean) / std and (1 - mean) / std.
    assert views.min() >= -2.0 - 1e-5 and views.max() <= 2.2


def test_two_views_differ_and_seed_repeats(simclr_augment):
    images = torch.from_numpy(synthetic_images(2)[0]).permute(0, 3, 1, 2).contiguous()
    generator = torch.Generator().manual_seed(1)
    first, second = simclr_augment(images, generator), simclr_augment(images, generator)
    assert (first - second).abs().mean() > 0.1
    again = simclr_augment(images, torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, again)


def test_supervised_augment_shifts_and_flips():
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    augment = SupervisedAugment(SupervisedAugmentParams(crop_padding=4, flip_p=0.5), STANDARDIZE)
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    plain = SupervisedAugment(SupervisedAugmentParams(crop_padding=0, flip_p=0.0), STANDARDIZE)
    torch.testing.assert_close(plain(images, torch.Generator().manual_seed(0)), STANDARDIZE.images(images))


def test_simclr_is_a_method_and_its_loss_is_nt_xent():
    cfg = params_lib.load(REPO / "params.yaml", "pretrain").pretrain
    method = SimCLR(cfg, STANDARDIZE)
    assert isinstance(method, Method) and method.views_per_image == 2
    images = torch.from_numpy(synthetic_images(3)[0]).permute(0, 3, 1, 2).contiguous()  # (30, 3, 32, 32)
    views = method.views(images, torch.Generator().manual_seed(0))
    assert views.shape == (60, 3, 32, 32)
    z = torch.randn(60, cfg.proj_dim)
    assert method.loss(z, 30).item() == pytest.approx(nt_xent(z[:30], z[30:], cfg.temperature).item())
    assert method.head(32)(torch.randn(4, 32)).shape == (4, cfg.proj_dim)


def test_a_method_must_give_every_part():
    class Incomplete(Method):
        name, views_per_image = "incomplete", 2

        def views(self, images, generator):
            return images

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()


def make_task(tmp_path, epochs=3, knn_every=1):
    x, y = synthetic_images(16, seed=0)
    images = train.images_to_device(x, torch.device("cpu"))
    labels = torch.from_numpy(y)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = write_params(tmp_path / "params.yaml", **{
        "pretrain.epochs": epochs, "pretrain.batch_size": 32, "pretrain.compile": False,
        "pretrain.proj_hidden": 32, "pretrain.warmup_epochs": 1, "pretrain.knn_every": knn_every,
    })
    p = params_lib.load(path, "pretrain").pretrain
    monitor = KNNMonitor(images[::2], labels[::2], images[1::2], labels[1::2], 10, STANDARDIZE, p.knn_k,
                         p.knn_temperature)
    torch.manual_seed(0)
    task = PretrainTask(SimCLR(p, STANDARDIZE), images, ResNet("resnet18", 4, "cifar"), monitor, p, 0,
                        torch.device("cpu"), on_epoch=lambda row: None)
    return task, p


def pretrain(tmp_path, stop_at=None, crash_at=None, epochs=3, knn_every=1):
    """Run (or resume) a tiny pretraining; optionally send SIGINT or crash at (epoch, step)."""
    task, p = make_task(tmp_path, epochs, knn_every)
    interrupt_steps(task, stop_at, crash_at)
    checkpoint = train.Checkpoint(tmp_path / "ck.pt", {"p": p.model_dump()})
    train.run_epochs(task, p.epochs, checkpoint, 0, "pretrain")
    return task


def test_pretraining_loss_decreases(tmp_path):
    losses = [row["loss"] for row in pretrain(tmp_path, epochs=4).history]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("epochs, knn_runs", [(4, [False, True, False, True]), (3, [False, True, True])])
def test_the_knn_monitor_runs_every_knn_every_epochs_and_after_the_last(tmp_path, epochs, knn_runs):
    history = pretrain(tmp_path, epochs=epochs, knn_every=2).history
    assert [row["knn_accuracy"] is not None for row in history] == knn_runs


def test_interrupt_and_resume_equals_uninterrupted(tmp_path):
    reference = pretrain(tmp_path / "a")
    with pytest.raises(StageError, match="stopped by SIGINT"):
        pretrain(tmp_path / "b", stop_at=(1, 2))
    assert (tmp_path / "b" / "ck.pt").exists()
    resumed = pretrain(tmp_path / "b")
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in reference.history], abs=1e-6)


def test_a_stop_on_an_epochs_last_step_resumes_at_its_end(tmp_path):
    reference = pretrain(tmp_path / "a")
    with pytest.raises(StageError, match="stopped by SIGINT at epoch 2, step 5"):
        pretrain(tmp_path / "b", stop_at=(1, 4))
    saved = torch.load(tmp_path / "b" / "ck.pt", weights_only=False)
    assert (saved["epoch"], saved["step"]) == (1, 5) and saved["epoch_seconds"] > 0
    resumed = pretrain(tmp_path / "b")
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)
    assert resumed.history[1]["seconds"] >= saved["epoch_seconds"]  # the epoch's seconds before the stop count


def test_crash_resumes_from_last_periodic_checkpoint(tmp_path):
    reference = pretrain(tmp_path / "a")
    with pytest.raises(RuntimeError):
        pretrain(tmp_path / "b", crash_at=(2, 1))  # epochs 1 and 2 were checkpointed
    resumed = pretrain(tmp_path / "b")
    for key, value in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, rtol=0, atol=0)


def test_a_pretrain_checkpoint_of_other_data_is_refused(tmp_path, monkeypatch):
    """The pretrain stage's checkpoint on data of other pixels (same params, image count, labels and
    validation split) is refused; on data of the same pixels, in another folder, it is resumed."""
    from stages import pretrain as stage

    checkpoints = []  # the Checkpoint each stage run would resume

    def record(task, epochs, checkpoint, checkpoint_seconds, label):
        checkpoints.append(checkpoint)
        raise StageError("stopped before training")

    monkeypatch.setattr(train, "run_epochs", record)
    val, labeled = splits.make_splits(synthetic_images(16)[1], 40, [1.0], seed=0)
    splits.save_splits(tmp_path / "splits", val, labeled)
    params = write_params(tmp_path / "params.yaml", **{
        "model.width": 4, "pretrain.batch_size": 32, "pretrain.compile": False, "pretrain.proj_hidden": 32})
    out = tmp_path / "out"
    for run, pixels_seed in enumerate((0, 0, 1)):
        data = save_data(tmp_path / f"data{run}", synthetic_images(16, seed=pixels_seed), synthetic_images(1, seed=9))
        with pytest.raises(SystemExit):
            stage.main(pretrain_argv(params, data, tmp_path / "splits/val.npy", out, tmp_path / "checkpoint.pt"))
    made, same_data, other_data = checkpoints
    made.save({"epoch": 1, "step": 0})
    assert same_data.load()["epoch"] == 1
    with pytest.raises(UserError, match="was written with other params or data"):
        other_data.load()


def test_lr_schedule_warms_up_then_decays():
    lrs = np.array([train.lr_at(s, 100, 10, 1.0) for s in range(100)])
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert np.all(np.diff(lrs[10:]) <= 1e-12) and lrs[-1] < 0.01


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_on_gpu_is_finite_in_float32(simclr_augment):
    images = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8, device="cuda")
    views = simclr_augment(images, torch.Generator(device="cuda").manual_seed(0))
    assert views.dtype == torch.float32 and torch.isfinite(views).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_pretraining_with_bf16_compile_and_channels_last(tmp_path):
    x, y = synthetic_images(64, seed=0)
    device = torch.device("cuda")
    images, labels = train.images_to_device(x, device), torch.from_numpy(y).to(device)
    path = write_params(tmp_path / "params.yaml", **{"pretrain.epochs": 2, "pretrain.batch_size": 128,
                                                     "pretrain.knn_every": 1, "pretrain.compile": True})
    p = params_lib.load(path, "pretrain").pretrain
    monitor = KNNMonitor(images[::2], labels[::2], images[1::2], labels[1::2], 10, STANDARDIZE, p.knn_k,
                         p.knn_temperature)
    task = PretrainTask(SimCLR(p, STANDARDIZE), images, ResNet("resnet18", 16, "cifar"), monitor, p, 0, device,
                        on_epoch=lambda row: None)
    train.run_epochs(task, p.epochs, train.Checkpoint(tmp_path / "ck.pt", {}), 0, "gpu")
    assert all(math.isfinite(row["loss"]) for row in task.history)
    assert task.history[-1]["knn_accuracy"] is not None
