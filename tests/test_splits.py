"""Splits: stratified, nested, disjoint from validation, seeded."""
import numpy as np
import pytest

from stages.lib.splits import fraction_key, make_splits, load_split
from tests.conftest import run_module, write_params

FRACTIONS = [1.0, 0.5, 0.1]


@pytest.fixture
def labels():
    return np.repeat(np.arange(10), 100)  # 1,000 images, 100 per class


def test_validation_is_stratified_and_disjoint(labels):
    val, labeled = make_splits(labels, 200, FRACTIONS, seed=0)
    assert len(val) == 200 and np.bincount(labels[val]).tolist() == [20] * 10
    for indices in labeled.values():
        assert not set(indices) & set(val)
    assert len(labeled[1.0]) == 800 and set(labeled[1.0]) | set(val) == set(range(1000))


def test_fractions_are_stratified_and_nested(labels):
    _, labeled = make_splits(labels, 200, FRACTIONS, seed=0)
    assert np.bincount(labels[labeled[0.5]]).tolist() == [40] * 10
    assert np.bincount(labels[labeled[0.1]]).tolist() == [8] * 10
    assert set(labeled[0.1]) <= set(labeled[0.5]) <= set(labeled[1.0])


def test_same_seed_same_splits_other_seed_differs(labels):
    a_val, a = make_splits(labels, 200, FRACTIONS, seed=3)
    b_val, b = make_splits(labels, 200, FRACTIONS, seed=3)
    c_val, c = make_splits(labels, 200, FRACTIONS, seed=4)
    np.testing.assert_array_equal(a_val, b_val)
    np.testing.assert_array_equal(a[0.1], b[0.1])
    assert not np.array_equal(a_val, c_val) and not np.array_equal(a[0.1], c[0.1])


def test_nested_whatever_the_order_of_fractions(labels):
    _, forward = make_splits(labels, 100, [0.1, 0.3, 1.0], seed=0)
    _, backward = make_splits(labels, 100, [1.0, 0.3, 0.1], seed=0)
    np.testing.assert_array_equal(forward[0.3], backward[0.3])


def test_fraction_keys_have_no_dots():
    assert [fraction_key(f) for f in (1.0, 0.5, 0.1, 0.025, 1)] == ["n100", "n50", "n10", "n2p5", "n100"]


def test_split_stage_writes_index_files(tmp_path, synthetic_archive):
    params = write_params(tmp_path / "params.yaml", **{"data.source": str(synthetic_archive), "data.val_size": 50})
    prepared, out = tmp_path / "prepared", tmp_path / "splits"
    assert run_module("stages.data", "--params", params, "--out", prepared, "--download-dir", tmp_path).returncode == 0
    result = run_module("stages.split", "--params", params, "--data", prepared, "--out", out)
    assert result.returncode == 0, result.stderr
    val = load_split(out, "val")
    assert len(val) == 50
    assert len(load_split(out, "train_n100")) == 250 and len(load_split(out, "train_n10")) == 30
