"""SimCLR (Chen et al., 2020) as a pretraining `Method`: two augmented views of each image,
a Linear-BN-ReLU-Linear projection head, and the NT-Xent loss over every process's views."""
from stages.lib import distributed
from stages.lib.augment import SimCLRAugment
from stages.lib.losses import nt_xent
from stages.lib.models import ProjectionHead
from stages.lib.pretraining import Method


class SimCLR(Method):
    """`cfg` is params' PretrainParams (temperature, proj_hidden, proj_dim, augment);
    `standardize` is the data's augment.Standardize."""

    name = "simclr"
    views_per_image = 2

    def __init__(self, cfg, standardize):
        self.temperature, self.proj_hidden, self.proj_dim = cfg.temperature, cfg.proj_hidden, cfg.proj_dim
        self.augment = SimCLRAugment(cfg.augment, standardize)

    def views(self, images, generator):
        # Both views in one call: per-sample parameters differ, and kernel launches are halved.
        return self.augment(images.repeat(2, 1, 1, 1), generator)  # (2b, 3, H, W)

    def head(self, feature_dim):
        return ProjectionHead(feature_dim, self.proj_hidden, self.proj_dim)

    def loss(self, outputs, local):
        # Negatives from every rank: (B, proj_dim) per view; gradients flow back to each rank's slice.
        z1, z2 = distributed.gather(outputs[:local]), distributed.gather(outputs[local:])
        return nt_xent(z1, z2, self.temperature)
