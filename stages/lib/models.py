"""ResNet backbone (CIFAR or standard stem), the SimCLR projection head, and backbone + head models.

The same `ResNet` class serves pretraining and every fine-tuning mode. Weights files
(`save_backbone`/`load_backbone`) carry the arch, width and stem they were built with.
"""
import torch
from torch import nn

from stages.lib.cli import UserError
from stages.lib.io import load_torch, save_torch

BLOCKS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
STEMS = ("cifar", "standard")


def stem_for(image_size, standard_stem_from):
    """The stem for square images of side `image_size`: "standard" from `standard_stem_from` pixels up, else "cifar"."""
    return "standard" if image_size >= standard_stem_from else "cifar"


def _stem(stem, width):
    """The stem layers, (B, 3, S, S) -> (B, width, S, S) for "cifar", (B, width, ceil(S/4), ceil(S/4)) for "standard".

    cifar: 3x3 stride-1 conv, BN, ReLU, no max-pool (for 32x32 images). standard: torchvision's
    ResNet stem, 7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool. The max-pool has no weights,
    so both stems name their tensors stem.0.* (conv) and stem.1.* (BN).
    """
    if stem == "cifar":
        return nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    if stem == "standard":
        return nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                             nn.MaxPool2d(3, 2, 1))
    raise UserError(f"stem = {stem!r}: must be one of {', '.join(STEMS)}")


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
    """ResNet: a stem (`_stem`: "cifar" or "standard"), four stages, global pooling.

    Input (B, 3, S, S) -> features (B, 8 * width). After the stem the side is S ("cifar") or
    ceil(S/4) ("standard"); the three strided stages divide it by 8 more (rounded up).
    """

    def __init__(self, arch, width, stem):
        super().__init__()
        if arch not in BLOCKS:
            raise UserError(f"model.arch = {arch!r}: must be one of {', '.join(BLOCKS)}")
        self.arch, self.width, self.stem_type, self.feature_dim = arch, width, stem, 8 * width
        self.stem = _stem(stem, width)
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
        x = self.stem(x)  # (B, w, S, S) cifar stem; (B, w, S/4, S/4) standard stem (sides rounded up)
        x = self.layers(x)  # (B, 8w, S/8, S/8) cifar: 4x4 at 32; (B, 8w, S/32, S/32) standard: 1x1 at 32, 3x3 at 96
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


class BackboneWithHead(nn.Module):
    """A backbone and a head on its features: (B, 3, S, S) -> head outputs (B, D). Its tensors are named
    backbone.* and head.*. Pretraining puts the method's head on it; `Classifier` a linear layer."""

    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))  # (B, 8w) features -> (B, D)


class Classifier(BackboneWithHead):
    """Backbone plus a linear layer: (B, 3, S, S) -> logits (B, num_classes)."""

    def __init__(self, backbone, num_classes):
        super().__init__(backbone, nn.Linear(backbone.feature_dim, num_classes))


def _state(backbone):
    return {k: v.detach().cpu() for k, v in backbone.state_dict().items()}


def save_backbone(path, backbone, origin, params):
    """Write one backbone's weights with the arch, width, stem and params they were made with."""
    save_torch(path, {"arch": backbone.arch, "width": backbone.width, "stem": backbone.stem_type,
                      "origin": origin, "params": params, "state_dict": _state(backbone)})


def save_backbones(path, backbones, origin, params):
    """Write one backbone per seed ({seed: ResNet} of one arch, width and stem) into one weights file."""
    first = next(iter(backbones.values()))
    save_torch(path, {"arch": first.arch, "width": first.width, "stem": first.stem_type, "origin": origin,
                      "params": params, "seeds": {int(seed): _state(b) for seed, b in backbones.items()}})


def read_weights(path, arch, width, stem):
    """The weights file at `path` as saved, checked to hold (arch, width, stem) weights of this project.

    Files written before the stem was recorded hold CIFAR-stem weights: a missing "stem" reads as "cifar".
    """
    saved = load_torch(path, "backbone weights")
    if not isinstance(saved, dict) or not ("state_dict" in saved or isinstance(saved.get("seeds"), dict)):
        raise UserError(f"{path} is not a backbone weights file of this project")
    held = {"arch": saved.get("arch"), "width": saved.get("width"), "stem": saved.get("stem", "cifar")}
    asked = {"arch": arch, "width": width, "stem": stem}
    differ = [name for name in held if held[name] != asked[name]]
    if differ:
        raise UserError(
            f"{path} holds {held['arch']} width {held['width']} weights with the {held['stem']} stem, but params "
            f"ask for {arch} width {width} with the {stem} stem ({' and '.join(differ)} differ"
            f"{'s' if len(differ) == 1 else ''}); rerun the stage that makes it (dvc repro)"
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
        raise UserError(f"{path} does not hold {backbone.arch} width {backbone.width} weights with the "
                        f"{backbone.stem_type} stem ({detail}); rerun the stage that makes it (dvc repro)") from None
    return backbone


def load_backbone(path, arch, width, stem, seed=0):
    """A ResNet(arch, width, stem) holding the weights in `path` (those of `seed` in a per-seed file), and the file."""
    saved = read_weights(path, arch, width, stem)
    return load_into(ResNet(arch, width, stem), saved, seed, path), saved
