"""DVC stage `finetune@<mode>`: fine-tune one mode on every fraction and seed (one cell each),
keeping the weights of the best validation epoch, and save each cell's test predictions.

Cells are built in --work (resumable: a finished cell is kept, an interrupted one resumes
from its checkpoint) and moved to --out and --curves only when every cell is done.
"""
import functools
import shutil
from pathlib import Path

import numpy as np
import torch

from stages.lib import distributed, params, prepared, train, tracking
from stages.lib.augment import Standardize
from stages.lib.cli import UserError, log, run_stage
from stages.lib.finetuning import FinetuneTask, build_classifier, steps_per_epoch
from stages.lib.io import atomic_path, read_json, sha256, write_csv, write_json
from stages.lib.metrics import classification_metrics
from stages.lib.models import ResNet, load_into, read_weights, stem_for
from stages.lib.splits import fraction_key, load_split


def add_arguments(parser):
    parser.add_argument("--mode", required=True, choices=params.MODES, help="fine-tuning mode")
    parser.add_argument("--init", required=True, help="starting backbone weights (data/init/<mode>.pt)")
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--splits", required=True, help="split directory (val.npy, train_<N>.npy)")
    parser.add_argument("--out", required=True, help="results directory: <N>_s<seed>.json and .npz")
    parser.add_argument("--curves", required=True, help="per-epoch CSV directory: <N>_s<seed>.csv")
    parser.add_argument("--work", required=True, help="resumable work directory for the cells")


def run(args):
    p = params.load(args.params, "seed", "fraction", "model", "finetune")
    facts = prepared.read_facts(args.data)
    stem = stem_for(facts.image_size, p.model.standard_stem_from)
    saved = read_weights(args.init, p.model.arch, p.model.width, stem)
    check_origin(args.init, saved.get("origin"), args.mode)
    device = train.pick_device()
    train.setup(p.seed, device)
    context = load_context(args, facts, device)
    backbone = ResNet(p.model.arch, p.model.width, stem)
    context.update(saved=saved, init_digest=sha256(args.init),
                   classifier=build_classifier(backbone, len(facts.classes), args.mode, p.finetune, device))
    work, cells = Path(args.work), [(f, s) for f in p.fraction for s in p.finetune.seeds]
    for fraction, seed in cells:
        run_cell(args, p, context, fraction, seed, work / cell_key(fraction, seed))
    distributed.barrier()
    if distributed.is_main():
        publish(work, [cell_key(f, s) for f, s in cells], args)
        shutil.rmtree(work, ignore_errors=True)
    distributed.cleanup()


def check_origin(path, origin, mode):
    """The baseline starts from random weights; the other modes from self-supervised ones."""
    if (origin == "random") != (mode == "baseline"):
        needs = "random" if mode == "baseline" else "self-supervised (pretrain stage)"
        raise UserError(f"{path} holds {origin} weights; mode {mode} needs {needs} weights (run: dvc repro)")


def load_context(args, facts, device):
    """Everything the cells share, on the device: images, labels, validation and test sets."""
    x, y = prepared.load_prepared(args.data, "train", facts)
    test_x, test_y = prepared.load_prepared(args.data, "test", facts)
    val = load_split(args.splits, "val")
    images, labels = train.images_to_device(x, device), torch.from_numpy(y).to(device)
    val_t = torch.from_numpy(val).to(device)
    return {"images": images, "labels": labels, "val_x": images[val_t], "val_y": labels[val_t],
            "val_digest": train.fingerprint(val.tolist()), "pool": len(y) - len(val), "device": device,
            "test_x": train.images_to_device(test_x, device), "test_y": test_y, "facts": facts,
            "standardize": Standardize(facts.mean, facts.std)}


def cell_key(fraction, seed):
    """A cell's name in files: n10_s0."""
    return f"{fraction_key(fraction)}_s{seed}"


def run_cell(args, p, context, fraction, seed, cell_dir):
    key, cfg, device = cell_key(fraction, seed), p.finetune, context["device"]
    labeled = load_split(args.splits, f"train_{fraction_key(fraction)}")
    config = {"finetune": cfg.model_dump(exclude={"modes", "seeds"}), "model": p.model.model_dump(),
              "mode": args.mode, "fraction": fraction, "seed": seed, "init": context["init_digest"],
              "data": context["facts"].content_sha256, "labeled": train.fingerprint(labeled.tolist()),
              "val": context["val_digest"], "processes": distributed.world()}
    done = cell_dir / "result.json"
    if done.exists() and read_json(done).get("config") == train.fingerprint(config):
        log(f"finetune {args.mode} {key}: already done in {cell_dir}")
        return
    steps = steps_per_epoch(context["pool"], len(labeled), cfg.batch_size, cfg.equal_steps)
    # Every cell of a seed starts from the same weights: the seed's own for the baseline.
    start = functools.partial(load_into, saved=context["saved"], seed=seed, path=args.init)
    data = {**{k: context[k] for k in ("images", "labels", "val_x", "val_y")},
            "labeled": torch.from_numpy(labeled).to(device)}  # FinetuneTask's tensors
    checkpoint = train.Checkpoint(cell_dir / "checkpoint.pt", config)
    tags = {"mode": args.mode, "fraction": str(fraction), "seed": str(seed), "device": train.device_name(device)}
    run_params = {**p.as_dict(), "cell": {"mode": args.mode, "fraction": fraction, "seed": seed}}
    mlflow_run = tracking.stage_run(
        f"finetune@{args.mode}", run_params, run_name=f"{args.mode}-{key}", tags=tags,
        data=tracking.dataset(context["facts"], "training", subset=(fraction_key(fraction), config["labeled"])))
    with distributed.main_only(mlflow_run) as mlrun:
        task = FinetuneTask(data, context["classifier"], start, args.mode, cfg, context["standardize"], seed, steps,
                            device, on_epoch=lambda row: mlrun.log_metrics(row, step=row["epoch"]))
        train.run_epochs(task, cfg.max_epochs, checkpoint, cfg.checkpoint_seconds, f"{args.mode} {key}")
        y_pred = task.test_predictions(context["test_x"])
        test = classification_metrics(context["test_y"], y_pred, len(context["facts"].classes))
        mlrun.log_metrics({f"test_{k}": v for k, v in test.items() if isinstance(v, float)})
        result = {"mode": args.mode, "fraction": fraction, "key": fraction_key(fraction), "seed": seed,
                  "labeled_images": len(labeled), "best_epoch": task.best_epoch, "epochs_run": len(task.history),
                  "best_val_accuracy": task.best_accuracy, "seconds": round(task.train_seconds, 2),
                  "settings": settings(task), "steps_per_epoch": steps,
                  "device": train.device_name(device), "config": train.fingerprint(config)}
        if distributed.is_main():
            save_cell(cell_dir, result, context["test_y"], y_pred, task.history)
            mlrun.log_artifact(cell_dir / "curve.csv")
    checkpoint.delete()
    log(f"finetune {args.mode} {key}: test accuracy {test['accuracy']:.4f} (best epoch {task.best_epoch})")


def settings(task):
    """The fine-tuning choices a cell's FinetuneTask ran with, readable in its result (its config is there only as
    a fingerprint); head-only epochs as the task counts them: a backbone frozen every epoch (`linear`) reports lr 0."""
    cfg = task.cfg
    head_epochs = sum(map(task.head_only, range(cfg.max_epochs)))
    return {"lr": cfg.lr, "backbone_lr": 0.0 if head_epochs == cfg.max_epochs else cfg.lr * cfg.backbone_lr_scale,
            "head_epochs": head_epochs, "epochs": cfg.max_epochs,
            "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size, "equal_steps": cfg.equal_steps}


def save_cell(cell_dir, result, y_true, y_pred, history):
    """The cell's files; result.json last, since its presence marks the cell as done."""
    with atomic_path(cell_dir / "predictions.npz") as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, y_true=np.asarray(y_true, dtype=np.int64), y_pred=y_pred)
    write_csv(cell_dir / "curve.csv", history)
    write_json(cell_dir / "result.json", result)


def publish(work, keys, args):
    """Move every cell's files into the output directories, each appearing whole or not at all."""
    with atomic_path(args.out) as out, atomic_path(args.curves) as curves:
        out.mkdir(parents=True)
        curves.mkdir(parents=True)
        for key in keys:
            shutil.copy(work / key / "result.json", out / f"{key}.json")
            shutil.copy(work / key / "predictions.npz", out / f"{key}.npz")
            shutil.copy(work / key / "curve.csv", curves / f"{key}.csv")


def main(argv=None):
    run_stage("finetune", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    main()
