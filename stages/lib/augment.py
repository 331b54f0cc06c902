"""Batched augmentations with kornia, on whatever device the images are on.

Every random parameter is drawn per sample as a tensor from a `torch.Generator`, and each
operation is one batched kornia call (one affine warp for crop and flip), so there is no
per-image Python work and no host round trip. Computed in float32 (kornia's hue in float16
can give NaN). Input: uint8 (B, 3, H, W); output: normalized float32 (B, 3, H, W).
"""
import functools
import math

import kornia
import torch

# Per-channel statistics of the CIFAR-10 training images (a fact of the data set, not a setting).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@functools.lru_cache(maxsize=None)
def _statistics(device):
    """(mean, std) as (1, 3, 1, 1) tensors on the device, made once: a host-to-device copy on
    every step would make the host wait for the GPU."""
    return (torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1),
            torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1))


def standardize(x):
    """float32 in [0, 1] (B, 3, H, W) -> normalized with the CIFAR-10 statistics."""
    mean, std = _statistics(x.device)
    return (x - mean) / std


def normalize(x):
    """uint8 (B, 3, H, W) -> float32 normalized (B, 3, H, W)."""
    return standardize(x.float() / 255.0)


def _uniform(generator, batch, low, high, device):
    return low + (high - low) * torch.rand(batch, generator=generator, device=device)


def _chance(generator, batch, p, device):
    return torch.rand(batch, generator=generator, device=device) < p


def affine_crop_flip(x, box, flip, mode="bilinear", padding_mode="reflection"):
    """Resample each image's crop box (x0, y0, w, h in pixels, (B, 4)) to full size, mirrored where flip.

    One batched kornia warp; coordinates follow pixel areas: output pixel j samples the
    crop at x0 + (j + 0.5) * w / W.
    """
    batch, _, height, width = x.shape
    x0, y0, w, h = box.unbind(1)
    sx, sy = width / w, height / h
    tx, ty = (0.5 - x0) * sx - 0.5, (0.5 - y0) * sy - 0.5
    sign = 1.0 - 2.0 * flip.float()  # -1 mirrors: j -> W - 1 - j
    matrix = torch.zeros(batch, 2, 3, device=x.device)
    matrix[:, 0, 0] = sign * sx
    matrix[:, 0, 2] = torch.where(flip, width - 1 - tx, tx)
    matrix[:, 1, 1] = sy
    matrix[:, 1, 2] = ty
    return kornia.geometry.transform.warp_affine(
        x, matrix, (height, width), mode=mode, padding_mode=padding_mode, align_corners=True
    )


class SimCLRAugment:
    """Random resized crop, horizontal flip, colour jitter and grayscale (SimCLR's CIFAR recipe)."""

    def __init__(self, crop_scale_min, crop_ratio_max, flip_p, jitter_p, brightness, contrast,
                 saturation, hue, grayscale_p):
        self.crop_scale_min, self.log_ratio = crop_scale_min, math.log(crop_ratio_max)
        self.flip_p, self.jitter_p, self.grayscale_p = flip_p, jitter_p, grayscale_p
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue

    def __call__(self, images, generator):
        """uint8 (B, 3, H, W) -> normalized float32 (B, 3, H, W); randomness from `generator`."""
        batch, device = images.shape[0], images.device
        x = images.float() / 255.0
        x = self._crop_flip(x, generator)
        x = self._jitter(x, generator)
        gray = _chance(generator, batch, self.grayscale_p, device).view(-1, 1, 1, 1)
        x = torch.where(gray, kornia.color.rgb_to_grayscale(x).expand_as(x), x)
        return standardize(x)

    def _crop_flip(self, x, generator):
        batch, _, height, width = x.shape
        device = x.device
        area = _uniform(generator, batch, self.crop_scale_min, 1.0, device) * height * width
        ratio = torch.exp(_uniform(generator, batch, -self.log_ratio, self.log_ratio, device))
        w = torch.sqrt(area * ratio).clamp(max=width)  # crops wider than the image are clipped
        h = torch.sqrt(area / ratio).clamp(max=height)
        x0 = torch.rand(batch, generator=generator, device=device) * (width - w)
        y0 = torch.rand(batch, generator=generator, device=device) * (height - h)
        flip = _chance(generator, batch, self.flip_p, device)
        return affine_crop_flip(x, torch.stack([x0, y0, w, h], 1), flip)

    def _jitter(self, x, generator):
        """Brightness, contrast, saturation, hue (in that order), each factor per sample."""
        batch, device = x.shape[0], x.device
        on = _chance(generator, batch, self.jitter_p, device)

        def factor(spread, neutral):
            drawn = _uniform(generator, batch, neutral - spread, neutral + spread, device)
            return torch.where(on, drawn, torch.full_like(drawn, neutral))

        x = kornia.enhance.adjust_brightness_accumulative(x, factor(self.brightness, 1.0))
        x = kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor(self.contrast, 1.0))
        x = kornia.enhance.adjust_saturation_with_gray_subtraction(x, factor(self.saturation, 1.0))
        x = kornia.enhance.adjust_hue(x, factor(self.hue, 0.0) * 2 * math.pi)  # turns -> radians
        return x.clamp(0.0, 1.0)


class SupervisedAugment:
    """Random crop after zero padding (integer shifts) and horizontal flip, for fine-tuning."""

    def __init__(self, crop_padding, flip_p):
        self.padding, self.flip_p = crop_padding, flip_p

    def __call__(self, images, generator):
        """uint8 (B, 3, H, W) -> normalized float32 (B, 3, H, W)."""
        batch, _, height, width = images.shape
        device = images.device
        shift = torch.randint(-self.padding, self.padding + 1, (batch, 2), generator=generator, device=device)
        box = torch.zeros(batch, 4, device=device)
        box[:, :2] = shift.float()
        box[:, 2], box[:, 3] = width, height
        flip = _chance(generator, batch, self.flip_p, device)
        shifted = affine_crop_flip(images.float(), box, flip, mode="nearest", padding_mode="zeros")
        return normalize(shifted)
