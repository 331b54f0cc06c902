"""SimCLR augmentation drawn as torchvision draws it: crop boxes, colour-jitter order, Gaussian blur."""
import kornia
import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from stages.lib import augment, params
from stages.lib.augment import (
    JITTER_OPS, SimCLRAugment, SupervisedAugment, blur_draws, blur_kernel_size, color_jitter, gaussian_blur,
    jitter_order, random_blur, resized_crop_boxes,
)
from tests.conftest import REPO, STANDARDIZE

DRAWS = 100_000


def torchvision_boxes(draws, height, width, scale_min, ratio_max, seed):
    """(w, h) of `draws` calls of torchvision's RandomResizedCrop.get_params: float64 (draws, 2)."""
    torch.manual_seed(seed)
    image = torch.zeros(3, height, width)
    boxes = [RandomResizedCrop.get_params(image, (scale_min, 1.0), (1 / ratio_max, ratio_max))
             for _ in range(draws)]
    return np.array([(w, h) for _, _, h, w in boxes], dtype=float)


@pytest.mark.parametrize("height, width, scale_min", [(32, 32, 0.08), (24, 40, 0.2)])
def test_crop_area_and_ratio_follow_torchvision(height, width, scale_min):
    ours = resized_crop_boxes(torch.Generator().manual_seed(0), DRAWS, height, width, scale_min, 4 / 3,
                              torch.device("cpu")).double().numpy()
    theirs = torchvision_boxes(DRAWS, height, width, scale_min, 4 / 3, seed=0)
    area = height * width
    for name, a, b in (("area", ours[:, 2] * ours[:, 3] / area, theirs[:, 0] * theirs[:, 1] / area),
                       ("ratio", ours[:, 2] / ours[:, 3], theirs[:, 0] / theirs[:, 1])):
        assert abs(a.mean() - b.mean()) < 0.01, name
        assert stats.ks_2samp(a, b).pvalue > 0.001, name


def test_crop_boxes_are_whole_pixels_inside_the_image():
    boxes = resized_crop_boxes(torch.Generator().manual_seed(1), 20_000, 32, 32, 0.08, 4 / 3, torch.device("cpu"))
    x0, y0, w, h = boxes.unbind(1)
    assert torch.equal(boxes, boxes.round())
    assert (w >= 1).all() and (h >= 1).all() and (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= 32).all() and (y0 + h <= 32).all()
    # Offsets cover every position: for full-width crops, x0 is 0; for 1-pixel-wide ones, any of 0..31.
    assert len(torch.unique(x0)) > 20


def test_crop_fallback_is_central_and_within_the_ratio():
    # Areas near the whole image of a 10x40 strip never fit at ratio <= 4/3: every sample falls back.
    boxes = resized_crop_boxes(torch.Generator().manual_seed(0), 100, 10, 40, 0.99, 4 / 3, torch.device("cpu"))
    assert torch.equal(boxes, torch.tensor([[13.0, 0.0, 13.0, 10.0]]).expand(100, 4))  # round(10 * 4/3) = 13 wide


def test_jitter_order_varies_per_sample_and_repeats_with_the_generator():
    order = jitter_order(torch.Generator().manual_seed(0), 512, torch.device("cpu"))
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(512, 4))  # each row a permutation
    assert len(torch.unique(order, dim=0)) > 1
    for position in range(4):  # every operation occurs at every position
        assert set(order[:, position].tolist()) == {0, 1, 2, 3}
    assert torch.equal(order, jitter_order(torch.Generator().manual_seed(0), 512, torch.device("cpu")))


def test_color_jitter_applies_each_samples_own_order():
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(8, 3, 6, 6, generator=generator)
    factors = {"brightness": torch.full((8,), 1.3), "contrast": torch.full((8,), 0.6),
               "saturation": torch.full((8,), 1.4), "hue": torch.full((8,), 0.1)}
    order = jitter_order(generator, 8, torch.device("cpu"))
    on = torch.tensor([True] * 7 + [False])
    out = color_jitter(x, factors, order, on)
    for b in range(7):
        expected = x[b : b + 1]
        for index in order[b].tolist():
            name = JITTER_OPS[index]
            expected = augment.jitter_op(name, expected, factors[name][:1])  # each op clips to [0, 1]
        torch.testing.assert_close(out[b : b + 1], expected)
    torch.testing.assert_close(out[7], x[7])  # jitter off: unchanged
    # Several orders were drawn, and the order matters: brightness then contrast is not contrast then brightness.
    assert len({tuple(row) for row in order[:7].tolist()}) > 1
    b, c = (lambda y: augment.jitter_op("brightness", y, factors["brightness"][:1]),
            lambda y: augment.jitter_op("contrast", y, factors["contrast"][:1]))
    assert not torch.allclose(c(b(x[:1])), b(c(x[:1])))


@pytest.mark.parametrize("size, kernel", [(32, 3), (48, 5), (64, 7), (96, 9), (224, 23)])
def test_blur_kernel_is_about_a_tenth_of_the_image(size, kernel):
    assert blur_kernel_size(size) == kernel


def test_blur_kernel_is_odd_at_least_3_and_within_a_pixel_of_a_tenth():
    for size in range(1, 1025):
        kernel = blur_kernel_size(size)
        assert kernel % 2 == 1 and kernel >= 3, size
        assert size < 30 or abs(kernel - 0.1 * size) <= 1, size


@pytest.mark.parametrize("height, width, kernel", [(32, 32, 3), (96, 96, 9), (48, 64, 5)])
def test_gaussian_blur_matches_torchvision_per_sample(height, width, kernel):
    """Every pixel, borders included: both mirror the image about its edge pixels ("reflect")."""
    x = torch.rand(5, 3, height, width, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    out = gaussian_blur(x, sigma, kernel)
    for b in range(5):
        expected = TF.gaussian_blur(x[b], [kernel, kernel], [sigma[b].item()] * 2)
        torch.testing.assert_close(out[b], expected, rtol=0, atol=1e-5)
    # one sample's sigma changes only that sample's result
    other = gaussian_blur(x, torch.tensor([0.1, 0.5, 1.0, 1.7, 0.3]), kernel)
    assert torch.equal(other[:4], out[:4]) and not torch.allclose(other[4], out[4])


def test_gaussian_blur_matches_kornias_blur_with_per_sample_sigma():
    x = torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.3, 1.1, 2.0])
    expected = kornia.filters.gaussian_blur2d(x, 5, torch.stack([sigma, sigma], 1), border_type="reflect")
    torch.testing.assert_close(gaussian_blur(x, sigma, 5), expected, rtol=0, atol=1e-6)


def test_gaussian_blur_keeps_shape_dtype_and_range_and_smooths():
    generator = torch.Generator().manual_seed(2)
    x = (torch.rand(4, 3, 64, 64, generator=generator) > 0.5).float()  # only 0 and 1: extremes everywhere
    x[3] = 1.0
    out = gaussian_blur(x, torch.full((4,), 2.0), blur_kernel_size(64))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert (out[:3].var() < 0.5 * x[:3].var()).item()  # a 7x7 kernel at sigma 2 averages the noise away
    torch.testing.assert_close(out[3], x[3], rtol=0, atol=1e-6)  # a flat image stays flat


def test_blur_draws_follow_p_and_the_sigma_range():
    on, sigma = blur_draws(torch.Generator().manual_seed(0), DRAWS, 0.5, 0.1, 2.0, torch.device("cpu"))
    assert on.dtype == torch.bool and sigma.dtype == torch.float32
    assert abs(on.float().mean().item() - 0.5) < 0.01
    assert sigma.min() >= 0.1 and sigma.max() < 2.0
    assert stats.kstest(sigma.double().numpy(), stats.uniform(0.1, 1.9).cdf).pvalue > 0.001


def test_random_blur_blurs_the_drawn_samples_and_leaves_the_others_exactly():
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = random_blur(x, torch.Generator().manual_seed(7), 0.5, 0.1, 2.0, 3)
    on, sigma = blur_draws(torch.Generator().manual_seed(7), 64, 0.5, 0.1, 2.0, torch.device("cpu"))
    assert 0 < on.sum() < 64
    assert torch.equal(out[~on], x[~on])
    assert torch.equal(out[on], gaussian_blur(x, sigma, 3)[on])
    assert not torch.equal(out[on], x[on])


def test_random_blur_off_draws_nothing_and_on_blurs_all():
    x = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(8)
    state = generator.get_state()
    assert random_blur(x, generator, 0.0, 0.1, 2.0, 3) is x
    assert torch.equal(generator.get_state(), state)  # later draws are those of a pipeline without blur
    out = random_blur(x, generator, 1.0, 1.0, 2.0, 3)  # (below sigma 0.17, a 3-tap kernel is the identity in float32)
    assert all(not torch.equal(out[b], x[b]) for b in range(16))


def augmentations(blur_from):
    """params.yaml's SimCLRAugment, blurring half the views of blur_from pixels or more, and SupervisedAugment."""
    p = params.load(REPO / "params.yaml", "pretrain", "finetune")
    simclr = p.pretrain.augment.model_copy(update={"blur_p": 0.5, "blur_from": blur_from})
    return SimCLRAugment(simclr, STANDARDIZE), SupervisedAugment(p.finetune.augment, STANDARDIZE)


def test_augmentations_read_nothing_back_to_the_host(monkeypatch):
    """No tensor is read back to the host as a Python value or by the methods nonzero(), .cpu() or .numpy()
    (each a host sync on the GPU) in the blur or either pipeline. kornia's gaussian_blur2d would: it checks a
    tensor sigma with bool(), which this test catches. Data-dependent shapes (mask indexing) are left to the
    CUDA test below."""
    def host_read(*args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    simclr, supervised = augmentations(blur_from=32)  # 32x32 images: the blur runs
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(6))
    generator = torch.Generator().manual_seed(9)
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with pytest.raises(AssertionError, match="read on the host"):
        kornia.filters.gaussian_blur2d(x, 3, torch.ones(8, 2))
    simclr(images, generator)  # its blur: random_blur at p 0.5 on these 32x32 images
    supervised(images, generator)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmentations_on_gpu_do_not_sync():
    """A training step's augmentation: after a first call (which puts the channel statistics on the GPU,
    once), neither pipeline nor the blur waits for the GPU."""
    simclr, supervised = augmentations(blur_from=96)  # 96x96 images: the blur runs
    x = torch.rand(256, 3, 96, 96, device="cuda")
    images = torch.randint(0, 256, (256, 3, 96, 96), dtype=torch.uint8, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    simclr(images, generator)
    supervised(images, generator)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        outs = [random_blur(x, generator, 0.5, 0.1, 2.0, blur_kernel_size(96)),
                simclr(images, generator), supervised(images, generator)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(out.shape == x.shape and torch.isfinite(out).all() for out in outs)


def test_simclr_views_blur_only_from_blur_from_pixels():
    """SimCLR blurs ImageNet-size views (p = blur_p), never CIFAR's: below blur_from nothing is drawn."""
    cfg = params.load(REPO / "params.yaml", "pretrain").pretrain.augment
    for size, blurred in ((cfg.blur_from - 1, False), (cfg.blur_from, True)):
        images = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8)
        sharp = cfg.model_copy(update={"blur_p": 0.0})
        with_blur = SimCLRAugment(cfg.model_copy(update={"blur_p": 1.0}), STANDARDIZE)(
            images, torch.Generator().manual_seed(0))
        without = SimCLRAugment(sharp, STANDARDIZE)(images, torch.Generator().manual_seed(0))
        assert torch.equal(with_blur, without) is not blurred
