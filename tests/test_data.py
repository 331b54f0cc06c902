"""The data stage: every source kind loads to the right arrays, labels and meta.json."""
import json
import time

import numpy as np
import pytest

from stages.lib import cifar
from stages.lib.cli import UserError
from tests.conftest import SHARED_ARCHIVE, make_archive, run_module, write_params, write_tree


@pytest.fixture
def tree(tmp_path):
    arrays = write_tree(tmp_path / "tree", n_train=4, n_test=2)
    return tmp_path / "tree", arrays


@pytest.mark.parametrize("kind", ["dir", ".tar", ".tar.gz", ".zip"])
def test_sources_load_exact_pixels_and_labels(tmp_path, tree, kind):
    root, expected = tree
    source = root / "cifar10" if kind == "dir" else make_archive(root, tmp_path / f"c{kind}")
    arrays, digest = cifar.read_source(str(source), tmp_path / "dl")
    for split in ("train", "test"):
        x, y = arrays[split]
        assert x.dtype == np.uint8 and x.shape[1:] == (32, 32, 3)
        assert y.dtype == np.int64
        # Files are sorted by class then name, which is the order write_tree used.
        np.testing.assert_array_equal(y, expected[split][1])
        np.testing.assert_array_equal(x, expected[split][0])  # PNG is lossless
    assert (digest is None) == (kind == "dir")
    if digest:
        assert digest == cifar.sha256(source)


def test_data_stage_writes_arrays_and_meta(tmp_path, synthetic_archive):
    params = write_params(tmp_path / "params.yaml", **{"data.source": str(synthetic_archive), "data.limit": 100})
    out = tmp_path / "prepared"
    result = run_module("stages.data", "--params", params, "--out", out, "--download-dir", tmp_path / "dl")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"] == str(synthetic_archive)
    assert meta["sha256"] == cifar.sha256(synthetic_archive)
    assert meta["classes"] == list(cifar.CLASSES)
    assert meta["counts"]["train"] == {name: 10 for name in cifar.CLASSES}  # limit 100, stratified
    assert meta["counts"]["test"] == {name: 10 for name in cifar.CLASSES}  # test always whole
    x, y = cifar.load_prepared(out, "train")
    assert x.shape == (100, 32, 32, 3) and np.bincount(y).tolist() == [10] * 10
    assert "decode" in result.stderr  # progress is shown


def test_stratified_subset_is_balanced_and_seeded():
    y = np.repeat(np.arange(10), 50)
    a, b = cifar.stratified_subset(y, 95, seed=1), cifar.stratified_subset(y, 95, seed=1)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 95 and np.bincount(y[a]).min() >= 9
    assert not np.array_equal(a, cifar.stratified_subset(y, 95, seed=2))


def test_missing_class_folder_is_named(tmp_path, tree):
    root, _ = tree
    for path in (root / "cifar10" / "test" / "frog").iterdir():
        path.unlink()
    (root / "cifar10" / "test" / "frog").rmdir()
    with pytest.raises(UserError, match="missing: frog"):
        cifar.read_source(str(root / "cifar10"), tmp_path)


def test_prepared_data_loads_fast(tmp_path):
    x = np.random.default_rng(0).integers(0, 255, size=(50000, 32, 32, 3), dtype=np.uint8)
    cifar.save_prepared(tmp_path, {"train": (x, np.zeros(50000, dtype=np.int64))}, {})
    start = time.perf_counter()
    loaded, _ = cifar.load_prepared(tmp_path, "train")
    assert time.perf_counter() - start < 2.0 and loaded.shape == x.shape


@pytest.mark.skipif(not SHARED_ARCHIVE.exists(), reason="needs ../shared/data/cifar10-jpeg.tar.gz")
def test_shared_archive_prepares_to_full_cifar10(tmp_path):
    params = write_params(tmp_path / "params.yaml", **{"data.source": str(SHARED_ARCHIVE)})
    out = tmp_path / "prepared"
    result = run_module("stages.data", "--params", params, "--out", out, "--download-dir", tmp_path / "dl")
    assert result.returncode == 0, result.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"]["train"] == {name: 5000 for name in cifar.CLASSES}
    assert meta["counts"]["test"] == {name: 1000 for name in cifar.CLASSES}
    assert meta["sha256"] == "efac85c8ed52f4ead1e1f1b670d8dcf435d551fccebdd8b6365e0a01a504f3a4"
    assert cifar.load_prepared(out, "train")[0].shape == (50000, 32, 32, 3)
    assert cifar.load_prepared(out, "test")[0].shape == (10000, 32, 32, 3)
