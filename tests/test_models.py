"""The backbone's two stems and the weights files that record them."""
import pytest
import torch
import torchvision
from torch import nn

from stages.lib.cli import UserError
from stages.lib.io import save_torch
from stages.lib.models import (
    ResNet, load_backbone, load_into, read_weights, save_backbone, save_backbones, stem_for,
)


def reference_cifar_resnet(seed, blocks, width):
    """{name: layer} of the CIFAR-stem ResNet as it was built before stems were selectable: plain layers
    created in the same order from the same seed, then Kaiming init of the convolutions in that order."""
    torch.manual_seed(seed)
    layers = {"stem.0": nn.Conv2d(3, width, 3, 1, 1, bias=False), "stem.1": nn.BatchNorm2d(width)}
    index, in_channels = 0, width
    for stage, count in enumerate(blocks):
        channels = width * 2**stage
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            name = f"layers.{index}"
            layers[f"{name}.conv1"] = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
            layers[f"{name}.bn1"] = nn.BatchNorm2d(channels)
            layers[f"{name}.conv2"] = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
            layers[f"{name}.bn2"] = nn.BatchNorm2d(channels)
            if stride != 1 or in_channels != channels:
                layers[f"{name}.shortcut.0"] = nn.Conv2d(in_channels, channels, 1, stride, bias=False)
                layers[f"{name}.shortcut.1"] = nn.BatchNorm2d(channels)
            index, in_channels = index + 1, channels
    for layer in layers.values():
        if isinstance(layer, nn.Conv2d):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
    return layers


@pytest.mark.parametrize("arch, blocks, width", [("resnet18", (2, 2, 2, 2), 64), ("resnet34", (3, 4, 6, 3), 8)])
def test_cifar_stem_weights_are_bit_identical_to_the_plain_reference(arch, blocks, width):
    reference = {f"{name}.{key}": value
                 for name, layer in reference_cifar_resnet(5, blocks, width).items()
                 for key, value in layer.state_dict().items()}
    torch.manual_seed(5)
    state = ResNet(arch, width, "cifar").state_dict()
    assert list(state) == list(reference)  # same names, same order
    for key, value in reference.items():
        assert torch.equal(state[key], value), key
    torch.manual_seed(6)  # another seed gives other weights: the comparison above can fail
    assert not torch.equal(ResNet(arch, width, "cifar").state_dict()["stem.0.weight"], reference["stem.0.weight"])


@pytest.mark.parametrize("size, width", [(32, 8), (40, 8), (32, 64)])
def test_cifar_stem_keeps_the_side_and_has_no_max_pool(size, width):
    backbone = ResNet("resnet18", width, "cifar")
    assert backbone.stem_type == "cifar"
    x = torch.rand(2, 3, size, size)
    assert backbone.stem(x).shape == (2, width, size, size)
    assert backbone(x).shape == (2, 8 * width)  # features: 8 x width
    conv = backbone.stem[0]
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())


@pytest.mark.parametrize("size, side", [(96, 24), (224, 56), (97, 25)])
def test_standard_stem_divides_the_side_by_four(size, side):
    backbone = ResNet("resnet18", 8, "standard")
    assert backbone.stem_type == "standard"
    x = torch.rand(2, 3, size, size)
    assert backbone.stem(x).shape == (2, 8, side, side)
    assert backbone(x).shape == (2, 64)


def test_standard_stem_resnet_computes_torchvisions_resnet18_features():
    """Same tensors in the same order as torchvision's resnet18 (less its fc): copied over, the
    features equal torchvision's pooled features, so the standard stem is torchvision's."""
    theirs = torchvision.models.resnet18(weights=None).eval()
    ours = ResNet("resnet18", 64, "standard").eval()
    their_state = {k: v for k, v in theirs.state_dict().items() if not k.startswith("fc.")}
    assert [v.shape for v in ours.state_dict().values()] == [v.shape for v in their_state.values()]
    ours.load_state_dict(dict(zip(ours.state_dict(), their_state.values())))
    x = torch.rand(2, 3, 64, 64)
    trunk = nn.Sequential(*list(theirs.children())[:-1])  # everything up to the average pool
    torch.testing.assert_close(ours(x), torch.flatten(trunk(x), 1), rtol=1e-5, atol=1e-5)


def test_unknown_stem_is_one_line_listing_the_choices():
    with pytest.raises(UserError) as error:
        ResNet("resnet18", 8, "imagenet")
    assert str(error.value) == "stem = 'imagenet': must be one of cifar, standard"


@pytest.mark.parametrize("size, stem", [(32, "cifar"), (95, "cifar"), (96, "standard"), (224, "standard")])
def test_stem_for_switches_at_the_threshold(size, stem):
    assert stem_for(size, 96) == stem


def test_weights_files_record_the_stem_and_load_back(tmp_path):
    torch.manual_seed(0)
    backbone = ResNet("resnet18", 4, "standard")
    save_backbone(tmp_path / "ssl.pt", backbone, origin="simclr", params={})
    save_backbones(tmp_path / "baseline.pt", {0: ResNet("resnet18", 4, "standard")}, origin="random", params={})
    assert read_weights(tmp_path / "ssl.pt", "resnet18", 4, "standard")["stem"] == "standard"
    assert read_weights(tmp_path / "baseline.pt", "resnet18", 4, "standard")["stem"] == "standard"
    loaded, _ = load_backbone(tmp_path / "ssl.pt", "resnet18", 4, "standard")
    assert loaded.stem_type == "standard"
    for key, value in backbone.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_weights_file_of_another_stem_is_refused_naming_the_stem(tmp_path):
    save_backbone(tmp_path / "ssl.pt", ResNet("resnet18", 4, "cifar"), origin="simclr", params={})
    with pytest.raises(UserError) as error:
        load_backbone(tmp_path / "ssl.pt", "resnet18", 4, "standard")
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "ssl.pt") in message
    assert "holds resnet18 width 4 weights with the cifar stem" in message
    assert "ask for resnet18 width 4 with the standard stem (stem differs)" in message
    with pytest.raises(UserError, match=r"\(width and stem differ\)"):
        read_weights(tmp_path / "ssl.pt", "resnet18", 8, "standard")


def test_a_file_without_a_stem_holds_cifar_stem_weights(tmp_path):
    """Files written before the stem was recorded load as CIFAR-stem weights, and only as those."""
    torch.manual_seed(0)
    backbone = ResNet("resnet18", 4, "cifar")
    state = {k: v.clone() for k, v in backbone.state_dict().items()}
    save_torch(tmp_path / "old.pt", {"arch": "resnet18", "width": 4, "origin": "simclr", "params": {},
                                     "state_dict": state})
    loaded, _ = load_backbone(tmp_path / "old.pt", "resnet18", 4, "cifar")
    assert torch.equal(loaded.state_dict()["stem.0.weight"], state["stem.0.weight"])
    with pytest.raises(UserError, match="weights with the cifar stem, but params ask for resnet18 width 4 with "
                                        r"the standard stem \(stem differs\)"):
        read_weights(tmp_path / "old.pt", "resnet18", 4, "standard")


def test_load_into_names_the_stem_of_weights_that_do_not_fit(tmp_path):
    """A file whose recorded stem is right but whose tensors are not (edited by hand) is refused by load_into."""
    path = tmp_path / "ssl.pt"
    save_backbone(path, ResNet("resnet18", 4, "cifar"), origin="simclr", params={})
    saved = read_weights(path, "resnet18", 4, "cifar")
    saved["stem"] = "standard"  # the 3x3 stem conv does not fit a 7x7 one
    with pytest.raises(UserError) as error:
        load_into(ResNet("resnet18", 4, "standard"), saved, 0, path)
    message = str(error.value)
    assert "\n" not in message
    assert f"{path} does not hold resnet18 width 4 weights with the standard stem" in message
    assert "stem.0.weight" in message
