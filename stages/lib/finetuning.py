"""Supervised fine-tuning of one cell (mode, fraction, seed) as a task for `train.run_epochs`.

`baseline` (random init) and `ssl` (a self-supervised backbone, from `pretrain.method`) differ only in
their starting weights: optionally a few head-only epochs (backbone frozen), then the whole network with
the backbone at `backbone_lr_scale` times the head's learning rate. `linear` starts from the
self-supervised backbone and keeps it frozen throughout: only the linear head trains. Every mode runs one
warm-up + cosine schedule that ends at `max_epochs`; the weights of the epoch with the best validation
accuracy are the ones kept.

One classifier (and its compiled module) serves every cell of a process: `FinetuneTask` loads
the cell's starting weights into it. torch.compile compiles in the first cell only (`compile_epochs`);
later cells meet the same guards and reuse its graphs from dynamo's cache (as a fresh classifier would).
A first cell resumed past head_epochs compiles only the unfrozen graph; the next cell compiles the frozen one.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

from stages.lib import train
from stages.lib.augment import SupervisedAugment
from stages.lib.metrics import classification_metrics
from stages.lib.models import Classifier


def steps_per_epoch(pool, labeled, batch_size, equal_steps):
    """A cell's steps an epoch: the labeled images' worth, or with equal_steps the whole pool's (every N as long)."""
    return max(1, (pool if equal_steps else labeled) // batch_size)


def backbone_frozen(mode, head_epochs, epoch):
    """True while the backbone stays frozen: always in `linear` mode, else the first head_epochs."""
    return mode == "linear" or epoch < head_epochs


def backbone_unfreezes(mode, head_epochs, epoch):
    """True in the epoch the backbone starts training: frozen in the epoch before, not in this one (the rule above
    never freezes it again; `linear` never unfreezes it)."""
    return epoch > 0 and backbone_frozen(mode, head_epochs, epoch - 1) and not backbone_frozen(mode, head_epochs, epoch)


def compile_epochs(mode, cfg):
    """The epochs of a process's first cell in which torch.compile compiles the classifier (`cfg`: FinetuneParams):
    the first, and the one in which the backbone unfreezes (torch.compile guards on train/eval: for baseline and ssl
    the epoch head_epochs, when > 0; never for `linear`); later cells reuse these graphs."""
    if not cfg.compile:
        return set()
    return {0} | {epoch for epoch in range(cfg.max_epochs) if backbone_unfreezes(mode, cfg.head_epochs, epoch)}


def build_classifier(backbone, num_classes, mode, cfg, device):
    """(model, module to train through) for every cell of a process: wrapped in torch.compile once when asked.
    `cfg` is params' FinetuneParams."""
    model = Classifier(backbone, num_classes)  # prepare_model moves it to the device
    if mode == "linear":
        model.backbone.requires_grad_(False)
    return model, train.prepare_model(model, device, cfg.compile, cfg.sync_batchnorm)


class FinetuneTask(train.Task):
    """One fine-tuning cell. `data` holds device tensors: images (N, 3, H, W) uint8, labels (N,),
    labeled (L,) indices into them, and the validation set val_x (V, 3, H, W) uint8, val_y (V,).
    `classifier` is `build_classifier`'s pair; `start` puts the cell's starting weights into a
    backbone (e.g. `models.load_into`); `cfg` is params' FinetuneParams; `standardize` the data's
    augment.Standardize."""

    kept = train.Task.kept + ("best", "best_accuracy", "best_epoch")

    def __init__(self, data, classifier, start, mode, cfg, standardize, seed, steps_per_epoch, device, on_epoch):
        super().__init__(cfg.batch_size, "finetune.batch_size", steps_per_epoch, cfg.max_epochs, cfg.warmup_epochs,
                         cfg.lr, seed, device)
        self.data, self.mode, self.cfg, self.on_epoch = data, mode, cfg, on_epoch
        self.val_y = data["val_y"].cpu().numpy()  # (V,) for the metrics, copied to the host once
        self.model, self.compiled = classifier
        self.num_classes = self.model.head.out_features
        start(self.model.backbone)
        torch.manual_seed(seed)  # the head's initial weights
        self.model.head.reset_parameters()
        groups = (train.param_groups(self.model.backbone, cfg.weight_decay, cfg.backbone_lr_scale, "backbone")
                  + train.param_groups(self.model.head, cfg.weight_decay, part="head"))
        self.optimizer = train.make_optimizer("sgd", groups, cfg.lr, cfg.momentum)
        self.standardize, self.augment = standardize, SupervisedAugment(cfg.augment, standardize)
        self.best, self.best_accuracy, self.best_epoch = None, -1.0, 0

    def batch_order(self, epoch):
        """This epoch's batch order: the labeled indices, reshuffled and cycled to fill every step."""
        labeled, needed = self.data["labeled"], self.steps_per_epoch * self.images_per_step
        passes = -(-needed // len(labeled))
        orders = [train.epoch_order(len(labeled), self.seed, epoch * passes + i, self.device) for i in range(passes)]
        return labeled[torch.cat(orders)[:needed]]  # (steps_per_epoch * images_per_step,)

    def head_only(self, epoch):
        return backbone_frozen(self.mode, self.cfg.head_epochs, epoch)

    def start_epoch(self, epoch, fresh):
        self.model.train()
        frozen = self.head_only(epoch)
        if frozen:
            self.model.backbone.eval()  # frozen: BatchNorm statistics stay as they started
        for group in self.optimizer.param_groups:
            if group["part"] == "backbone":
                group["lr_scale"] = 0.0 if frozen else self.cfg.backbone_lr_scale  # set_lr applies it
                if fresh and backbone_unfreezes(self.mode, self.cfg.head_epochs, epoch):  # no stale momentum
                    for param in group["params"]:  # (a resume keeps the momentum its checkpoint restored)
                        self.optimizer.state.pop(param, None)

    def train_step(self, epoch, index):
        x = train.channels_last(self.augment(self.data["images"][index], self.generator))  # float32 (b, 3, H, W)
        with train.autocast(self.device):
            logits = self.compiled(x)  # (b, C)
        loss = F.cross_entropy(logits.float(), self.data["labels"][index], label_smoothing=self.cfg.label_smoothing)
        return train.optimize(self.optimizer, loss)

    def finish_epoch(self, epoch, mean_loss, seconds):
        logits = train.infer(self.model, self.data["val_x"], self.standardize)  # (V, C)
        val_loss = F.cross_entropy(logits, self.data["val_y"]).item()
        m = classification_metrics(self.val_y, logits.argmax(1).cpu().numpy(), self.num_classes)
        row = {"epoch": epoch + 1, "train_loss": mean_loss, "val_loss": val_loss, "val_accuracy": m["accuracy"],
               "val_precision": m["precision_macro"], "val_recall": m["recall_macro"], "val_f1": m["f1_macro"],
               "lr": self.optimizer.param_groups[-1]["lr"], "seconds": seconds}
        self.history.append(row)
        if m["accuracy"] > self.best_accuracy:
            self.best_accuracy, self.best_epoch = m["accuracy"], epoch + 1
            self.best = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self.on_epoch(row)
        return {"val accuracy": m["accuracy"], "best": f"{self.best_accuracy:.4f} at epoch {self.best_epoch}"}

    def test_predictions(self, test_x):
        """Predicted labels (N,) of the best-validation weights on the test images."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(self.best)
        return train.infer(model, test_x, self.standardize).argmax(1).cpu().numpy().astype(np.int64)
