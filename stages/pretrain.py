"""DVC stage `pretrain`: SimCLR on all training images (no labels), monitored by kNN accuracy
on the validation split. Writes the backbone weights, metrics/pretrain.json and the curves: one row per
epoch, and the kNN accuracy at the epochs it was measured (`pretrain.knn_every`)."""
from pathlib import Path

import numpy as np
import torch

from stages.lib import cifar, distributed, params, train, tracking
from stages.lib.cli import UserError, log, run_stage
from stages.lib.io import removed_on_failure, write_csv, write_json
from stages.lib.splits import load_split
from stages.lib.models import save_backbone
from stages.lib.simclr import PretrainTask


def add_arguments(parser):
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--val", required=True, help="validation indices (.npy) from the split stage")
    parser.add_argument("--out", required=True, nargs="+", help="backbone weights file(s) to write")
    parser.add_argument("--metrics", required=True, help="final metrics JSON")
    parser.add_argument("--curve", required=True, help="per-epoch CSV (loss, lr, seconds, images per second)")
    parser.add_argument("--knn-curve", help="CSV of the kNN accuracy [%%] at the epochs it was measured")
    parser.add_argument("--checkpoint", required=True, help="resumable checkpoint file")


def run(args):
    p = params.load(args.params, "seed", "model", "pretrain")
    cfg, model = p["pretrain"], p["model"]
    x, y = cifar.load_prepared(args.data, "train")
    val = load_split(Path(args.val).parent, Path(args.val).stem)
    if cfg["batch_size"] > len(x):
        raise UserError(f"{args.params}: pretrain.batch_size = {cfg['batch_size']}: above the {len(x)} training images")
    device = train.pick_device()
    train.setup(p["seed"], device)
    images = train.images_to_device(x, device)
    labels = torch.from_numpy(y).to(device)
    pool = torch.from_numpy(np.setdiff1d(np.arange(len(y)), val)).to(device)
    val_t = torch.from_numpy(val).to(device)
    monitor = (images[pool], labels[pool], images[val_t], labels[val_t])
    config = {"params": p, "images": len(x), "val": train.fingerprint(val.tolist()), "processes": distributed.world()}
    checkpoint = train.Checkpoint(Path(args.checkpoint), config)
    log(f"pretrain: {len(x)} images on {distributed.world()} x {train.device_name(device)}, "
        f"{model['arch']} width {model['width']}")
    mlflow_run = tracking.stage_run("pretrain", p, tags={"device": train.device_name(device),
                                                        "processes": str(distributed.world())},
                                    data=tracking.dataset(args.data, "training"))
    curves = [args.curve] + ([args.knn_curve] if args.knn_curve else [])
    with removed_on_failure(*args.out, args.metrics, *curves), distributed.main_only(mlflow_run) as mlrun:
        task = PretrainTask(images, monitor, cfg, model["arch"], model["width"], p["seed"], device,
                            on_epoch=lambda row: mlrun.log_metrics(row, step=row["epoch"]))
        train.run_epochs(task, cfg["epochs"], task.steps_per_epoch, checkpoint, cfg["checkpoint_seconds"], "pretrain")
        if distributed.is_main():
            summary = write_outputs(args, p, task, device)
            mlrun.log_metrics({f"final_{k}": v for k, v in summary.items() if isinstance(v, (int, float))})
            for path in (*curves, args.metrics):
                mlrun.log_artifact(path)
    checkpoint.delete()
    distributed.cleanup()


def write_outputs(args, p, task, device):
    history = task.history
    last_knn = next(row["knn_accuracy"] for row in reversed(history) if row["knn_accuracy"] is not None)
    images = len(history) * task.steps_per_epoch * task.batch
    summary = {
        "loss": round(history[-1]["loss"], 4),
        "knn_accuracy": round(last_knn, 4),
        "epochs": len(history),
        "seconds": round(task.train_seconds, 1),
        "seconds_per_epoch": round(task.train_seconds / len(history), 3),
        "images_per_second": round(images / task.train_seconds),  # training images a second
        "views_per_second": round(2 * images / task.train_seconds),  # augmented views through the network
        "device": train.device_name(device),
        "processes": distributed.world(),
    }
    for out in args.out:
        save_backbone(out, task.model.backbone, origin="simclr", params=p)
    write_csv(args.curve, [{k: v for k, v in row.items() if k != "knn_accuracy"} for row in history])
    if args.knn_curve:
        write_csv(args.knn_curve, [{"epoch": row["epoch"], "knn_accuracy_percent": round(100 * row["knn_accuracy"], 2)}
                                   for row in history if row["knn_accuracy"] is not None])
    write_json(args.metrics, summary)
    log(f"pretrain: done, kNN accuracy {summary['knn_accuracy']:.4f}, {summary['images_per_second']:,} img/s")
    return summary


def main(argv=None):
    run_stage("pretrain", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
