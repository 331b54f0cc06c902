"""Validation split and nested labeled subsets, stratified by class and seeded.

Each class's images are shuffled once; validation takes its share from the front, and the
labeled subset for fraction f takes the first round(f * n) of what remains, so a smaller
fraction's subset always lies inside a larger one's (nested), and never meets validation.
"""
from pathlib import Path

import numpy as np

from stages.lib.prepared import allocate
from stages.lib.cli import UserError
from stages.lib.io import NUMPY_FILE_ERRORS


def fraction_key(fraction):
    """Name of a fraction in files and metrics: 1.0 -> 'n100', 0.1 -> 'n10', 0.025 -> 'n2p5'."""
    return "n" + format(round(fraction * 100, 6), "g").replace(".", "p")


def make_splits(y, val_size, fractions, seed):
    """Return (val indices, {fraction: labeled indices}) as sorted int64 arrays."""
    y = np.asarray(y)
    labels, counts = np.unique(y, return_counts=True)
    if val_size >= len(y):
        raise UserError(f"data.val_size = {val_size} leaves no training images (only {len(y)} prepared)")
    val_take = allocate(counts, val_size)
    rng = np.random.default_rng(seed)
    val, pools = [], []
    for label, n_val in zip(labels, val_take):
        order = rng.permutation(np.flatnonzero(y == label))
        val.append(order[:n_val])
        pools.append(order[n_val:])
    labeled = {}
    for fraction in fractions:
        # Per class, round half up: monotone in the fraction, so subsets stay nested.
        take = [pool[: max(1, int(fraction * len(pool) + 0.5))] for pool in pools]
        labeled[fraction] = np.sort(np.concatenate(take)).astype(np.int64)
    return np.sort(np.concatenate(val)).astype(np.int64), labeled


def save_splits(out_dir, val, labeled):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "val.npy", val)
    for fraction, indices in labeled.items():
        np.save(out_dir / f"train_{fraction_key(fraction)}.npy", indices)


def load_split(split_dir, name):
    """Load 'val' or a fraction's labeled indices ('train_n10', ...)."""
    path = Path(split_dir) / f"{name}.npy"
    if not path.is_file():
        raise UserError(f"split not found: {path} (is the fraction in params.yaml? rerun: dvc repro split)")
    try:
        return np.load(path)
    except NUMPY_FILE_ERRORS as error:
        raise UserError(f"{path} is not a split index file ({error}); rerun: dvc repro -f split") from None
