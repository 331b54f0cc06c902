"""torchrun/DDP on the CPU (gloo): two processes equal one process on the whole batch, they agree on
when to checkpoint, and a 2-process pretraining writes exactly one set of outputs."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stages.lib import distributed, splits, train
from stages.lib import params as params_lib
from stages.lib.simclr import SimCLR
from tests.conftest import (
    REPO, STANDARDIZE, finetune_argv, pretrain_argv, save_data, synthetic_images, write_params,
)

BATCH, DIM = 8, 16


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fixed_views():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(BATCH, 3, 8, 8, generator=generator), torch.randn(BATCH, 3, 8, 8, generator=generator)


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 32), torch.nn.ReLU(),
                               torch.nn.Linear(32, DIM))


def simclr():
    """The SimCLR method pretraining runs, at temperature 0.5."""
    cfg = params_lib.load(REPO / "params.yaml", "pretrain").pretrain.model_copy(update={"temperature": 0.5})
    return SimCLR(cfg, STANDARDIZE)


def contrastive_step(model, view1, view2):
    """The pretraining step's shape: both views in one forward, and SimCLR's loss, whose negatives are
    gathered from every rank."""
    z = model(torch.cat([view1, view2]))  # (2b, D)
    loss = simclr().loss(z, len(view1))
    loss.backward()
    return loss.item()


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    device = distributed.setup("cpu")
    model = make_model()
    ddp = distributed.wrap(model, device, sync_batchnorm=False)
    view1, view2 = fixed_views()
    b = distributed.per_rank_batch(BATCH, "batch")
    part = slice(rank * b, (rank + 1) * b)
    loss = contrastive_step(ddp, view1[part], view2[part])
    grads = [p.grad.clone() for p in model.parameters()]
    torch.save({"loss": loss, "grads": grads}, Path(out) / f"rank{rank}.pt")
    distributed.cleanup()


def test_two_processes_equal_one_process_on_the_whole_batch(tmp_path):
    model = make_model()
    loss = contrastive_step(model, *fixed_views())
    reference = [p.grad for p in model.parameters()]
    mp.start_processes(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["loss"] == pytest.approx(loss, rel=1e-5)
        for grad, expected in zip(result["grads"], reference):
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)


class SlowMainRankTask(train.Task):
    """A task whose step is collective (as DDP's and the loss's all_gather are) and whose epoch ends later
    on rank 0 (as the kNN monitor, run on rank 0 alone, makes it)."""

    def __init__(self):
        super().__init__(2, "batch", 4, 3, 0, 0.1, 0, torch.device("cpu"))
        self.model = torch.nn.Linear(2, 1)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1)

    def batch_order(self, epoch):
        return torch.arange(8)

    def train_step(self, epoch, index):
        total = torch.ones(1)
        dist.all_reduce(total)
        return total[0] * 0.0 + 1.0

    def finish_epoch(self, epoch, mean_loss, seconds):
        if distributed.is_main():
            time.sleep(0.4)


def _checkpoint_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", timeout=timedelta(seconds=5))  # a rank left waiting fails soon
    train.run_epochs(SlowMainRankTask(), 3, train.Checkpoint(Path(out) / "ck.pt", {}), 0.2, "test")
    (Path(out) / f"rank{rank}.done").touch()
    distributed.cleanup()


def test_ranks_agree_on_when_a_periodic_checkpoint_is_due(tmp_path):
    """Rank 0's clock runs later (it alone runs the kNN monitor): if each rank decided alone, one would save
    (a collective: the generators are gathered) while the other steps on, and both would hang."""
    mp.start_processes(_checkpoint_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank0.done").exists() and (tmp_path / "rank1.done").exists()
    assert torch.load(tmp_path / "ck.pt", weights_only=False)["epoch"] == 2  # saved after epochs 1 and 2


def tiny_pretraining(tmp_path, epochs):
    """Prepared synthetic data, splits and params for a short pretraining; returns the params path."""
    x, y = synthetic_images(16)
    save_data(tmp_path / "prepared", (x, y), synthetic_images(1, seed=9))
    val, labeled = splits.make_splits(y, 40, [1.0], seed=0)
    splits.save_splits(tmp_path / "splits", val, labeled)
    return write_params(tmp_path / "params.yaml", **{
        "model.width": 4, "pretrain.epochs": epochs, "pretrain.batch_size": 32, "pretrain.compile": False,
        "pretrain.proj_hidden": 32, "pretrain.proj_dim": 16, "pretrain.knn_every": 1,
        "pretrain.checkpoint_seconds": 100_000,
    })


def torchrun(module, argv):
    """Start `torchrun --nproc_per_node 2 -m <module> <argv>` in the repository, in a process group of its own (a
    signal to that group spares pytest; torchrun starts each worker in a session of its own and forwards a signal to
    them itself); returns the Popen (stderr piped)."""
    command = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2",
               "-m", module, *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)


def finished(process, timeout=600):
    """The rest of a torchrun's stderr once it has ended. On a hang (the test fails with the stderr it had) or on
    any exception, Ctrl-C in pytest too, torchrun's workers (each in a session of its own) and its group are killed."""
    try:
        return process.communicate(timeout=timeout)[1]
    except BaseException as error:
        try:
            workers = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:  # torchrun has ended already
            workers = []
        for worker in workers:  # one may have ended meanwhile: torchrun stops them on a signal or a failed rank
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        os.killpg(process.pid, signal.SIGKILL)
        rest = process.communicate()[1]
        if isinstance(error, subprocess.TimeoutExpired):
            pytest.fail(f"torchrun did not end in {timeout} s; its stderr ends:\n{rest[-3000:]}")
        raise


def torchrun_pretrain(tmp_path, out):
    """Start two-process pretraining on the tiny data; returns the Popen."""
    return torchrun("stages.pretrain", pretrain_argv(tmp_path / "params.yaml", tmp_path / "prepared",
                                                     tmp_path / "splits/val.npy", out, tmp_path / "checkpoint.pt"))


def test_two_process_pretraining_writes_one_set_of_outputs(tmp_path):
    tiny_pretraining(tmp_path, epochs=2)
    out = tmp_path / "out"
    process = torchrun_pretrain(tmp_path, out)
    stderr = finished(process)
    assert process.returncode == 0, stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["pretrain.csv", "pretrain.json", "pretrain_knn.csv", "ssl.pt"]
    metrics = json.loads((out / "pretrain.json").read_text())
    assert metrics["processes"] == 2 and metrics["epochs"] == 2
    assert stderr.count("pretrain: done") == 1  # only rank 0 reports and writes
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("ssl-label-budget").experiment_id])
    assert [run.data.tags["processes"] for run in runs] == ["2"]
    assert np.isfinite(metrics["loss"])


def test_ctrl_c_under_torchrun_checkpoints_and_resumes(tmp_path):
    """Ctrl-C reaches torchrun, which forwards it to every worker (each in a session of its own): all ranks
    stop at the same step, rank 0 saves the checkpoint, and a rerun ends like an unbroken run."""
    tiny_pretraining(tmp_path, epochs=3)
    reference = torchrun_pretrain(tmp_path, tmp_path / "reference")
    stderr = finished(reference)
    assert reference.returncode == 0, stderr[-3000:]
    process = torchrun_pretrain(tmp_path, tmp_path / "out")
    lines = []
    for line in process.stderr:
        lines.append(line)
        if line.startswith("pretrain epoch 1/3:"):
            os.killpg(process.pid, signal.SIGINT)  # as a terminal's Ctrl-C: torchrun's group, not its workers
            break
    lines.append(finished(process, timeout=120))
    assert process.returncode != 0
    assert (tmp_path / "checkpoint.pt").exists(), "".join(lines)[-3000:]
    assert "stopped by SIGINT" in "".join(lines)
    resumed = torchrun_pretrain(tmp_path, tmp_path / "out")
    stderr = finished(resumed)
    assert resumed.returncode == 0 and "resuming from" in stderr, stderr[-3000:]
    final = torch.load(tmp_path / "out/ssl.pt")["state_dict"]
    expected = torch.load(tmp_path / "reference/ssl.pt")["state_dict"]
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=0)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_two_process_fine_tuning_writes_one_set_of_outputs(tmp_path):
    x, y = synthetic_images(16)
    test_x, test_y = synthetic_images(4, seed=9)
    save_data(tmp_path / "prepared", (x, y), (test_x, test_y))
    val, labeled = splits.make_splits(y, 40, [1.0, 0.5], seed=0)
    splits.save_splits(tmp_path / "splits", val, labeled)
    params = write_params(tmp_path / "params.yaml", **{
        "fraction": [1.0, 0.5], "model.width": 4, "finetune.max_epochs": 2, "finetune.batch_size": 32,
        "finetune.compile": False})
    torch.manual_seed(0)
    from stages.lib.models import ResNet, save_backbone

    save_backbone(tmp_path / "baseline.pt", ResNet("resnet18", 4, "cifar"), origin="random", params={})
    process = torchrun("stages.finetune", finetune_argv(params, "baseline", tmp_path / "baseline.pt",
                                                        tmp_path / "prepared", tmp_path / "splits", tmp_path))
    stderr = finished(process)
    assert process.returncode == 0, stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "n100_s0.json", "n100_s0.npz", "n50_s0.json", "n50_s0.npz"]
    assert sorted(p.name for p in (tmp_path / "curves").iterdir()) == ["n100_s0.csv", "n50_s0.csv"]
    assert not (tmp_path / "work").exists()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("ssl-label-budget").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["baseline-n100_s0", "baseline-n50_s0"]
