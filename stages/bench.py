"""Benchmark of SimCLR pretraining speed on whatever device there is (not a DVC stage).

Prints images per second for (a) the augmentation pipeline alone, and each of its kornia
operations, (b) the train step alone on pre-made views, (c) a full SimCLR epoch, using the
model and pretrain settings of params.yaml on random images.

    python -m stages.bench                 # 50,000 images on a GPU, 2,048 on a CPU
    python -m stages.bench --images 4096 --json bench.json
"""
import time

import kornia
import torch

from stages.lib import params, train
from stages.lib.augment import affine_crop_flip
from stages.lib.cli import log, run_stage
from stages.lib.io import write_json
from stages.lib.losses import nt_xent
from stages.lib.simclr import PretrainTask


def add_arguments(parser):
    parser.add_argument("--images", type=int, help="images per epoch (default: 50,000 on CUDA, 2,048 on CPU)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per micro-benchmark")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def timed(fn, repeats, device):
    """Seconds per call of fn(), after two warm-up calls."""
    for _ in range(2):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeats


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def augmentation_ops(task, x, generator):
    """Each piece of the pipeline alone on a float batch: {name: callable}."""
    batch, device = len(x), x.device
    factor = torch.full((batch,), 1.2, device=device)
    box = torch.tensor([[2.0, 3.0, 20.0, 24.0]], device=device).expand(batch, 4)
    flip = torch.rand(batch, device=device) < 0.5
    return {
        "crop+flip (one affine warp)": lambda: affine_crop_flip(x, box, flip),
        "brightness": lambda: kornia.enhance.adjust_brightness_accumulative(x, factor),
        "contrast": lambda: kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor),
        "saturation": lambda: kornia.enhance.adjust_saturation_with_gray_subtraction(x, factor),
        "hue": lambda: kornia.enhance.adjust_hue(x, factor - 1.0),
        "grayscale": lambda: kornia.color.rgb_to_grayscale(x),
        "whole pipeline (both views)": lambda: task.augment(task.images[:batch].repeat(2, 1, 1, 1), generator),
    }


def run(args):
    p = params.load(args.params, "model", "pretrain")
    cfg, device = p["pretrain"], train.pick_device()
    n = args.images or (50_000 if device.type == "cuda" else 2_048)
    train.setup(0, device)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.zeros(n, dtype=torch.int64, device=device)
    monitor = (images[:2], labels[:2], images[:2], labels[:2])
    task = PretrainTask(images, monitor, {**cfg, "epochs": 1}, p["model"]["arch"], p["model"]["width"], 0,
                        device, on_epoch=lambda row: None)
    batch = cfg["batch_size"]
    results = {"device": train.device_name(device), "batch_size": batch, "images": n}
    log(f"bench: {results['device']}, {p['model']['arch']} width {p['model']['width']}, batch {batch}, "
        f"compile {cfg['compile']}")
    x = images[:batch].float() / 255.0
    for name, fn in augmentation_ops(task, x, task.generator).items():
        results[f"augment {name} img/s"] = round(batch / timed(fn, args.repeats, device))
    views = task.augment(images[:batch].repeat(2, 1, 1, 1), task.generator)  # (2B, 3, H, W)

    def train_step():
        with train.autocast(device):
            z = task.compiled(views)
        loss = nt_xent(z[:batch], z[batch:], cfg["temperature"])
        task.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        task.optimizer.step()

    results["train step img/s"] = round(batch / timed(train_step, args.repeats, device))
    results.update(full_epoch(task, device))
    aug = batch / results["augment whole pipeline (both views) img/s"]  # seconds per step
    results["augmentation share of step"] = round(aug / (batch / results["epoch img/s"]), 3)
    for key, value in results.items():
        print(f"{key:40s} {value:>14,}" if isinstance(value, (int, float)) else f"{key:40s} {value:>14}")
    if args.json:
        write_json(args.json, results)


def full_epoch(task, device):
    """Time one whole epoch of real training steps (after a few warm-up steps)."""
    for step in range(min(3, task.steps_per_epoch)):
        task.step(0, step)
    sync(device)
    start = time.perf_counter()
    for step in range(task.steps_per_epoch):
        task.step(0, step)
    sync(device)
    seconds = time.perf_counter() - start
    images = task.steps_per_epoch * task.batch
    return {"epoch seconds": round(seconds, 3), "epoch img/s": round(images / seconds),
            "seconds per 50,000-image epoch": round(50_000 / (images / seconds), 3)}


def main(argv=None):
    run_stage("bench", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
