"""CIFAR-10 sources (torchvision download, ImageFolder directory, .tar/.tar.gz/.zip archive),
their verification, and the prepared arrays that later stages load.

Prepared layout: <dir>/train.npz and <dir>/test.npz (x: uint8 (N, 32, 32, 3), y: int64 (N,)),
<dir>/meta.json (source, sha256, classes, counts).
"""
import hashlib
import http.client
import io
import json
import tarfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError

from stages.lib.cli import UserError
from stages.lib.io import load_npz
from stages.lib.progress import Progress

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
SPLITS = ("train", "test")
ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_source(source, download_dir):
    """Return ({split: (x, y)}, sha256 or None) for the configured source."""
    if source == "torchvision":
        return _read_torchvision(download_dir), None
    path = Path(source)
    if not path.exists():
        raise UserError(f"data.source: {path} does not exist (give 'torchvision' or a path to a CIFAR-10 copy)")
    if path.is_dir():
        return _decode_all(_directory_files(path), str(path)), None
    if not path.name.lower().endswith(ARCHIVES):
        raise UserError(f"data.source: {path} is not a directory or a {'/'.join(ARCHIVES)} archive")
    return _decode_all(_archive_files(path), str(path)), sha256(path)


def _read_torchvision(download_dir):
    from torchvision.datasets import CIFAR10  # imported here: only this source needs it

    arrays = {}
    for split in SPLITS:
        try:
            dataset = CIFAR10(str(download_dir), train=split == "train", download=True)
        except (OSError, RuntimeError, http.client.HTTPException) as error:
            raise UserError(
                f"could not download CIFAR-10 into {download_dir} ({type(error).__name__}: {error}); "
                "without internet, set data.source in params.yaml to a local copy (ImageFolder directory "
                "or .tar/.tar.gz/.zip archive), e.g. dvc exp run -S data.source=path/to/cifar10.tar.gz"
            ) from None
        if tuple(dataset.classes) != CLASSES:
            raise UserError(f"torchvision CIFAR-10 classes {dataset.classes} are not in CIFAR-10 label order "
                            f"({', '.join(CLASSES)}); check the torchvision version or set data.source")
        arrays[split] = (np.asarray(dataset.data, dtype=np.uint8), np.asarray(dataset.targets, dtype=np.int64))
    return arrays


def _directory_files(root):
    """Yield (relative posix path, reader) for every file under root, sorted; reader None for a folder."""
    for path in sorted(root.rglob("*")):
        yield PurePosixPath(path.relative_to(root).as_posix()), (None if path.is_dir() else path.read_bytes)


def _archive_files(path):
    try:
        if path.name.lower().endswith(".zip"):
            yield from _zip_files(path)
        else:
            yield from _tar_files(path)
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        detail = str(error).splitlines()[0].rstrip(":") if str(error) else type(error).__name__
        raise UserError(f"data.source: {path} is truncated or not a valid archive ({detail})") from None


def _tar_files(path):
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if member.isdir():
                yield PurePosixPath(member.name), None
            elif member.isfile():
                data = archive.extractfile(member).read()
                yield PurePosixPath(member.name), (lambda data=data: data)
        # tarfile takes a cut-off header for the end; a whole archive ends with zero blocks.
        archive.fileobj.seek(archive.offset)
        if archive.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError("it ends before its end-of-archive marker")


def _zip_files(path):
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                yield PurePosixPath(info.filename), None
            else:
                data = archive.read(info)
                yield PurePosixPath(info.filename), (lambda data=data: data)


def _ignored(rel):
    return any(part.startswith(".") or part == "__MACOSX" for part in rel.parts)


def _collect(files, source):
    """Group image files as {split: {class: [(name, read)]}} and check the tree's shape."""
    tree, roots, folders = {split: {} for split in SPLITS}, set(), set()
    for rel, read in files:
        if _ignored(rel):
            continue
        if read is None:  # a folder: remembered to tell an empty class folder from a missing one
            folders.add("/".join(rel.parts[-2:]))
        elif len(rel.parts) >= 3 and rel.parts[-3] in SPLITS:
            roots.add(rel.parts[:-3])
            split, label = rel.parts[-3], rel.parts[-2]
            tree[split].setdefault(label, []).append((f"{rel} in {source}", read))
    if len(roots) > 1:
        places = ", ".join(sorted("/".join(root) or "." for root in roots))
        raise UserError(f"{source}: several train/ and test/ folders found (in {places}); keep one CIFAR-10 tree")
    for split in SPLITS:
        _check_classes(source, split, tree[split], folders)
    return tree


def _check_classes(source, split, found, folders):
    """Refuse a split whose class folders are not exactly CIFAR-10's ten, each with images."""
    if not found:
        raise UserError(f"{source}: no {split}/<class>/ images found (expected {split}/airplane/..., ...)")
    absent, extra = sorted(set(CLASSES) - set(found)), sorted(set(found) - set(CLASSES))
    empty = [name for name in absent if f"{split}/{name}" in folders]
    missing = [name for name in absent if f"{split}/{name}" not in folders]
    if absent or extra:
        raise UserError(
            f"{source}: {split}/ class folders differ from CIFAR-10's"
            + (f"; missing: {', '.join(missing)}" if missing else "")
            + (f"; empty: {', '.join(empty)}" if empty else "")
            + (f"; unexpected: {', '.join(extra)}" if extra else "")
        )


def _decode(item):
    name, read = item
    try:
        with Image.open(io.BytesIO(read())) as image:
            image.load()
            if image.size != (32, 32):
                raise UserError(f"{name}: image is {image.size[0]}x{image.size[1]}, CIFAR-10 images are 32x32")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise UserError(f"{name}: not a readable image (no image format recognised)") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise UserError(f"{name}: not a readable image ({error})") from None


def _decode_all(files, source):
    tree = _collect(files, source)
    total = sum(len(items) for split in tree.values() for items in split.values())
    progress, done, arrays = Progress("decode", total, unit="img"), 0, {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for split in SPLITS:
            xs, ys = [], []
            for label, name in enumerate(CLASSES):
                items = sorted(tree[split][name])
                for image in pool.map(_decode, items, chunksize=256):
                    xs.append(image)
                    done += 1
                    progress.update(done)
                ys.extend([label] * len(items))
            arrays[split] = (np.stack(xs), np.asarray(ys, dtype=np.int64))
    return arrays


def stratified_subset(y, limit, seed):
    """Indices of at most `limit` samples, spread over classes as evenly as their sizes allow."""
    if limit is None or limit >= len(y):
        return np.arange(len(y))
    rng = np.random.default_rng(seed)
    labels, counts = np.unique(y, return_counts=True)
    take = allocate(counts, limit)
    chosen = [rng.permutation(np.flatnonzero(y == label))[:n] for label, n in zip(labels, take)]
    return np.sort(np.concatenate(chosen))


def allocate(counts, total):
    """Split `total` over groups in proportion to `counts` (largest remainder), never above a count."""
    counts = np.asarray(counts, dtype=np.int64)
    exact = counts * total / counts.sum()
    take = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - take), kind="stable")
    take[order[: total - take.sum()]] += 1
    return np.minimum(take, counts)


def save_prepared(out_dir, arrays, meta):
    """Write train.npz, test.npz and meta.json into out_dir (a fresh directory)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split, (x, y) in arrays.items():
        np.savez(out_dir / f"{split}.npz", x=x, y=y)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_prepared(data_dir, split):
    """Return (x uint8 (N, 32, 32, 3), y int64 (N,)) of a prepared split."""
    path = Path(data_dir) / f"{split}.npz"
    x, y = load_npz(path, ("x", "y"), "prepared data", "rerun: dvc repro -f data")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
        raise UserError(f"{path} has unexpected arrays x {x.shape} {x.dtype}, y {y.shape}; rerun: dvc repro -f data")
    return x, y.astype(np.int64)


def class_counts(y):
    return {name: int((y == label).sum()) for label, name in enumerate(CLASSES)}
