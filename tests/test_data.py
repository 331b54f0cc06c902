"""The data stage: every source kind loads to the right arrays, labels and meta.json (the data facts)."""
import argparse
import time

import numpy as np
import pytest

from stages import data
from stages.lib import io, params, prepared, sources
from stages.lib.cli import UserError
from tests.conftest import (CLASSES, SHARED_ARCHIVE, make_archive, prepared_split, run_module, save_data, write_params,
                            write_tree)


@pytest.fixture
def tree(tmp_path):
    arrays = write_tree(tmp_path / "tree", n_train=4, n_test=2)
    return tmp_path / "tree", arrays


@pytest.mark.parametrize("kind", ["dir", ".tar", ".tar.gz", ".zip"])
def test_sources_load_exact_pixels_and_labels(tmp_path, tree, kind):
    root, expected = tree
    source = root / "cifar10" if kind == "dir" else make_archive(root, tmp_path / f"c{kind}")
    found = sources.read_source(str(source), 32, 0.2, 0, tmp_path / "dl")
    assert found.classes == list(CLASSES) and found.test_split == "test/ folder" and found.unlabeled is None
    for split, (x, y) in (("train", found.train), ("test", found.test)):
        assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)
        assert y.dtype == np.int64
        # Files are sorted by class then name, which is the order write_tree used.
        np.testing.assert_array_equal(y, expected[split][1])
        np.testing.assert_array_equal(x, expected[split][0])  # PNG is lossless, and 32x32 is not resized
    assert (found.sha256 is None) == (kind == "dir")
    if found.sha256:
        assert found.sha256 == io.sha256(source)


def test_data_stage_writes_arrays_and_facts(tmp_path, synthetic_archive):
    params_path = write_params(tmp_path / "params.yaml", **{"data.source": str(synthetic_archive), "data.limit": 100})
    out = tmp_path / "prepared"
    result = run_module("stages.data", "--params", params_path, "--out", out, "--download-dir", tmp_path / "dl")
    assert result.returncode == 0, result.stderr
    facts = prepared.read_facts(out)
    assert facts.source == str(synthetic_archive) and facts.url is None
    assert facts.sha256 == io.sha256(synthetic_archive)
    assert facts.classes == list(CLASSES) and facts.image_size == 32 and facts.unlabeled == 0
    assert facts.test_split == "test/ folder" and facts.limit == 100
    assert facts.counts["train"] == {name: 10 for name in CLASSES}  # limit 100, stratified
    assert facts.counts["test"] == {name: 10 for name in CLASSES}  # test always whole
    x, y = prepared_split(out, "train")
    assert x.shape == (100, 32, 32, 3) and np.bincount(y).tolist() == [10] * 10
    mean, std = prepared.channel_statistics([x])  # of the kept training images only
    assert facts.mean == tuple(round(v, 4) for v in mean) and facts.std == tuple(round(v, 4) for v in std)
    arrays = {"train": (x, y), "test": prepared_split(out, "test")}
    assert facts.content_sha256 == prepared.content_digest(arrays)
    assert "decode" in result.stderr  # progress is shown


def test_data_stage_resizes_and_holds_out_a_test_set(tmp_path):
    write_tree(tmp_path / "tree", n_train=5, n_test=1, top="flat")
    root = tmp_path / "tree" / "flat" / "train"  # <class>/* only: no test/ folder
    params_path = write_params(tmp_path / "params.yaml", **{"data.source": str(root), "data.image_size": 40,
                                                              "data.test_fraction": 0.4, "seed": 3})
    out = tmp_path / "prepared"
    result = run_module("stages.data", "--params", params_path, "--out", out, "--download-dir", tmp_path / "dl")
    assert result.returncode == 0, result.stderr
    facts = prepared.read_facts(out)
    assert facts.image_size == 40 and facts.test_split == "held out 40% of the labelled images (stratified, seed 3)"
    assert facts.counts == {"train": {name: 3 for name in CLASSES}, "test": {name: 2 for name in CLASSES}}
    assert prepared_split(out, "train")[0].shape == (30, 40, 40, 3)
    assert prepared_split(out, "test")[0].shape == (20, 40, 40, 3)


class FakeSTL10:
    """Labelled train/test of two classes and 50 unlabeled images of level 200, 96x96 (channels first)."""
    url = "https://example.org/stl10_binary.tar.gz"

    def __init__(self, root, split, download):
        n = {"train": 20, "test": 4, "unlabeled": 50}[split]
        self.data = np.full((n, 3, 96, 96), 200 if split == "unlabeled" else 0, np.uint8)
        self.data[: n // 2, 0] = 100
        self.labels = np.full(n, -1) if split == "unlabeled" else np.arange(n) % 2
        self.classes = ["airplane", "bird"]


def test_data_limit_caps_unlabeled_images_which_join_the_statistics(tmp_path, fake_torchvision):
    fake_torchvision.STL10 = FakeSTL10
    params_path = write_params(tmp_path / "params.yaml", **{"data.source": "stl10", "data.limit": 10})
    p = params.load(params_path, "seed", "data")
    args = argparse.Namespace(out=tmp_path / "prepared", download_dir=tmp_path / "dl")
    facts = data.prepare(p, args)
    assert facts == prepared.read_facts(args.out) and facts.url == FakeSTL10.url and facts.unlabeled == 10
    assert facts.counts["train"] == {"airplane": 5, "bird": 5} and facts.image_size == 32
    x, _ = prepared_split(args.out, "train")
    unlabeled = prepared_split(args.out, "unlabeled")
    assert unlabeled.shape == (10, 32, 32, 3)
    mean, _ = prepared.channel_statistics([x, unlabeled])
    assert facts.mean == tuple(round(v, 4) for v in mean) and facts.mean[1] > 0.3  # the level-200 images count


def test_stratified_subset_is_balanced_and_seeded():
    y = np.repeat(np.arange(10), 50)
    a, b = prepared.stratified_subset(y, 95, seed=1), prepared.stratified_subset(y, 95, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 95 and np.bincount(y[a]).min() >= 9
    assert not np.array_equal(a, prepared.stratified_subset(y, 95, seed=2))


def test_random_subset_is_seeded_and_capped():
    a = prepared.random_subset(100, 30, seed=1)
    assert len(a) == 30 and len(set(a)) == 30 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, prepared.random_subset(100, 30, seed=1))
    assert not np.array_equal(a, prepared.random_subset(100, 30, seed=2))
    np.testing.assert_array_equal(prepared.random_subset(20, None, seed=1), np.arange(20))


def test_subset_copies_only_what_a_limit_drops():
    x = np.arange(40).reshape(20, 2)
    assert prepared.subset(x, prepared.random_subset(20, None, seed=1)) is x  # no limit: no copy
    part = prepared.subset(x, prepared.random_subset(20, 5, seed=1))
    assert part.shape == (5, 2) and not np.shares_memory(part, x)


def test_missing_class_folder_is_named(tmp_path, tree):
    root, _ = tree
    for path in (root / "cifar10" / "test" / "frog").iterdir():
        path.unlink()
    (root / "cifar10" / "test" / "frog").rmdir()
    with pytest.raises(UserError, match="missing: frog"):
        sources.read_source(str(root / "cifar10"), 32, 0.2, 0, tmp_path)


def test_prepared_data_loads_fast(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(50000, 32, 32, 3), dtype=np.uint8)
    save_data(tmp_path, (x, np.arange(50000) % 10), (x[:10], np.arange(10)), source="random")
    start = time.perf_counter()
    loaded, _ = prepared_split(tmp_path, "train")
    assert time.perf_counter() - start < 2.0 and loaded.shape == x.shape


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_shared_archive_prepares_to_full_cifar10(tmp_path):
    params_path = write_params(tmp_path / "params.yaml", **{"data.source": str(SHARED_ARCHIVE)})
    out = tmp_path / "prepared"
    result = run_module("stages.data", "--params", params_path, "--out", out, "--download-dir", tmp_path / "dl")
    assert result.returncode == 0, result.stderr
    facts = prepared.read_facts(out)
    assert facts.classes == list(CLASSES)  # sorted folder names = CIFAR-10's label order
    assert facts.counts["train"] == {name: 5000 for name in CLASSES}
    assert facts.counts["test"] == {name: 1000 for name in CLASSES}
    assert facts.sha256 == "efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4"
    # CIFAR-10's published training-set statistics; the JPEG copy's are within 0.01.
    np.testing.assert_allclose(facts.mean, (0.4914, 0.4822, 0.4465), atol=0.01)
    np.testing.assert_allclose(facts.std, (0.2470, 0.2435, 0.2616), atol=0.01)
    assert prepared_split(out, "train")[0].shape == (50000, 32, 32, 3)
    assert prepared_split(out, "test")[0].shape == (10000, 32, 32, 3)
