"""The prepared data on disk, which every stage after `data` reads, and its facts (meta.json).

Layout of <dir>:
  train.npz, test.npz   x: uint8 (N, S, S, 3) RGB, y: int64 (N,) class index into `classes`
  unlabeled.npz         x: uint8 (M, S, S, 3), only when meta.json's `unlabeled` > 0 (e.g. STL-10)
  meta.json             the data facts (`DataFacts`): classes, image size S, channel mean and std, ...

Later stages take the class names, the image size and the channel statistics only from
`read_facts`, never from constants, so a new data set needs no change outside the data stage.
"""
import hashlib
from pathlib import Path, PurePath

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from stages.lib.cli import UserError
from stages.lib.io import load_npz

SPLITS = ("train", "test")
HINT = "rerun: dvc repro -f data"


class DataFacts(BaseModel):
    """What the data stage found out about the data (meta.json); read with `read_facts`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str  # data.source as given in params: a data set name (cifar10, ...) or a path
    url: str | None  # where a named data set was downloaded from; None for a local copy
    sha256: str | None  # SHA-256 of the source archive file; None for downloads and folders
    content_sha256: str  # SHA-256 of the prepared arrays (`content_digest`)
    test_split: str  # how the test set was made: "official", "test/ folder", "held out 20% of ..."
    classes: list[str] = Field(min_length=2)  # label i is classes[i]
    image_size: int = Field(ge=1)  # images are image_size x image_size RGB
    mean: tuple[float, float, float]  # per-channel mean of the pretraining images, in [0, 1] pixel units
    std: tuple[float, float, float]  # per-channel standard deviation of the same images
    unlabeled: int = Field(ge=0)  # images without labels (in unlabeled.npz), for SimCLR only
    limit: int | None  # data.limit: cap on the training and on the unlabeled images
    counts: dict[str, dict[str, int]]  # {split: {class: images}} for train and test

    @model_validator(mode="after")
    def _consistent(self):
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes are not distinct: {self.classes}")
        if sorted(self.counts) != sorted(SPLITS):
            raise ValueError(f"counts must have the splits {', '.join(SPLITS)}, not {', '.join(self.counts)}")
        for split, per_class in self.counts.items():
            if list(per_class) != self.classes:
                raise ValueError(f"counts.{split} must name the classes in order")
        if min(self.std) <= 0:
            raise ValueError(f"std must be > 0 in every channel, not {self.std}")
        return self

    @property
    def images(self):
        """{split: number of images} for train and test: the sums of `counts`."""
        return {split: sum(per_class.values()) for split, per_class in self.counts.items()}

    @property
    def name(self):
        """The data set's short name: the named source (cifar10, ...), else the local file's or folder's
        name without its suffixes (cifar10-jpeg for cifar10-jpeg.tar.gz)."""
        return self.source if self.url else PurePath(self.source.rstrip("/\\")).name.split(".")[0]


def read_facts(data_dir):
    """The DataFacts of the prepared data in data_dir; a missing or invalid meta.json is one line."""
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"data facts not found: {path}; {HINT}")
    try:
        return DataFacts.model_validate_json(path.read_bytes())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        detail = f"{where}: {first['msg']}" if where else first["msg"]
        raise UserError(f"{path} is not valid data facts ({detail}); {HINT}") from None


def data_facts(arrays, classes, *, source, url, sha256, test_split, limit):
    """The facts of the prepared `arrays` ({"train": (x, y), "test": (x, y)}, optional "unlabeled": x);
    mean and std over the images SimCLR sees (train and unlabeled), rounded to 4 decimals."""
    pretraining = [arrays["train"][0]] + ([arrays["unlabeled"]] if "unlabeled" in arrays else [])
    mean, std = channel_statistics(pretraining)
    mean, std = tuple(round(v, 4) for v in mean), tuple(round(v, 4) for v in std)
    if min(std) == 0:
        raise UserError(f"the training images have no variation in some colour channel (std {std}); "
                        "check data.source")
    return DataFacts(
        source=source, url=url, sha256=sha256, content_sha256=content_digest(arrays), test_split=test_split,
        classes=list(classes), image_size=int(arrays["train"][0].shape[1]), mean=mean, std=std,
        unlabeled=len(arrays.get("unlabeled", ())), limit=limit,
        counts={split: class_counts(arrays[split][1], classes) for split in SPLITS},
    )


def save_prepared(out_dir, arrays, meta):
    """Write <split>.npz for each of `arrays` ({"train": (x, y), "test": (x, y)}, optional
    "unlabeled": x) and meta.json (`meta`, a DataFacts) into out_dir (a fresh directory)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, content in arrays.items():
        if split == "unlabeled":
            np.savez(out_dir / "unlabeled.npz", x=content)
        else:
            x, y = content
            np.savez(out_dir / f"{split}.npz", x=x, y=y)
    (out_dir / "meta.json").write_text(meta.model_dump_json(indent=2) + "\n")


def load_prepared(data_dir, split, facts):
    """train/test: (x uint8 (N, S, S, 3), y int64 (N,)); unlabeled: x uint8 (M, S, S, 3), empty
    (0, S, S, 3) when the data has no unlabeled images. S and the classes come from `facts`, the
    data's DataFacts (`read_facts`), which the caller reads once. The arrays must have these dtypes and the
    shapes the facts give (image size, and the number of images: `images[split]` or `unlabeled`)."""
    size, path = facts.image_size, Path(data_dir) / f"{split}.npz"
    if split == "unlabeled":
        if facts.unlabeled == 0:
            return np.zeros((0, size, size, 3), dtype=np.uint8)
        (x,) = load_npz(path, ("x",), "prepared data", HINT)
        _check_images(path, x, size, facts.unlabeled)
        return x
    x, y = load_npz(path, ("x", "y"), "prepared data", HINT)
    _check_images(path, x, size, facts.images[split])
    if y.shape != (len(x),):
        raise UserError(f"{path} has labels of shape {y.shape}, expected ({len(x)},) as meta.json says; {HINT}")
    if y.dtype != np.int64:
        raise UserError(f"{path} has labels of type {y.dtype}, expected int64; {HINT}")
    if len(y) and (y.min() < 0 or y.max() >= len(facts.classes)):
        raise UserError(f"{path} has labels outside 0..{len(facts.classes) - 1} ({len(facts.classes)} classes "
                        f"in meta.json); {HINT}")
    return x, y


def _check_images(path, x, size, count):
    if x.dtype != np.uint8 or x.shape != (count, size, size, 3):
        raise UserError(f"{path} has images {x.dtype} {x.shape}, expected uint8 ({count}, {size}, {size}, 3) "
                        f"as meta.json says; {HINT}")


def stratified_subset(y, limit, seed):
    """Sorted indices of at most `limit` samples: each class's share in proportion to its size (`allocate`),
    drawn at random (seeded)."""
    if limit is None or limit >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    labels, counts = np.unique(y, return_counts=True)
    take = allocate(counts, limit)
    chosen = [rng.permutation(np.flatnonzero(y == label))[:n] for label, n in zip(labels, take)]
    return np.sort(np.concatenate(chosen))


def random_subset(n, limit, seed):
    """Sorted indices of at most `limit` of n samples, drawn at random (seeded)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def subset(x, indices):
    """x[indices] for sorted, distinct `indices` (from `stratified_subset` or `random_subset`); x itself,
    not a copy, when they select all of it (no data.limit: STL-10's unlabeled images are 2.8 GB)."""
    return x if len(indices) == len(x) else x[indices]


def allocate(counts, total):
    """Split `total` over groups in proportion to `counts` (largest remainder), never above a count."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = counts * total / counts.sum()
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: total - take.sum()]] += 1
    return np.minimum(take, counts)


def class_counts(y, classes):
    """{class name: number of labels y == its index}, in class order."""
    return {name: int((y == label).sum()) for label, name in enumerate(classes)}


def content_digest(arrays):
    """SHA-256 of the prepared arrays (train then test, images then labels, then the unlabeled
    images if any): what MLflow shows as the data set's digest, the same for every source that
    yields the same pixels and labels."""
    digest = hashlib.sha256()
    for split in SPLITS:
        for array in arrays[split]:
            digest.update(np.ascontiguousarray(array))  # no copy if already C-contiguous
    if "unlabeled" in arrays:
        digest.update(np.ascontiguousarray(arrays["unlabeled"]))
    return digest.hexdigest()


def channel_statistics(x_list, chunk=1024):
    """Per-channel (mean, std) of uint8 images (a list of (N, S, S, 3) arrays), in [0, 1] pixel units.

    Counts each channel's 256 levels exactly, `chunk` images at a time (small temporaries, also for
    STL-10's 105,000 96x96 train and unlabeled images); mean and std (population, ddof 0) follow from
    the counts in float64."""
    counts = np.zeros((3, 256), dtype=np.int64)  # (channel, level)
    for x in x_list:
        for start in range(0, len(x), chunk):
            block = x[start:start + chunk].reshape(-1, 3)  # (chunk * S * S, 3) uint8
            for channel in range(3):
                counts[channel] += np.bincount(block[:, channel], minlength=256)
    pixels = counts[0].sum()  # > 0: the data stage always has training images
    levels = np.arange(256, dtype=np.float64) / 255.0  # (256,) in [0, 1]
    mean = counts @ levels / pixels  # (3,)
    variance = counts @ levels**2 / pixels - mean**2  # (3,)
    return tuple(float(v) for v in mean), tuple(float(v) for v in np.sqrt(np.maximum(variance, 0.0)))
