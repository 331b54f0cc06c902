"""SimCLR pretraining (Chen et al., 2020) as a task for `train.run_epochs`.

All training images sit on the device as one uint8 tensor; a step indexes a batch,
makes two augmented views on the device, and minimises NT-Xent on their projections.
"""
import time

from torch import nn

from stages.lib import distributed, train
from stages.lib.augment import SimCLRAugment
from stages.lib.knn import knn_accuracy
from stages.lib.losses import nt_xent
from stages.lib.progress import format_seconds
from stages.lib.models import ProjectionHead, ResNet

AUGMENT_KEYS = ("crop_scale_min", "crop_ratio_max", "flip_p", "jitter_p", "brightness", "contrast",
                "saturation", "hue", "grayscale_p")


class SimCLR(nn.Module):
    """Backbone + projection head: images (B, 3, H, W) -> projections (B, proj_dim)."""

    def __init__(self, backbone, proj_hidden, proj_dim):
        super().__init__()
        self.backbone = backbone
        self.head = ProjectionHead(backbone.feature_dim, proj_hidden, proj_dim)

    def forward(self, x):
        return self.head(self.backbone(x))


class PretrainTask(train.Task):
    """One SimCLR run. `monitor` holds the kNN images: (train_x, train_y, val_x, val_y) on the device."""

    def __init__(self, images, monitor, p, arch, width, seed, device, on_epoch):
        self.images, self.monitor, self.p, self.seed, self.device = images, monitor, p, seed, device
        self.on_epoch = on_epoch  # callback(row): logging of each epoch's history row
        self.batch = self.images_per_step = p["batch_size"]  # global: split evenly over the processes
        self.local = distributed.per_rank_batch(self.batch, "pretrain.batch_size")
        self.steps_per_epoch = len(images) // self.batch
        self.total_steps = p["epochs"] * self.steps_per_epoch
        self.model = SimCLR(ResNet(arch, width), p["proj_hidden"], p["proj_dim"]).to(device)
        self.compiled = train.prepare_model(self.model, device, p["compile"], p["sync_batchnorm"])
        self.optimizer = train.make_optimizer(p["optimizer"], train.param_groups(self.model, p["weight_decay"]),
                                              p["lr"], p["momentum"])
        self.augment = SimCLRAugment(**{key: p[key] for key in AUGMENT_KEYS})
        self.generator = train.rank_generator(seed, device)  # each rank draws its own augmentations
        self.history, self.train_seconds, self.order, self.order_epoch = [], 0.0, None, None
        self.epoch_start = time.perf_counter()

    def step(self, epoch, step):
        if self.order_epoch != epoch:
            self.order, self.order_epoch = train.epoch_order(len(self.images), self.seed, epoch, self.device), epoch
            self.epoch_start = time.perf_counter()
        global_step = epoch * self.steps_per_epoch + step
        warmup = self.p["warmup_epochs"] * self.steps_per_epoch
        train.set_lr(self.optimizer, train.lr_at(global_step, self.total_steps, warmup, self.p["lr"]))
        x = self.images[train.rank_batch(self.order, step, self.batch, self.local)]  # uint8 (b, 3, H, W)
        # Both views in one call: per-sample parameters differ, and kernel launches are halved.
        views = train.channels_last(self.augment(x.repeat(2, 1, 1, 1), self.generator))  # (2b, 3, H, W)
        with train.autocast(self.device):
            z = self.compiled(views)  # (2b, proj_dim)
        # Negatives from every rank: (B, proj_dim) per view, gradients flow back to each rank's slice.
        z1, z2 = distributed.gather(z[: self.local]), distributed.gather(z[self.local :])
        loss = nt_xent(z1, z2, self.p["temperature"])
        return train.optimize(self.optimizer, loss)

    def end_epoch(self, epoch, mean_loss):
        seconds = train.seconds_since(self.epoch_start, self.device)
        self.train_seconds += seconds
        last = epoch + 1 == self.p["epochs"]
        due = (epoch + 1) % self.p["knn_every"] == 0 or last
        knn = self.knn() if due and distributed.is_main() else None
        images_per_second = self.steps_per_epoch * self.batch / seconds
        row = {"epoch": epoch + 1, "loss": mean_loss, "lr": self.optimizer.param_groups[0]["lr"],
               "knn_accuracy": knn, "seconds": seconds, "images_per_second": images_per_second,
               "views_per_second": 2 * images_per_second}  # the network sees two views of each image
        self.history.append(row)
        self.on_epoch(row)
        eta = (self.p["epochs"] - epoch - 1) * self.train_seconds / len(self.history)
        fields = {"views/s": f"{2 * images_per_second:,.0f}"}
        if knn is not None:
            fields["kNN accuracy"] = knn
        return {**fields, "ETA": format_seconds(eta)}

    def knn(self):
        train_x, train_y, val_x, val_y = self.monitor
        return knn_accuracy(self.model.backbone, train_x, train_y, val_x, val_y, self.p["knn_k"],
                            self.p["knn_temperature"], batch_size=1024)
