"""ResNet backbone with the CIFAR stem, the SimCLR projection head, and the classifier.

The same `ResNet` class serves pretraining and every fine-tuning mode. Weights files
(`save_backbone`/`load_backbone`) carry the arch and width they were built with.
"""
import torch
from torch import nn

from stages.lib.cli import UserError
from stages.lib.io import load_torch, save_torch

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    def __init__(self, in_channels, channels, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet for 32x32 images: 3x3 stride-1 stem, no max-pool, four stages, global pooling.

    Input (B, 3, 32, 32) -> features (B, 8 * width).
    """

    def __init__(self, arch, width):
        super().__init__()
        if arch not in BLOCKS:
            raise UserError(f"model.arch = {arch!r}: must be one of {', '.join(BLOCKS)}")
        self.arch, self.width, self.feature_dim = arch, width, 8 * width
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers, in_channels = [], width
        for index, blocks in enumerate(BLOCKS[arch]):
            channels, stride = width * 2**index, 1 if index == 0 else 2
            for block in range(blocks):
                layers.append(BasicBlock(in_channels, channels, stride if block == 0 else 1))
                in_channels = channels
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.layers(self.stem(x))  # (B, 8w, 4, 4)
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # (B, 8w)


class ProjectionHead(nn.Module):
    """SimCLR head: Linear-BN-ReLU-Linear, (B, in_dim) -> (B, out_dim). Discarded after pretraining."""

    def __init__(self, in_dim, hidden_dim, out_dim):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x):
        return self.net(x)


class Classifier(nn.Module):
    """Backbone plus a linear layer: (B, 3, 32, 32) -> logits (B, num_classes)."""

    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.feature_dim, num_classes)

    def forward(self, x):
        return self.head(self.backbone(x))


def _state(backbone):
    return {k: v.detach().cpu() for k, v in backbone.state_dict().items()}


def save_backbone(path, backbone, origin, params):
    """Write one backbone's weights with the arch, width and params they were made with."""
    save_torch(path, {"arch": backbone.arch, "width": backbone.width, "origin": origin,
                      "params": params, "state_dict": _state(backbone)})


def save_backbones(path, backbones, origin, params):
    """Write one backbone per seed ({seed: ResNet} of one arch and width) into one weights file."""
    first = next(iter(backbones.values()))
    save_torch(path, {"arch": first.arch, "width": first.width, "origin": origin, "params": params,
                      "seeds": {int(seed): _state(b) for seed, b in backbones.items()}})


def read_weights(path, arch, width):
    """The weights file at `path` as saved, checked to hold (arch, width) weights of this project."""
    saved = load_torch(path, "backbone weights")
    if not isinstance(saved, dict) or not ("state_dict" in saved or isinstance(saved.get("seeds"), dict)):
        raise UserError(f"{path} is not a backbone weights file of this project")
    if (saved.get("arch"), saved.get("width")) != (arch, width):
        raise UserError(
            f"{path} holds {saved.get('arch')} width {saved.get('width')} weights, but params ask for "
            f"{arch} width {width}; rerun the stage that makes it (dvc repro)"
        )
    return saved


def load_into(backbone, saved, seed, path):
    """Copy the weights of `seed` (a file of one backbone serves every seed) into `backbone`."""
    if "seeds" in saved:
        if seed not in saved["seeds"]:
            raise UserError(f"{path} holds starting weights for seeds {sorted(saved['seeds'])}, not for seed {seed}; "
                            "rerun the stage that makes it (dvc repro)")
        state = saved["seeds"][seed]
    else:
        state = saved["state_dict"]
    try:
        backbone.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:  # missing, extra or misshapen tensors
        detail = " ".join(str(error).split())[:300]
        raise UserError(f"{path} does not hold {backbone.arch} width {backbone.width} weights ({detail}); "
                        "rerun the stage that makes it (dvc repro)") from None
    return backbone


def load_backbone(path, arch, width, seed=0):
    """A ResNet(arch, width) holding the weights in `path` (those of `seed` in a per-seed file), and the file."""
    saved = read_weights(path, arch, width)
    return load_into(ResNet(arch, width), saved, seed, path), saved
