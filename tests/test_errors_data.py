"""Bad data sources: every broken archive, tree or image is named (file or folder) in one line; so is
prepared data that disagrees with its meta.json."""
import os
import types
import urllib.error

import numpy as np
import pytest

from stages.lib import sources
from stages.lib.cli import UserError
from tests.conftest import CLASSES, make_archive, png_bytes, prepared_split, save_data, synthetic_images
from tests.faults import (
    IMAGE, empty_class, extra_class, flip_byte, jpeg_bytes, mkdir, not_utf8_names, replace_image, tree, truncated,
    two_trees, without, write, xz_compressed, zip_headers,
)


# ---------------------------------------------------------------------------------------------
# 2. Data: every bad source names the file or folder



DATA_CASES = [
    ("missing-path", lambda t: t / "nowhere.tar.gz", ["nowhere.tar.gz", "does not exist"]),
    ("truncated-tar-gz", lambda t: truncated(make_archive(tree(t), t / "c.tar.gz")), ["c.tar.gz", "truncated"]),
    ("truncated-tar", lambda t: truncated(make_archive(tree(t), t / "c.tar")), ["c.tar", "truncated"]),
    ("truncated-zip", lambda t: truncated(make_archive(tree(t), t / "c.zip")), ["c.zip", "truncated"]),
    ("random-bytes-tar-gz", lambda t: write(t / "c.tar.gz", os.urandom(4096)), ["c.tar.gz", "not a valid archive"]),
    ("text-as-zip", lambda t: write(t / "c.zip", b"hello, I am text\n"), ["c.zip", "not a valid archive"]),
    ("encrypted-zip", lambda t: zip_headers(make_archive(tree(t), t / "c.zip"), "flags", 0x1),
     ["c.zip", "cannot be read (it is encrypted)"]),
    ("deflate64-zip", lambda t: zip_headers(make_archive(tree(t), t / "c.zip"), "method", 9),
     ["c.zip", "cannot be read (That compression method is not supported)"]),
    ("future-version-zip", lambda t: zip_headers(make_archive(tree(t), t / "c.zip"), "version", 107),
     ["c.zip", "not a valid archive (zip file version 10.7)"]),
    ("not-utf8-zip-names", lambda t: not_utf8_names(make_archive(tree(t), t / "c.zip")),
     ["c.zip", "not a valid archive ('utf-8' codec can't decode byte 0xff"]),
    ("bad-crc-tar-gz", lambda t: flip_byte(make_archive(tree(t), t / "c.tar.gz"), -8),  # gzip's trailer: CRC-32
     ["c.tar.gz", "not a valid archive (CRC check failed"]),
    ("corrupt-xz-tar", lambda t: flip_byte(xz_compressed(make_archive(tree(t), t / "c.tar")), -40),
     ["c.tar", "not a valid archive"]),
    ("unsupported-suffix", lambda t: make_archive(tree(t), t / "c.tar").rename(t / "c.rar"),
     ["c.rar", "not a directory or a .tar"]),
    ("empty-directory", lambda t: mkdir(t / "empty"), ["empty", "no images found"]),
    ("no-test-too-few", lambda t: without(t, "test"), ["class airplane has 2 image(s)", "no test image"]),
    ("no-train", lambda t: without(t, "train"), ["cifar10", "no train/<class>/ images"]),
    ("class-missing", lambda t: without(t, "train/frog"), ["test/ class folders", "unexpected: frog"]),
    ("class-empty", empty_class, ["test/ class folders", "empty: frog"]),
    ("train-class-empty", lambda t: empty_class(t, "train"), ["class folders without images in train/", "frog"]),
    ("class-extra", lambda t: extra_class(tree(t)), ["test/ class folders", "unexpected: unicorn"]),
    ("two-trees", two_trees, ["several train/ and test/", "cifar10", "copy"]),
    ("text-as-png", lambda t: replace_image(tree(t), IMAGE, b"not an image\n"), [IMAGE, "not a readable image"]),
    ("truncated-png", lambda t: replace_image(tree(t), IMAGE, png_bytes(synthetic_images(1)[0][0])[:200]),
     [IMAGE, "not a readable image"]),
    ("truncated-jpeg", lambda t: replace_image(tree(t), IMAGE.replace(".png", ".jpg"), jpeg_bytes()[:300]),
     [IMAGE.replace(".png", ".jpg"), "not a readable image"]),
    ("text-as-jpg", lambda t: replace_image(tree(t), IMAGE.replace(".png", ".jpg"), b"junk"),
     [IMAGE.replace(".png", ".jpg"), "not a readable image"]),
    ("bad-image-in-archive", lambda t: make_archive(replace_image(tree(t), IMAGE, b"junk"), t / "c.zip"),
     [f"{IMAGE} in ", "c.zip", "not a readable image"]),
]


@pytest.mark.parametrize("build, culprits", [c[1:] for c in DATA_CASES], ids=[c[0] for c in DATA_CASES])
def test_bad_data_source_is_named(tmp_path, build, culprits):
    source = build(tmp_path)
    with pytest.raises(UserError) as error:
        sources.read_source(str(source), 32, 0.2, 0, tmp_path / "download")
    assert "\n" not in str(error.value)
    for culprit in culprits:
        assert culprit in str(error.value)


FAKES = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}  # name -> torchvision class


def _failing(error):
    """A stand-in torchvision data set class whose construction fails with `error`."""
    def dataset_class(root, download, **split):
        raise error
    return dataset_class


@pytest.mark.parametrize("name", FAKES)
@pytest.mark.parametrize("error", [
    urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
    RuntimeError("File not found or corrupted."),
    ConnectionResetError("Connection reset by peer"),
], ids=["unreachable", "corrupted", "reset"])
def test_failed_download_says_how_to_use_a_local_copy(tmp_path, fake_torchvision, error, name):
    setattr(fake_torchvision, FAKES[name], _failing(error))
    with pytest.raises(UserError) as raised:
        sources.read_source(name, 32, 0.2, 0, tmp_path / "download")
    message = str(raised.value)
    assert "could not download" in message and "data.source" in message and str(tmp_path / "download") in message
    assert str(error) in message and "\n" not in message


def test_torchvision_classes_in_another_order_are_refused(tmp_path, fake_torchvision):
    fake_torchvision.CIFAR10 = lambda root, train, download: types.SimpleNamespace(
        classes=list(reversed(CLASSES)), data=np.zeros((1, 32, 32, 3), np.uint8), targets=[0])
    with pytest.raises(UserError, match="truck.*not in CIFAR-10 label order"):
        sources.read_source("cifar10", 32, 0.2, 0, tmp_path / "download")


def test_unknown_name_is_taken_as_a_path(tmp_path):
    with pytest.raises(UserError, match="cifar11 does not exist.*cifar10, cifar100, stl10"):
        sources.read_source("cifar11", 32, 0.2, 0, tmp_path / "download")


# (id, edit of a split's (x, y), the error's fragment given n: the split's image count in meta.json)
PREPARED_CASES = [
    ("one-image-fewer", lambda x, y: (x[:-1], y[:-1]), lambda n: f"expected uint8 ({n}, 32, 32, 3) as meta.json says"),
    ("other-image-size", lambda x, y: (x[:, :31, :31], y),
     lambda n: f"has images uint8 ({n}, 31, 31, 3), expected uint8 ({n}, 32, 32, 3) as meta.json says"),
    ("int16-images", lambda x, y: (x.astype(np.int16), y),
     lambda n: f"has images int16 ({n}, 32, 32, 3), expected uint8 ({n}, 32, 32, 3) as meta.json says"),
    ("labels-one-longer", lambda x, y: (x, np.append(y, 0)), lambda n: f"labels of shape ({n + 1},), expected ({n},)"),
    ("float-labels", lambda x, y: (x, y + 0.7), lambda n: "has labels of type float64, expected int64"),
    ("label-is-class-count", lambda x, y: (x, np.append(y[:-1], len(CLASSES))),
     lambda n: f"labels outside 0..{len(CLASSES) - 1} ({len(CLASSES)} classes in meta.json)"),
]


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("edit, fragment", [c[1:] for c in PREPARED_CASES], ids=[c[0] for c in PREPARED_CASES])
def test_prepared_split_that_disagrees_with_meta_json_is_refused(tmp_path, split, edit, fragment):
    """A <split>.npz whose images or labels disagree with meta.json (count, size, dtype, classes) or with each other."""
    save_data(tmp_path, synthetic_images(2, seed=1), synthetic_images(1, seed=2))
    x, y = prepared_split(tmp_path, split)
    edited_x, edited_y = edit(x, y)
    np.savez(tmp_path / f"{split}.npz", x=edited_x, y=edited_y)
    with pytest.raises(UserError) as raised:
        prepared_split(tmp_path, split)
    message = str(raised.value)
    assert f"{split}.npz" in message and fragment(len(y)) in message, message
    assert "\n" not in message and message.endswith("rerun: dvc repro -f data")


def test_unlabeled_images_that_disagree_with_meta_json_are_refused(tmp_path):
    """unlabeled.npz must hold as many images as meta.json's `unlabeled` says."""
    unlabeled, _ = synthetic_images(1, seed=3)  # 10 images
    save_data(tmp_path, synthetic_images(2, seed=1), synthetic_images(1, seed=2), unlabeled=unlabeled)
    assert len(prepared_split(tmp_path, "unlabeled")) == 10
    np.savez(tmp_path / "unlabeled.npz", x=unlabeled[:-1])
    with pytest.raises(UserError) as raised:
        prepared_split(tmp_path, "unlabeled")
    message = str(raised.value)
    assert "unlabeled.npz has images uint8 (9, 32, 32, 3), expected uint8 (10, 32, 32, 3) as meta.json says" in message
    assert "\n" not in message and message.endswith("rerun: dvc repro -f data")
