"""Self-supervised pretraining as a task for `train.run_epochs`, for any `Method`.

All training images sit on the device as one uint8 tensor; a step indexes a batch, asks the
method for its augmented views, runs backbone + the method's head on them, and minimises the
method's loss. A monitor (e.g. `knn.KNNMonitor`) measures the backbone every `knn_every` epochs.
A second method needs a `Method` subclass built as `cls(cfg, standardize)` (stages/lib/simclr.py is the first),
its entry in `METHODS` (stages/pretrain.py), its name in `pretrain.method`'s `Choice`, its settings in
`PretrainParams` (stages/lib/params.py) with their values in params.yaml, and its module in the pretrain
stage's deps in dvc.yaml (tests/test_deps.py).
"""
from abc import ABC, abstractmethod

import torch
from torch import nn

from stages.lib import distributed, train
from stages.lib.models import BackboneWithHead
from stages.lib.progress import format_seconds


class Method(ABC):
    """What a self-supervised method gives the pretraining task."""

    name: str  # recorded as the weights' origin

    @abstractmethod
    def views(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """uint8 (b, 3, H, W) -> the augmented, standardized views float32 (V * b, 3, H, W), view-major."""

    @abstractmethod
    def head(self, feature_dim: int) -> nn.Module:
        """The module on top of the backbone during pretraining (discarded after): (n, feature_dim) -> (n, D)."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, local: int) -> torch.Tensor:
        """Scalar loss of the head's outputs (V * local, D) for this process's `local` images."""

    @property
    @abstractmethod
    def views_per_image(self) -> int:
        """V: views of each image the network sees per step."""


def knn_due(epoch, epochs, every):
    """Whether the kNN monitor runs after this epoch (counted from 1): every `every`-th one and the last."""
    return epoch % every == 0 or epoch == epochs


class PretrainTask(train.Task):
    """One pretraining run of `method` on `images` (uint8 (N, 3, H, W) on the device) from `backbone`.
    `cfg` is params' PretrainParams; `monitor(backbone)` -> accuracy; `on_epoch(row)` logs each epoch."""

    def __init__(self, method, images, backbone, monitor, cfg, seed, device, on_epoch):
        super().__init__(cfg.batch_size, "pretrain.batch_size", len(images) // cfg.batch_size, cfg.epochs,
                         cfg.warmup_epochs, cfg.lr, seed, device)
        self.method, self.images, self.monitor, self.cfg, self.on_epoch = method, images, monitor, cfg, on_epoch
        self.model = BackboneWithHead(backbone, method.head(backbone.feature_dim))  # moved by prepare_model
        self.compiled = train.prepare_model(self.model, device, cfg.compile, cfg.sync_batchnorm)
        self.optimizer = train.make_optimizer(cfg.optimizer, train.param_groups(self.model, cfg.weight_decay),
                                              cfg.lr, cfg.momentum)

    def batch_order(self, epoch):
        return train.epoch_order(len(self.images), self.seed, epoch, self.device)

    def train_step(self, epoch, index):
        return self.learn(self.make_views(self.images[index]))

    def make_views(self, images):
        """uint8 (b, 3, H, W) -> the method's views (V * b, 3, H, W), laid out for the device."""
        return train.channels_last(self.method.views(images, self.generator))

    def learn(self, views):
        """One optimizer step on this rank's views (V * local, 3, H, W); the loss, left on the device."""
        with train.autocast(self.device):
            outputs = self.compiled(views)  # (V * local, D)
        return train.optimize(self.optimizer, self.method.loss(outputs, self.local))

    def finish_epoch(self, epoch, mean_loss, seconds):
        due = knn_due(epoch + 1, self.cfg.epochs, self.cfg.knn_every)
        knn = self.monitor(self.model.backbone) if due and distributed.is_main() else None
        images_per_second = self.steps_per_epoch * self.images_per_step / seconds
        views_per_second = self.method.views_per_image * images_per_second  # what the network sees
        row = {"epoch": epoch + 1, "loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"],
               "knn_accuracy": knn, "seconds": seconds, "images_per_second": images_per_second,
               "views_per_second": views_per_second}
        self.history.append(row)
        self.on_epoch(row)
        eta = (self.cfg.epochs - epoch - 1) * self.train_seconds / len(self.history)
        # No views/s here: the log line's img/s times the whole epoch (kNN included), these seconds only training.
        fields = {} if knn is None else {"kNN accuracy": knn}
        return {**fields, "ETA": format_seconds(eta)}
