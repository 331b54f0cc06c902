"""Batched augmentations with kornia, on whatever device the images are on.

Every random parameter is drawn per sample as a tensor from a `torch.Generator`, and each
operation is one batched kornia call (one affine warp for crop and flip), so there is no
per-image Python work and no host round trip. Computed in float32 (kornia's hue in float16
can give NaN). Input: uint8 (B, 3, H, W); output: standardized float32 (B, 3, H, W).
"""
import math

import kornia
import torch


class Standardize:
    """Images -> (x - mean) / std per channel, with the training images' statistics (the data
    stage's meta.json: a fact of the data, not a setting). The (1, 3, 1, 1) statistics are made
    once per device: a host-to-device copy on every step would make the host wait for the GPU."""

    def __init__(self, mean, std):
        self.mean, self.std, self._on = tuple(mean), tuple(std), {}

    def _statistics(self, device):
        if device not in self._on:
            self._on[device] = (torch.tensor(self.mean, device=device).view(1, 3, 1, 1),
                                torch.tensor(self.std, device=device).view(1, 3, 1, 1))
        return self._on[device]

    def __call__(self, x):
        """float32 in [0, 1] (B, 3, H, W) -> standardized, in place: x must be the caller's own float
        temporary (never a tensor it still needs); returns x."""
        mean, std = self._statistics(x.device)
        return x.sub_(mean).div_(std)

    def images(self, x):
        """uint8 (B, 3, H, W) -> standardized float32 (B, 3, H, W); x is left as it is."""
        return self(x / 255.0)  # uint8 / float -> a new float32 tensor


def _uniform(generator, shape, low, high, device):
    """Uniform in [low, high), float32 of `shape` (an int or a tuple)."""
    return low + (high - low) * torch.rand(shape, generator=generator, device=device)


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


# The colour-jitter operations, in the order `jitter_order` numbers them (0..3).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
# Each operation's factor that leaves an image unchanged (hue's is a shift in turns).
JITTER_NEUTRAL = {"brightness": 1.0, "contrast": 1.0, "saturation": 1.0, "hue": 0.0}
# Tries of the random resized crop before its fallback (torchvision's RandomResizedCrop: 10).
CROP_TRIES = 10


def resized_crop_boxes(generator, batch, height, width, scale_min, ratio_max, device):
    """Integer crop boxes (x0, y0, w, h) float32 (B, 4) drawn as torchvision's RandomResizedCrop.get_params.

    Per sample: up to CROP_TRIES tries of an area uniform in [scale_min, 1] of the image and an
    aspect ratio log-uniform in [1 / ratio_max, ratio_max], w and h rounded to pixels; the first
    try that fits the image wins, with an offset uniform over the integer positions. Samples with
    no fitting try fall back to the central crop of the largest box within the ratio range.
    All tries are drawn at once, (B, CROP_TRIES), so there is no loop and no host sync.
    """
    log_ratio = math.log(ratio_max)
    area = _uniform(generator, (batch, CROP_TRIES), scale_min, 1.0, device) * (height * width)
    ratio = torch.exp(_uniform(generator, (batch, CROP_TRIES), -log_ratio, log_ratio, device))
    w, h = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))  # (B, T) each
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (B, T)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # index of the first fitting try (0 when none)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)  # (B,) each
    fallback_w, fallback_h = _fallback_size(height, width, ratio_max)
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    x0 = torch.floor(torch.rand(batch, generator=generator, device=device) * (width - w + 1))
    y0 = torch.floor(torch.rand(batch, generator=generator, device=device) * (height - h + 1))
    x0 = torch.where(found, x0, torch.floor((width - w) / 2))
    y0 = torch.where(found, y0, torch.floor((height - h) / 2))
    return torch.stack([x0, y0, w, h], 1)


def _fallback_size(height, width, ratio_max):
    """(w, h) of torchvision's fallback: the whole image, cut to the nearest allowed aspect ratio."""
    aspect, ratio_min = width / height, 1.0 / ratio_max
    if aspect < ratio_min:
        return float(width), float(round(width / ratio_min))
    if aspect > ratio_max:
        return float(round(height * ratio_max)), float(height)
    return float(width), float(height)


def jitter_order(generator, batch, device):
    """A random order of the four jitter operations per sample, as ColorJitter draws it:
    int64 (B, 4), row b a permutation of 0..3 (indices into JITTER_OPS)."""
    return torch.rand(batch, len(JITTER_OPS), generator=generator, device=device).argsort(1)


def jitter_op(name, x, factor):
    """One colour operation with a per-sample factor (B,) on float images (B, 3, H, W) in [0, 1]."""
    if name == "brightness":
        return kornia.enhance.adjust_brightness_accumulative(x, factor)
    if name == "contrast":
        return kornia.enhance.adjust_contrast_with_mean_subtraction(x, factor)
    if name == "saturation":
        return kornia.enhance.adjust_saturation_with_gray_subtraction(x, factor)
    # turns -> radians; the other three clip to [0, 1] themselves, hue's HSV round trip may not
    return kornia.enhance.adjust_hue(x, factor * 2 * math.pi).clamp(0.0, 1.0)


def color_jitter(x, factors, order, on):
    """Apply the four operations to each sample in its own order, batched.

    x float (B, 3, H, W) in [0, 1]; factors {name: (B,)} (neutral: JITTER_NEUTRAL); order (B, 4) from
    `jitter_order`; on bool (B,) (samples left unchanged where False). Round r applies, to every
    sample, the operation order[:, r] names: each operation runs on the whole batch and is kept
    only where it is that sample's r-th (4 x 4 batched calls, no per-sample work, no host sync).
    """
    mask = on.view(-1, 1, 1, 1)
    for position in range(len(JITTER_OPS)):
        for index, name in enumerate(JITTER_OPS):
            chosen = (order[:, position] == index).view(-1, 1, 1, 1) & mask  # (B, 1, 1, 1)
            x = torch.where(chosen, jitter_op(name, x, factors[name]), x)
    return x


def blur_kernel_size(image_size):
    """Odd side of the Gaussian-blur kernel for images of side `image_size`: about 10% of it
    (SimCLR, Chen et al. 2020, appendix A). image_size // 10 (10% rounded down), plus 1 when even,
    at least 3: 32 -> 3, 48 -> 5, 64 -> 7, 96 -> 9, 224 -> 23."""
    size = image_size // 10
    return max(3, size + 1 - size % 2)


def blurs(cfg, height: int, width: int) -> bool:
    """Whether SimCLR's augmentation (params' SimCLRAugmentParams `cfg`) blurs images of height x width:
    only from `cfg.blur_from` pixels a side (not CIFAR's 32)."""
    return min(height, width) >= cfg.blur_from


def gaussian_blur(x, sigma, kernel_size):
    """Blur each sample with its own standard deviation: x float (B, 3, H, W), sigma (B,) in pixels,
    kernel_size odd -> (B, 3, H, W), clamped to [0, 1], reflect border (as torchvision's gaussian_blur).

    One batched kornia filter with one kernel per sample. Not kornia's gaussian_blur2d: in kornia 0.9
    its check that sigma is positive reads sigma on the host, a sync for a sigma on the GPU.
    """
    kernel = kornia.filters.get_gaussian_kernel1d(kernel_size, sigma.view(-1, 1))  # (B, k), rows and columns alike
    return kornia.filters.filter2d_separable(x, kernel, kernel, border_type="reflect").clamp(0.0, 1.0)


def blur_draws(generator, batch, p, sigma_min, sigma_max, device):
    """Per-sample blur parameters: (on bool (B,), True with probability p; sigma float32 (B,) uniform in
    [sigma_min, sigma_max))."""
    on = _chance(generator, batch, p, device)
    return on, _uniform(generator, batch, sigma_min, sigma_max, device)


def random_blur(x, generator, p, sigma_min, sigma_max, kernel_size):
    """SimCLR's random Gaussian blur on float (B, 3, H, W) in [0, 1]: each sample blurred with probability p,
    sigma drawn by `blur_draws`; the others are returned exactly unchanged. With p == 0 nothing is drawn,
    so the generator's later draws are those of a pipeline without blur."""
    if p == 0:
        return x
    on, sigma = blur_draws(generator, x.shape[0], p, sigma_min, sigma_max, x.device)
    return torch.where(on.view(-1, 1, 1, 1), gaussian_blur(x, sigma, kernel_size), x)


class SimCLRAugment:
    """Random resized crop, horizontal flip, colour jitter (random order), grayscale and, for images
    of `cfg.blur_from` pixels or more, Gaussian blur: SimCLR's recipe, drawn as torchvision's
    transforms draw it, per sample. `cfg` is params' SimCLRAugmentParams."""

    def __init__(self, cfg, standardize):
        self.cfg, self.standardize = cfg, standardize
        self.spread = {name: getattr(cfg, name) for name in JITTER_OPS}

    def __call__(self, images, generator):
        """uint8 (B, 3, H, W) -> standardized float32 (B, 3, H, W); randomness from `generator`."""
        cfg, (batch, _, height, width), device = self.cfg, images.shape, images.device
        x = images / 255.0  # uint8 -> a new float32 (B, 3, H, W) in [0, 1]
        box = resized_crop_boxes(generator, batch, height, width, cfg.crop_scale_min, cfg.crop_ratio_max, device)
        x = affine_crop_flip(x, box, _chance(generator, batch, cfg.flip_p, device))
        x = self._jitter(x, generator)
        gray = _chance(generator, batch, cfg.grayscale_p, device).view(-1, 1, 1, 1)
        x = torch.where(gray, kornia.color.rgb_to_grayscale(x).expand_as(x), x)
        x = self.blur(x, generator, cfg.blur_p if blurs(cfg, height, width) else 0.0)  # p 0 draws nothing (CIFAR)
        return self.standardize(x)  # x is this call's own tensor (each step above made a new one)

    def blur(self, x, generator, p):
        """The Gaussian blur of float (B, 3, H, W) in [0, 1], each sample with probability p (`random_blur`):
        sigma in [blur_sigma_min, blur_sigma_max), a kernel of about 10% of the image side."""
        cfg = self.cfg
        return random_blur(x, generator, p, cfg.blur_sigma_min, cfg.blur_sigma_max,
                           blur_kernel_size(min(x.shape[-2:])))

    def _jitter(self, x, generator):
        """Colour jitter with probability jitter_p: per-sample factors, per-sample order."""
        batch, device = x.shape[0], x.device
        on = _chance(generator, batch, self.cfg.jitter_p, device)
        factors = {}
        for name, spread in self.spread.items():
            neutral = JITTER_NEUTRAL[name]
            factors[name] = _uniform(generator, batch, neutral - spread, neutral + spread, device)
        return color_jitter(x, factors, jitter_order(generator, batch, device), on)


class SupervisedAugment:
    """Random crop after zero padding (integer shifts) and horizontal flip, for fine-tuning.
    `cfg` is params' SupervisedAugmentParams."""

    def __init__(self, cfg, standardize):
        self.padding, self.flip_p, self.standardize = cfg.crop_padding, cfg.flip_p, standardize

    def __call__(self, images, generator):
        """uint8 (B, 3, H, W) -> standardized float32 (B, 3, H, W)."""
        batch, _, height, width = images.shape
        device = images.device
        shift = torch.randint(-self.padding, self.padding + 1, (batch, 2), generator=generator, device=device)
        box = torch.zeros(batch, 4, device=device)
        box[:, :2] = shift.float()
        box[:, 2], box[:, 3] = width, height
        flip = _chance(generator, batch, self.flip_p, device)
        # uint8 -> float32 in [0, 1], warped into a new tensor, which is standardized in place
        return self.standardize(affine_crop_flip(images / 255.0, box, flip, mode="nearest", padding_mode="zeros"))
