"""Supervised fine-tuning of one cell (mode, fraction, seed) as a task for `train.run_epochs`.

Modes differ only in their starting weights: `baseline` (random init), `ssl` (SimCLR
backbone), `linear` (SimCLR backbone frozen, only the linear head trains). Early stopping
on validation accuracy with patience; the best-validation weights are the ones kept.
"""
import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from stages.lib import distributed, train
from stages.lib.augment import SupervisedAugment
from stages.lib.cli import log
from stages.lib.metrics import classification_metrics
from stages.lib.models import Classifier


class FinetuneTask(train.Task):
    """One fine-tuning cell. `data` holds device tensors: images (N, 3, H, W) uint8, labels (N,),
    labeled (L,) indices into them, val_x, val_y."""

    def __init__(self, data, backbone, mode, p, seed, steps_per_epoch, device, num_classes, on_epoch):
        self.data, self.mode, self.p, self.seed, self.device = data, mode, p, seed, device
        self.steps_per_epoch, self.num_classes, self.on_epoch = steps_per_epoch, num_classes, on_epoch
        torch.manual_seed(seed)  # the head's initial weights
        self.model = Classifier(backbone, num_classes).to(device)
        if mode == "linear":
            self.model.backbone.requires_grad_(False)
        self.images_per_step = p["batch_size"]  # global: split evenly over the processes
        self.local = distributed.per_rank_batch(p["batch_size"], "finetune.batch_size")
        self.compiled = train.prepare_model(self.model, device, p["compile"], p["sync_batchnorm"])
        self.optimizer = train.make_optimizer("sgd", self.model, p["lr"], p["momentum"], p["weight_decay"])
        self.augment = SupervisedAugment(p["crop_padding"], p["flip_p"])
        self.generator = train.rank_generator(seed, device)
        self.history, self.best, self.order_epoch = [], None, None
        self.best_accuracy, self.best_epoch, self.stale, self.train_seconds = -1.0, 0, 0, 0.0

    kept = ("history", "best", "best_accuracy", "best_epoch", "stale", "train_seconds")

    def _order(self, epoch):
        """This epoch's batch order: the labeled indices, reshuffled and cycled to fill every step."""
        labeled, needed = self.data["labeled"], self.steps_per_epoch * self.p["batch_size"]
        passes = -(-needed // len(labeled))
        orders = [train.epoch_order(len(labeled), self.seed, epoch * passes + i, self.device) for i in range(passes)]
        return labeled[torch.cat(orders)[:needed]]

    def step(self, epoch, step):
        if self.order_epoch != epoch:
            self.order, self.order_epoch, self.epoch_start = self._order(epoch), epoch, time.perf_counter()
            self.model.train()
            if self.mode == "linear":
                self.model.backbone.eval()  # frozen: BatchNorm statistics stay as pretrained
        batch = self.p["batch_size"]
        total = self.p["max_epochs"] * self.steps_per_epoch
        warmup = self.p["warmup_epochs"] * self.steps_per_epoch
        train.set_lr(self.optimizer, train.lr_at(epoch * self.steps_per_epoch + step, total, warmup, self.p["lr"]))
        index = train.rank_batch(self.order, step, batch, self.local)
        x = train.channels_last(self.augment(self.data["images"][index], self.generator))  # float32 (b, 3, H, W)
        with train.autocast(self.device):
            logits = self.compiled(x)  # (B, C)
        loss = F.cross_entropy(logits.float(), self.data["labels"][index], label_smoothing=self.p["label_smoothing"])
        return train.optimize(self.optimizer, loss)

    def end_epoch(self, epoch, mean_loss):
        seconds = train.seconds_since(self.epoch_start, self.device)
        self.train_seconds += seconds
        logits = train.infer(self.model, self.data["val_x"])
        val_loss = F.cross_entropy(logits, self.data["val_y"]).item()
        m = classification_metrics(self.data["val_y"].cpu().numpy(), logits.argmax(1).cpu().numpy(), self.num_classes)
        row = {"epoch": epoch + 1, "train_loss": mean_loss, "val_loss": val_loss, "val_accuracy": m["accuracy"],
               "val_precision": m["precision_macro"], "val_recall": m["recall_macro"], "val_f1": m["f1_macro"],
               "lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds}
        self.history.append(row)
        if m["accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_epoch, self.stale = m["accuracy"], epoch + 1, 0
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        else:
            self.stale += 1
        self.on_epoch(row)
        log(f"{self.mode} epoch {epoch + 1}/{self.p['max_epochs']}: train loss {mean_loss:.4f}, "
            f"val accuracy {m['accuracy']:.4f} (best {self.best_accuracy:.4f} at epoch {self.best_epoch}), "
            f"{seconds:.1f} s")
        return self.stale >= self.p["patience"]

    def test_predictions(self, test_x):
        """Predicted labels (N,) of the best-validation weights on the test images."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.best)
        return train.infer(model, test_x).argmax(1).cpu().numpy().astype(np.int64)
