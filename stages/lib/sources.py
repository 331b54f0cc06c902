"""Where the images come from: a named data set (downloaded by torchvision) or a local copy.

data.source is one of DATASETS' names (cifar10, cifar100, stl10), or a path to a directory or a
.tar/.tar.gz/.tgz/.zip archive laid out as
  train/<class>/*  with optional  test/<class>/*   (the outermost such pair, below any folders), or
  <class>/*                                          (no train/ test/: a test set is held out).
A class is a folder name; labels follow the sorted names (as torchvision's ImageFolder), so a
copy of CIFAR-10 gives its official labels (its class order is alphabetical). Without a test
split, a stratified, seeded `test_fraction` of each class's images becomes the test set.

Every image becomes uint8 RGB of image_size x image_size:
- any Pillow-readable file, first frame only; the EXIF orientation is applied;
- any mode: 16-bit and 32-bit integer grayscale (I;16, I) is read as 0..65535, float (F) as
  0..1; images with transparency (RGBA, LA, P with a transparent colour, ...) are composited
  onto a white background; CMYK, palette, grayscale etc. are converted by Pillow;
- any size: resized (bicubic, antialiased) so the shorter side is image_size, then centre-
  cropped; an image already image_size x image_size keeps its exact pixels.
Named data sets' arrays of another size (STL-10 is 96x96) are resized the same way.

Adding a named data set is one function in DATASETS that returns a `Source`.
"""
import http.client
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from stages.lib.cli import UserError
from stages.lib.io import sha256
from stages.lib.local_copy import ARCHIVES, archive_files, folder_files
from stages.lib.prepared import SPLITS
from stages.lib.progress import Progress

WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class Source:
    """Images read from a source: x uint8 (N, S, S, 3) RGB, y int64 (N,) indices into classes."""

    train: tuple  # (x, y)
    test: tuple  # (x, y)
    classes: list  # class names; label i is classes[i]
    unlabeled: np.ndarray | None = None  # x uint8 (M, S, S, 3) without labels (SimCLR only), or None
    sha256: str | None = None  # of the archive file the images came from
    url: str | None = None  # where a named data set was downloaded from
    test_split: str = "official"  # how the test set was made


def read_source(source, image_size, test_fraction, seed, download_dir):
    """Read data.source (a name in DATASETS or a path) into a Source of image_size x image_size images."""
    if source in DATASETS:
        return DATASETS[source](image_size, Path(download_dir))
    path = Path(source)
    if not path.exists():
        raise UserError(f"data.source: {path} does not exist (give one of {', '.join(DATASETS)}, "
                        "or a path to a folder or archive of images)")
    if path.is_dir():
        return _read_local(folder_files(path), str(path), image_size, test_fraction, seed)
    if not path.name.lower().endswith(ARCHIVES):
        raise UserError(f"data.source: {path} is not a directory or a {'/'.join(ARCHIVES)} archive")
    found = _read_local(archive_files(path), str(path), image_size, test_fraction, seed)
    return replace(found, sha256=sha256(path))


# ---------------------------------------------------------------------------------------------
# Named data sets, downloaded (and checksummed) by torchvision


def _download(what, download_dir, dataset_class, **kwargs):
    try:
        return dataset_class(str(download_dir), download=True, **kwargs)
    except (OSError, RuntimeError, http.client.HTTPException) as error:
        raise UserError(
            f"could not download {what} into {download_dir} ({type(error).__name__}: {error}); "
            f"without internet, set data.source in params.yaml to a local copy (a folder or {'/'.join(ARCHIVES)} "
            "archive of train/<class>/* with optional test/<class>/*, or of <class>/*), "
            "e.g. dvc exp run -S data.source=path/to/copy.tar.gz"
        ) from None


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _cifar(name, label_order, image_size, download_dir):
    """`name` "CIFAR-10" or "CIFAR-100" (torchvision's CIFAR10, CIFAR100): 50,000 train and 10,000 test
    images, 32x32, 10 or 100 (fine) classes. Given a `label_order` (CIFAR-10's), torchvision's classes
    must be exactly those names in that order; without one, they are taken as torchvision gives them."""
    from torchvision import datasets  # imported here: only the named data sets need it

    dataset_class = getattr(datasets, name.replace("-", ""))
    arrays = {}
    for split in SPLITS:
        dataset = _download(name, download_dir, dataset_class, train=split == "train")
        classes = list(dataset.classes)
        if label_order is not None and classes != label_order:
            raise UserError(f"torchvision {name} classes {classes} are not in {name} label order "
                            f"({', '.join(label_order)}); check the torchvision version or set data.source")
        arrays[split] = (fit_arrays(np.asarray(dataset.data, dtype=np.uint8), image_size),
                         np.asarray(dataset.targets, dtype=np.int64))
    return Source(train=arrays["train"], test=arrays["test"], classes=classes, url=dataset_class.url)


def _stl10(image_size, download_dir):
    """STL-10: 5,000 train and 8,000 test labelled images and 100,000 unlabeled ones, 96x96, 10 classes."""
    from torchvision.datasets import STL10  # imported here: only this source needs it

    found = {}
    for split in ("train", "test", "unlabeled"):
        dataset = _download("STL-10", download_dir, STL10, split=split)
        x = np.asarray(dataset.data, dtype=np.uint8).transpose(0, 2, 3, 1)  # (N, 3, 96, 96) -> (N, 96, 96, 3)
        found[split] = (fit_arrays(x, image_size), np.asarray(dataset.labels, dtype=np.int64))
    return Source(train=found["train"], test=found["test"], classes=list(dataset.classes),  # one class_names.txt
                  unlabeled=found["unlabeled"][0], url=STL10.url)


DATASETS = {"cifar10": partial(_cifar, "CIFAR-10", CIFAR10_CLASSES), "cifar100": partial(_cifar, "CIFAR-100", None),
            "stl10": _stl10}


# ---------------------------------------------------------------------------------------------
# One image: any mode and size -> uint8 RGB (size, size, 3)


def to_rgb(image):
    """Any Pillow mode -> RGB; transparent pixels are composited onto white."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        scale = 255.0 if image.mode == "F" else 255.0 / 65535.0  # F: 0..1; I;16 and I: 0..65535
        levels = np.clip(np.rint(np.asarray(image, dtype=np.float64) * scale), 0, 255)
        return Image.fromarray(levels.astype(np.uint8)).convert("RGB")  # (H, W) -> (H, W, 3)
    if "A" in image.getbands() or "a" in image.getbands() or "transparency" in image.info:
        background = Image.new("RGBA", image.size, WHITE)
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def fit(image, size):
    """Resize so the shorter side is `size` (bicubic, antialiased), then centre-crop to size x size.
    An image of size x size is returned as it is."""
    width, height = image.size
    if (width, height) == (size, size):
        return image
    scale = size / min(width, height)
    resized = (round(width * scale), round(height * scale))  # the shorter side rounds to size exactly
    if resized != (width, height):
        image = image.resize(resized, Image.Resampling.BICUBIC, reducing_gap=None)
    left, top = (resized[0] - size) // 2, (resized[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def fit_arrays(x, size):
    """uint8 (N, H, W, 3) -> (N, size, size, 3) by `fit` per image: a C-contiguous array (x itself if it
    already is one and of that size)."""
    if x.shape[1:3] == (size, size):
        return np.ascontiguousarray(x)
    out = np.empty((len(x), size, size, 3), dtype=np.uint8)
    resize = lambda image: np.asarray(fit(Image.fromarray(np.ascontiguousarray(image)), size))  # noqa: E731
    _fill(out, resize, x, Progress("resize", len(x), unit="img"))
    return out


def _fill(out, make, items, progress, done=0):
    """out[i] = make(items[i]) on 4 threads, in order; progress counts on from `done`. Returns the new count."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        for i, image in enumerate(pool.map(make, items)):
            out[i] = image
            progress.update(done + i + 1)
    return done + len(out)


def _decode(item, size):
    """(name, read) -> uint8 (size, size, 3); an unreadable file is one line naming it."""
    name, read = item
    try:
        with Image.open(io.BytesIO(read())) as image:
            image.load()
            upright = ImageOps.exif_transpose(image) if image.getexif().get(0x0112, 1) != 1 else image
            return np.asarray(fit(to_rgb(upright), size), dtype=np.uint8)
    except UnidentifiedImageError:
        raise UserError(f"{name}: not a readable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise UserError(f"{name}: not a readable image ({error})") from None


# ---------------------------------------------------------------------------------------------
# Local copies: a directory or an archive


def _read_local(files, source, image_size, test_fraction, seed):
    """A Source from a local copy's (name, read) files: its test/ folder, or else a held-out test set."""
    bases, tree, empty = _collect(files, source)
    classes = _check_classes(source, bases, tree, empty)
    train_items, y = _labelled(tree["train"], classes)
    if "test" in tree:
        test_items, test_y = _labelled(tree["test"], classes)
        x, test_x = decode_all([train_items, test_items], image_size)
        return Source(train=(x, y), test=(test_x, test_y), classes=classes, test_split="test/ folder")
    keep, held = hold_out(y, test_fraction, seed, classes)  # before the slow decoding: each image decoded once
    x, test_x = decode_all([[train_items[i] for i in keep], [train_items[i] for i in held]], image_size)
    how = f"held out {test_fraction * 100:g}% of the labelled images (stratified, seed {seed})"
    return Source(train=(x, y[keep]), test=(test_x, y[held]), classes=classes, test_split=how)


def hold_out(y, test_fraction, seed, classes):
    """(train indices, test indices), each sorted: floor(test_fraction * n + 0.5) of each class's n images
    (rounded half up), drawn at random (seeded), for the test set; the rest for training."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label, name in enumerate(classes):
        members = np.flatnonzero(y == label)
        n_test = int(np.floor(len(members) * test_fraction + 0.5))
        if n_test in (0, len(members)):
            raise UserError(
                f"class {name} has {len(members)} image(s): holding out data.test_fraction = {test_fraction} of "
                f"them leaves no {'test' if n_test == 0 else 'training'} image; add images, change "
                "data.test_fraction or give a test/<class>/ folder")
        shuffled = rng.permutation(members)
        test.append(shuffled[:n_test])
        train.append(shuffled[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _ignored(rel):  # hidden, macOS metadata, or an archive's entry for its top itself (tar -C copy -czf c.tgz .)
    return not rel.parts or any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def _collect(files, source):
    """Find the class folders: ({split: base folder}, {split: {class: [(name, read)]}}, {split: empty class
    folders}); "test" only if the copy has a test/ folder. Loose files are ignored above or beside train/ and
    test/, right inside them, and at the top of a <class>/* copy, whose class folders lie in the deepest folder
    holding every other file (other/README.md beside wrap/{cat,dog}/ makes wrap/ and other/ classes). Files in
    other folders outside train/ and test/, or in a train/ or test/ inside a <class>/* class folder, are refused."""
    images, folders = [], set()
    for rel, read in files:
        if _ignored(rel):
            continue
        if read is None:
            folders.add(rel.parts)
        else:
            images.append((rel.parts, read))
    bases = _bases(images, folders, source)
    tree = {split: _class_files(images, base, source) for split, base in bases.items()}
    empty = {split: sorted({f[-1] for f in folders if f[:-1] == base} - set(tree[split]))
             for split, base in bases.items()}
    return bases, tree, empty


def _split_root(parts):
    """The parts above the first train/ or test/ in a file's path that has a class folder (not another
    train/ or test/) and the file below it (train/<class>/*, or deeper in the class folder), or None: neither
    a wrapping folder named train/ or test/ (train/{train,test}/<class>/*) nor one inside a class folder
    (train/<class>/test/x/*) is the split."""
    return next((parts[:i] for i in range(len(parts) - 2) if parts[i] in SPLITS and parts[i + 1] not in SPLITS),
                None)


def _bases(images, folders, source):
    """{split: the folder (a tuple of parts) that holds its class folders}."""
    roots = {_split_root(parts) for parts, _ in images} - {None}
    if len(roots) > 1:
        places = ", ".join(sorted("/".join(root) or "." for root in roots))
        raise UserError(f"{source}: several train/ and test/ folders found (in {places}); keep one tree")
    if not roots and not images:
        raise UserError(f"{source}: no images found (expected train/<class>/* with optional test/<class>/*, "
                        "or <class>/* folders)")
    if not roots:  # <class>/*, below the folder that holds every image in a folder (not files at the top)
        base = tuple(os.path.commonprefix([parts[:-1] for parts, _ in images if len(parts) > 1]))
        for parts, _ in images:  # e.g. cat/test/*.png (files right in it give no split root): cat's own test set
            split = next((name for name in parts[len(base) + 1:-1] if name in SPLITS), None)
            if split:
                raise UserError(f"{source}: {'/'.join(parts)} lies in a {split}/ folder inside class folder "
                                f"{_top(parts[:len(base) + 1])}; {_layout_advice(_top(base))}")
        return {"train": base}
    (root,) = roots  # train/<class>/* and maybe test/<class>/*, below root
    stray = next((parts for parts, _ in images if _outside(parts, root)), None)
    if stray:
        top = _top(root)
        raise UserError(f"{source}: {'/'.join(stray)} lies outside {top}train/ and {top}test/; {_layout_advice(top)}")
    present = {parts[len(root)] for parts, _ in images if len(parts) > len(root) + 1}  # all below root, as not stray
    bases = {split: root + (split,) for split in SPLITS if split in present or root + (split,) in folders}
    if "train" not in bases:
        raise UserError(f"{source}: no train/<class>/ images found beside {_top(root)}test/")
    return bases


def _top(folder):
    """A folder's parts as the prefix of a path: "" for the source itself, else "a/b/"."""
    return "".join(f"{part}/" for part in folder)


def _layout_advice(top):
    """How to mend a file outside the layout, for train/ and test/ in `top` (a `_top` prefix)."""
    return (f"keep every class folder in train/ and test/ ({top}train/<class>/*), or use <class>/* folders "
            "with no train/ or test/ folder inside a class; move or remove it")


def _outside(parts, root):
    """Whether a file lies in a folder outside root/train/ and root/test/ that is neither root nor above it
    (loose files there, like a README beside train/, are ignored)."""
    folder = parts[:-1]
    return root[:len(folder)] != folder and parts[:len(root) + 1] not in {root + (split,) for split in SPLITS}


def _class_files(images, base, source):
    """{class: [(name, read)]} of the images in base/<class>/ (or deeper in it)."""
    found = {}
    for parts, read in images:
        if len(parts) >= len(base) + 2 and parts[:len(base)] == base:
            found.setdefault(parts[len(base)], []).append((f"{'/'.join(parts)} in {source}", read))
    return found


def _check_classes(source, bases, tree, empty):
    """The sorted class names of the training images, which test/ (if any) must match."""
    train, where = tree["train"], _top(bases["train"]) or "the top folder"
    if empty["train"]:
        raise UserError(f"{source}: class folders without images in {where}: {', '.join(empty['train'])}")
    if len(train) < 2:
        found = f"only {len(train)} class ({', '.join(train)})" if train else "no class folders"
        raise UserError(f"{source}: {found} in {where}; a classification data set needs at least 2 "
                        "<class>/ folders of images")
    classes = sorted(train)
    if "test" in tree:
        absent, extra = sorted(set(classes) - set(tree["test"])), sorted(set(tree["test"]) - set(classes))
        blank = [name for name in absent if name in empty["test"]]
        missing = [name for name in absent if name not in empty["test"]]
        if absent or extra:
            raise UserError(
                f"{source}: test/ class folders differ from train/'s"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; empty: {', '.join(blank)}" if blank else "")
                + (f"; unexpected: {', '.join(extra)}" if extra else "")
            )
    return classes


def _labelled(per_class, classes):
    """[(name, read)] sorted by class then name, and their labels int64 (N,)."""
    items, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(per_class[name], key=lambda item: item[0])
        items.extend(files)
        labels.extend([label] * len(files))
    return items, np.asarray(labels, dtype=np.int64)


def decode_all(item_lists, size):
    """Decode lists of (name, read) on 4 threads (`_decode`: any image -> uint8 RGB size x size) -> one
    uint8 (N, size, size, 3) array per list, in order; one progress bar, "decode", counts them all."""
    total = sum(len(items) for items in item_lists)
    progress, done, arrays = Progress("decode", total, unit="img"), 0, []
    for items in item_lists:
        arrays.append(np.empty((len(items), size, size, 3), dtype=np.uint8))
        done = _fill(arrays[-1], partial(_decode, size=size), items, progress, done)
    return arrays
