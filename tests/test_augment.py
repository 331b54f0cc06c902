"""SimCLR augmentation drawn as torchvision draws it: crop boxes and colour-jitter order."""
import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import RandomResizedCrop

from stages.lib import augment
from stages.lib.augment import JITTER_OPS, color_jitter, jitter_order, resized_crop_boxes

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
    for name, a, b in (("area", ours[:, 2] * ours[:, 3] / (height * width), theirs[:, 0] * theirs[:, 1] / (height * width)),
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
            expected = augment._jitter_op(name, expected, factors[name][:1]).clamp(0, 1)
        torch.testing.assert_close(out[b : b + 1], expected)
    torch.testing.assert_close(out[7], x[7])  # jitter off: unchanged
    # The order matters: brightness then contrast is not contrast then brightness.
    assert len({tuple(row) for row in order[:7].tolist()}) > 1
