"""Benchmark of the study's speed on whatever device there is (not a DVC stage).

Measures, with the fraction, data, model, pretrain and finetune settings of params.yaml, on random
images of the prepared data's size (--data, default data/prepared: run `dvc repro data` first; its image
counts size the budget):
(a) the step's whole augmentation pipeline (`PretrainTask.make_views`) alone and, operation by operation, SimCLR's
kornia operations (its Gaussian blur only for images of pretrain.augment.blur_from px or more), (b) the
SimCLR train step alone on pre-made views, (c) a whole SimCLR epoch, (d) eval-mode inference, image
decoding, a stage's start-up, compile and checkpoint costs; then prints the time budget of the study that
params.yaml describes (stages/lib/budget.py), from those measured figures.

    python -m stages.bench                 # 50,000 images on a GPU, 2,048 on a CPU
    python -m stages.bench --images 4096 --json bench.json
"""
import io
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import kornia
import numpy as np
import torch
from PIL import Image

from stages.lib import budget, params, prepared, sources, train
from stages.lib.augment import (JITTER_NEUTRAL, JITTER_OPS, SimCLRAugment, Standardize, affine_crop_flip, blurs,
                                color_jitter, jitter_op, jitter_order)
from stages.lib.cli import UserError, log, run_stage
from stages.lib.io import write_json
from stages.lib.models import ResNet, stem_for
from stages.lib.pretraining import PretrainTask
from stages.pretrain import METHODS


def add_arguments(parser):
    parser.add_argument("--data", default="data/prepared",
                        help="prepared data (dvc repro data): its image size and image counts size the budget")
    parser.add_argument("--images", type=int, help="images per epoch (default: 50,000 on CUDA, 2,048 on CPU)")
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per micro-benchmark")
    parser.add_argument("--evaluate-seconds", type=float, default=2.0,
                        help="the evaluate stage's work for the budget, start-up aside [s] (CPU-bound: "
                             "6.1 s wall with its start-up, 18 cells, measured on 2 CPU cores)")
    parser.add_argument("--json", help="also write the figures to this JSON file")


def timed(fn, repeats, device, warmup=2):
    """Seconds per call of fn(), after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    train.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return train.seconds_since(start, device) / repeats


def augmentation_ops(task):
    """The step's whole pipeline (`PretrainTask.make_views`: the method's views, laid out for the device) on
    one step's images of the task, and each of SimCLR's kornia operations alone on them as float (b, 3, H, W):
    the Gaussian blur (with probability 1) only for images that SimCLRAugment blurs (augment.blurs: `blur_from`
    px or more).
    {name: (callable, views one call makes)}."""
    images, generator, device = task.images[:task.images_per_step], task.generator, task.device
    x = images / 255.0  # uint8 -> float32 (b, 3, H, W) in [0, 1]
    batch, cfg = len(x), task.cfg.augment
    box = torch.tensor([[2.0, 3.0, 20.0, 24.0]], device=device).expand(batch, 4)
    flip = torch.rand(batch, device=device) < 0.5
    # Each operation 0.2 off neutral: x 1.2, hue 0.2 of a turn; float32 (b,) each.
    factors = {name: torch.full((batch,), JITTER_NEUTRAL[name] + 0.2, device=device) for name in JITTER_OPS}
    on = torch.ones(batch, dtype=torch.bool, device=device)
    ops = {
        "whole pipeline": (lambda: task.make_views(images),  # (V * b, 3, H, W)
                           task.method.views_per_image * batch),
        "crop+flip (one affine warp)": (lambda: affine_crop_flip(x, box, flip), batch),
        **{name: (partial(jitter_op, name, x, factors[name]), batch) for name in JITTER_OPS},
        "grayscale": (lambda: kornia.color.rgb_to_grayscale(x), batch),
        "jitter, random order (16 ops)": (lambda: color_jitter(x, factors, jitter_order(generator, batch, device), on),
                                          batch),
    }
    if blurs(cfg, *x.shape[-2:]):
        simclr = SimCLRAugment(cfg, standardize=None)  # its blur alone, which does not standardize
        ops["blur"] = (lambda: simclr.blur(x, generator, 1.0), batch)
    return ops


def decode_rate(size, n=2_000):
    """Images per second that the data stage's decoding (`sources.decode_all`, 4 threads) reaches on n
    random size x size JPEG files held in memory."""
    rng = np.random.default_rng(0)
    items = []
    for i in range(n):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=75)
        items.append((f"bench image {i}", buffer.getvalue))
    start = time.perf_counter()
    sources.decode_all([items], size)
    return n / (time.perf_counter() - start)


def stage_start_seconds(device):
    """Seconds a fresh process takes to import a stage with torch, kornia and MLflow and reach the device."""
    code = f"import mlflow, torch, stages.finetune; torch.zeros(1, device='{device.type}')"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    return time.perf_counter() - start


def measure(task, standardize, repeats):
    """{name: figure} of the augmentation, train step, epoch, inference, compile and checkpoint of `task`
    (a PretrainTask, one process: its batch is one step's images); `standardize` is the data's
    augment.Standardize the method was built with (inference uses it)."""
    batch, device, results = task.images_per_step, task.device, {}
    for name, (fn, views_made) in augmentation_ops(task).items():
        results[f"augment {name} views/s"] = round(views_made / timed(fn, repeats, device))
    views = task.make_views(task.images[:batch])  # (V * B, 3, H, W)
    # PretrainTask's step on these views, without Task.step's batch drawing and lr schedule
    start = time.perf_counter()
    task.learn(views)  # the first call compiles when compile is on
    results["first step (compile) s"] = round(train.seconds_since(start, device), 2)
    results["train step views/s"] = round(len(views) / timed(lambda: task.learn(views), repeats, device))
    results.update(full_epoch(task, device))
    results["inference img/s"] = round(len(task.images) / timed(
        lambda: train.infer(task.model.backbone, task.images, standardize), max(1, repeats // 5), device, warmup=1))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = train.Checkpoint(Path(tmp) / "ck.pt", {})
        results["checkpoint write s"] = round(timed(lambda: checkpoint.save(task.state(0, 0, None)), 2, device, 1), 3)
    return results


def run(args):
    p = params.load(args.params, "fraction", "data", "model", "pretrain", "finetune")
    facts = prepared.read_facts(args.data)
    cfg, size, device = p.pretrain.model_copy(update={"epochs": 1}), facts.image_size, train.pick_device()
    n = args.images or (50_000 if device.type == "cuda" else 2_048)
    if n < cfg.batch_size:
        raise UserError(f"--images {n}: below pretrain.batch_size = {cfg.batch_size} (one step's images); "
                        "give more images or a smaller batch")
    train.setup(0, device)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
    standardize = Standardize(facts.mean, facts.std)
    method = METHODS[cfg.method](cfg, standardize)  # as the pretrain stage builds it
    backbone = ResNet(p.model.arch, p.model.width, stem_for(size, p.model.standard_stem_from))
    task = PretrainTask(method, images, backbone, lambda model: None, cfg, 0, device, on_epoch=lambda row: None)
    results = {"device": train.device_name(device), "batch_size": cfg.batch_size, "images": n}
    log(f"bench: {results['device']}, {p.model.arch} width {p.model.width}, {size} px, batch {cfg.batch_size}, "
        f"compile {cfg.compile}")
    results.update(measure(task, standardize, args.repeats))
    results["augmentation share of step"] = round(
        results["epoch views/s"] / results["augment whole pipeline views/s"], 3)
    results["decode img/s"] = round(decode_rate(size))
    results["stage start-up s"] = round(stage_start_seconds(device), 2)
    for key, value in results.items():
        print(f"{key:48s} {value:>14,}" if isinstance(value, (int, float)) else f"{key:48s} {value:>14}")
    rows, total = budget.study_budget(rates_from(results, args.evaluate_seconds), study_from(p, facts))
    print(f"\nTime budget of the study in {args.params}, from these figures:\n\n{budget.format_budget(rows, total)}")
    if args.json:
        write_json(args.json, {**results, "budget": rows, "budget_total_s": round(total, 1)})


def rates_from(results, evaluate_seconds):
    return budget.Rates(
        train_views_per_s=results["train step views/s"], augment_views_per_s=results["augment whole pipeline views/s"],
        infer_images_per_s=results["inference img/s"], decode_images_per_s=results["decode img/s"],
        stage_start_s=results["stage start-up s"], compile_s=results["first step (compile) s"],
        checkpoint_s=results["checkpoint write s"], evaluate_s=evaluate_seconds)


def study_from(p, facts):
    """The study params.yaml describes, on the prepared data's image counts (data.limit applied; the data
    stage reads (decodes or resizes) the whole source before it subsets, so with a limit that is undercounted)."""
    images = facts.images
    return budget.Study(train_images=images["train"], unlabeled_images=facts.unlabeled, test_images=images["test"],
                        val_images=p.data.val_size, fractions=tuple(p.fraction), seeds=len(p.finetune.seeds),
                        modes=tuple(p.finetune.modes), pretrain=p.pretrain, finetune=p.finetune)


def full_epoch(task, device):
    """Time one whole epoch of real training steps (after a few warm-up steps)."""
    for step in range(min(3, task.steps_per_epoch)):
        task.step(0, step)
    train.synchronize(device)
    start = time.perf_counter()
    for step in range(task.steps_per_epoch):
        task.step(0, step)
    seconds = train.seconds_since(start, device)
    images = task.steps_per_epoch * task.images_per_step
    return {"epoch seconds": round(seconds, 3), "epoch img/s": round(images / seconds),
            "epoch views/s": round(task.method.views_per_image * images / seconds),
            "seconds per 50,000-image epoch": round(50_000 / (images / seconds), 3)}


def main(argv=None):
    run_stage("bench", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
