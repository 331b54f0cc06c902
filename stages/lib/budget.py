"""The time budget of a study: seconds per stage, by arithmetic, from measured throughputs.

`study_budget` turns throughputs (measured by `python -m stages.bench`, or quoted from a GPU
run) and the study's settings into one row per DVC stage: the images it pushes through the
network and its expected seconds. Nothing here times anything; it only multiplies.
"""
from dataclasses import dataclass

from stages.lib.finetuning import compile_epochs, steps_per_epoch
from stages.lib.pretraining import knn_due


@dataclass(frozen=True)
class Rates:
    """Throughputs and fixed costs of one machine [images/s or views/s, and seconds]."""

    train_views_per_s: float  # training step, forward + backward, per view (SimCLR and fine-tuning)
    augment_views_per_s: float  # SimCLR augmentation, per view (fine-tuning's crop and flip are not counted)
    infer_images_per_s: float  # eval-mode forward (kNN monitor, validation, test)
    decode_images_per_s: float  # the data stage's decoding of image files (a local copy's)
    stage_start_s: float  # one stage's start-up: Python, torch, MLflow, device
    compile_s: float  # one torch.compile of the model (paid only where compile is on)
    checkpoint_s: float  # one checkpoint write
    evaluate_s: float  # the evaluate stage's work (statistics, figures, report), start-up aside


@dataclass(frozen=True)
class Study:
    """What a study processes: image counts from the data, settings from params.yaml. The data stage
    reads train + test + unlabeled images, and its row times every one at the file-decoding rate, as
    a local copy needs. A named data set (cifar10, ...) arrives as arrays, only resized where
    image_size differs; the row leaves out its download and torchvision's checksums."""

    train_images: int  # labeled training images (after data.limit)
    unlabeled_images: int  # images without labels that SimCLR also trains on (STL-10's; 0 for most)
    test_images: int
    val_images: int
    fractions: tuple  # labeled fractions N
    seeds: int  # fine-tuning seeds
    modes: tuple  # fine-tuning modes (baseline, ssl, linear)
    pretrain: object  # params' PretrainParams
    finetune: object  # params' FinetuneParams


def _checkpoints(epoch_seconds, seconds):
    """The checkpoints run_epochs saves, given each epoch's seconds on its clock (the kNN monitor's and compile's in
    the epochs that pay them): at an epoch's end once `seconds` have passed since the last save (0: at every one),
    never after the last epoch."""
    saves, since = 0, 0.0
    for epoch_s in epoch_seconds[:-1]:
        since += epoch_s
        if since >= seconds:
            saves, since = saves + 1, 0.0
    return saves


def _pretrain(rates, s):
    p = s.pretrain
    steps = (s.train_images + s.unlabeled_images) // p.batch_size
    views = p.epochs * steps * p.batch_size * 2
    epoch_s = 2 * steps * p.batch_size * (1 / rates.train_views_per_s + 1 / rates.augment_views_per_s)
    knn_runs = [knn_due(epoch, p.epochs, p.knn_every) for epoch in range(1, p.epochs + 1)]
    knn_each = s.train_images / rates.infer_images_per_s  # one kNN run embeds the pool and validation images
    clock = [epoch_s + knn_each * due for due in knn_runs]  # each epoch's seconds on run_epochs' clock
    clock[0] += rates.compile_s * p.compile  # the first step compiles
    checkpoints = _checkpoints(clock, p.checkpoint_seconds)
    seconds = rates.stage_start_s + sum(clock) + checkpoints * rates.checkpoint_s
    note = (f"{p.epochs} epochs x {epoch_s:.2f} s, kNN {sum(knn_runs)} x, {checkpoints} checkpoints"
            + (", compile" if p.compile else ""))
    return {"stage": "pretrain", "images": views, "seconds": seconds, "note": note, "epoch_s": epoch_s}


def _finetune(rates, s, mode):
    """One finetune@<mode> stage: every fraction and seed of that mode."""
    p, pool = s.finetune, s.train_images - s.val_images
    images, train_s, checkpoints = 0, 0.0, 0
    cells = [fraction for fraction in s.fractions for _ in range(s.seeds)]  # in finetune.run's order
    for cell, fraction in enumerate(cells):
        steps = steps_per_epoch(pool, max(1, round(fraction * pool)), p.batch_size, p.equal_steps)
        epoch_s = steps * p.batch_size / rates.train_views_per_s + s.val_images / rates.infer_images_per_s
        compiled = compile_epochs(mode, p) if cell == 0 else set()  # later cells reuse the first one's graphs
        clock = [epoch_s + rates.compile_s * (epoch in compiled) for epoch in range(p.max_epochs)]  # its run_epochs
        images += p.max_epochs * steps * p.batch_size
        train_s += sum(clock) + s.test_images / rates.infer_images_per_s  # epochs, then test
        checkpoints += _checkpoints(clock, p.checkpoint_seconds)
    seconds = rates.stage_start_s + train_s + checkpoints * rates.checkpoint_s
    note = (f"{len(cells)} cells x {p.max_epochs} epochs, {checkpoints} checkpoints"
            + (", compile" if p.compile else ""))
    return {"images": images, "seconds": seconds, "note": note}


def study_budget(rates, s):
    """Rows {stage, images, seconds, note} for the whole study, and the total seconds.

    `images` counts what passes through the network in training (SimCLR: both views), or the
    images the data stage reads (see `Study`).
    The finetune row counts every mode; its note is per mode (one note where all modes have the same).
    """
    decode = s.train_images + s.test_images + s.unlabeled_images  # what the data stage reads
    modes = {mode: _finetune(rates, s, mode) for mode in s.modes}
    notes = {row["note"] for row in modes.values()}
    note = (f"per mode: {notes.pop()}" if len(notes) == 1  # differ where linear's fewer compiles move a checkpoint
            else "; ".join(f"{mode}: {row['note']}" for mode, row in modes.items()))
    rows = [
        {"stage": "data", "images": decode, "seconds": rates.stage_start_s + decode / rates.decode_images_per_s,
         "note": "every image at the file-decoding rate"
                 " (a named data set arrives as arrays, undecoded; download and checksums not counted)"},
        {"stage": "split", "images": 0, "seconds": rates.stage_start_s, "note": "start-up only"},
        _pretrain(rates, s),
        {"stage": "init", "images": 0, "seconds": rates.stage_start_s, "note": "start-up only"},
        {"stage": f"finetune x {len(s.modes)} modes", "images": sum(row["images"] for row in modes.values()),
         "seconds": sum(row["seconds"] for row in modes.values()), "note": note},
        {"stage": "evaluate", "images": 0, "seconds": rates.stage_start_s + rates.evaluate_s,
         "note": "statistics, figures, report"},
    ]
    return rows, sum(row["seconds"] for row in rows)


def format_budget(rows, total):
    """The budget as a markdown table (what README shows and the benchmark prints)."""
    lines = ["| stage | images through the network | seconds | what |", "|---|---:|---:|---|"]
    for row in rows:
        lines.append(f"| {row['stage']} | {row['images']:,} | {row['seconds']:.0f} | {row['note']} |")
    lines.append(f"| **whole study** | | **{total:.0f}** ({total / 60:.1f} min) | |")
    return "\n".join(lines)
