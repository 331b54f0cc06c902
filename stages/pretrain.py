"""DVC stage `pretrain`: self-supervised pretraining (`pretrain.method`, SimCLR) on all training
images without labels (and the source's unlabeled images, if any), monitored by kNN accuracy on the
validation split. Writes the backbone weights, metrics/pretrain.json and the curves: one row per
epoch, and the kNN accuracy at the epochs it was measured (`pretrain.knn_every`)."""
from pathlib import Path

import numpy as np
import torch

from stages.lib import distributed, params, prepared, train, tracking
from stages.lib.augment import Standardize
from stages.lib.cli import UserError, log, run_stage
from stages.lib.io import removed_on_failure, write_csv, write_json
from stages.lib.knn import KNNMonitor
from stages.lib.models import ResNet, save_backbone, stem_for
from stages.lib.pretraining import PretrainTask
from stages.lib.simclr import SimCLR
from stages.lib.splits import load_split

METHODS = {"simclr": SimCLR}  # pretrain.method -> its Method class


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--val", required=True, help="validation indices (.npy) from the split stage")
    parser.add_argument("--out", required=True, nargs="+", help="backbone weights file(s) to write")
    parser.add_argument("--metrics", required=True, help="final metrics JSON")
    parser.add_argument("--curve", required=True, help="per-epoch CSV (loss, lr, seconds, images per second)")
    parser.add_argument("--knn-curve", required=True, help="CSV of the kNN accuracy [%%] at the epochs it was measured")
    parser.add_argument("--checkpoint", required=True, help="resumable checkpoint file")


def run(args):
    p = params.load(args.params, "seed", "model", "pretrain")
    cfg, facts = p.pretrain, prepared.read_facts(args.data)
    x, y = prepared.load_prepared(args.data, "train", facts)
    unlabeled = prepared.load_prepared(args.data, "unlabeled", facts)  # (0, S, S, 3) for most data
    val = load_split(Path(args.val).parent, Path(args.val).stem)
    if cfg.batch_size > len(x) + len(unlabeled):
        raise UserError(f"{args.params}: pretrain.batch_size = {cfg.batch_size}: above the "
                        f"{len(x) + len(unlabeled)} training images")
    device = train.pick_device()
    train.setup(p.seed, device)
    images = train.images_to_device(np.concatenate([x, unlabeled]), device)  # labeled first: (N + U, 3, S, S)
    standardize = Standardize(facts.mean, facts.std)
    monitor = knn_monitor(images[: len(x)], torch.from_numpy(y).to(device), val, facts, standardize, cfg)
    config = {"params": p.as_dict(), "data": facts.content_sha256, "val": train.fingerprint(val.tolist()),
              "processes": distributed.world()}
    checkpoint = train.Checkpoint(Path(args.checkpoint), config)
    stem = stem_for(facts.image_size, p.model.standard_stem_from)
    log(f"pretrain: {cfg.method} on {len(images)} images ({len(unlabeled)} unlabeled) of {facts.image_size} px, "
        f"{distributed.world()} x {train.device_name(device)}, {p.model.arch} width {p.model.width}, {stem} stem")
    mlflow_run = tracking.stage_run("pretrain", p.as_dict(), tags={"device": train.device_name(device),
                                                                  "processes": str(distributed.world())},
                                    data=tracking.dataset(facts, "training"))
    outputs = (*args.out, args.metrics, args.curve, args.knn_curve)
    with removed_on_failure(*outputs), distributed.main_only(mlflow_run) as mlrun:
        backbone = ResNet(p.model.arch, p.model.width, stem)
        task = PretrainTask(METHODS[cfg.method](cfg, standardize), images, backbone, monitor, cfg, p.seed, device,
                            on_epoch=lambda row: mlrun.log_metrics(row, step=row["epoch"]))
        train.run_epochs(task, cfg.epochs, checkpoint, cfg.checkpoint_seconds, "pretrain")
        if distributed.is_main():
            summary = write_outputs(args, p, task)
            mlrun.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
            for path in outputs[len(args.out):]:
                mlrun.log_artifact(path)
    checkpoint.delete()
    distributed.cleanup()


def knn_monitor(images, labels, val, facts, standardize, cfg):
    """The kNN monitor over the labeled images (uint8 (N, 3, S, S), labels (N,) on the device):
    validation images against the rest."""
    device = images.device
    pool = torch.from_numpy(np.setdiff1d(np.arange(len(labels)), val)).to(device)
    val_t = torch.from_numpy(val).to(device)
    return KNNMonitor(images[pool], labels[pool], images[val_t], labels[val_t], len(facts.classes), standardize,
                      cfg.knn_k, cfg.knn_temperature)


def write_outputs(args, p, task):
    history = task.history
    last_knn = next(row["knn_accuracy"] for row in reversed(history) if row["knn_accuracy"] is not None)
    images, views = len(history) * task.steps_per_epoch * task.images_per_step, task.method.views_per_image
    summary = {
        "loss": round(history[-1]["loss"], 4),
        "knn_accuracy": round(last_knn, 4),
        "epochs": len(history),
        "seconds": round(task.train_seconds, 1),
        "seconds_per_epoch": round(task.train_seconds / len(history), 3),
        "images_per_second": round(images / task.train_seconds),  # training images a second
        "views_per_second": round(views * images / task.train_seconds),  # augmented views through the network
        "device": train.device_name(task.device),
        "processes": distributed.world(),
    }
    for out in args.out:
        save_backbone(out, task.model.backbone, origin=task.method.name, params=p.as_dict())
    write_csv(args.curve, [{k: v for k, v in row.items() if k != "knn_accuracy"} for row in history])
    write_csv(args.knn_curve, [{"epoch": row["epoch"], "knn_accuracy_percent": round(100 * row["knn_accuracy"], 2)}
                               for row in history if row["knn_accuracy"] is not None])
    write_json(args.metrics, summary)
    log(f"pretrain: done, kNN accuracy {summary['knn_accuracy']:.4f}, {summary['images_per_second']:,} img/s")
    return summary


def main(argv=None):
    run_stage("pretrain", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
