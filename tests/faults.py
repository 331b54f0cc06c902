"""Helpers shared by the tests of bad input, faults and interruptions (tests/test_errors_*.py)."""
import io
import lzma
import shutil
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from stages.lib import params, splits
from stages.lib.models import ResNet, save_backbone
from tests.conftest import png_bytes, save_data, synthetic_images, write_params, write_tree

# A study small enough for seconds on a CPU (see tests/test_pipeline.py).
TINY = {
    "data.val_size": 40, "fraction": [1.0], "model.width": 4,
    "pretrain.epochs": 3, "pretrain.batch_size": 32, "pretrain.compile": False, "pretrain.warmup_epochs": 1,
    "pretrain.proj_hidden": 32, "pretrain.proj_dim": 16, "pretrain.knn_every": 1, "pretrain.checkpoint_seconds": 0,
    "finetune.max_epochs": 2, "finetune.batch_size": 32, "finetune.compile": False, "finetune.checkpoint_seconds": 0,
    "evaluate.bootstrap_samples": 100,
}


# ---------------------------------------------------------------------------------------------
# Helpers


def last_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def leftovers(root):
    """Temporaries of atomic writes (.<name>.tmp-<pid>) anywhere under root."""
    return sorted(str(p) for p in Path(root).rglob(".*.tmp-*"))


def assert_failed(result, code, culprits, outputs=(), root=None):
    """The CLI contract: exit code, culprit named on the last stderr line, no traceback, nothing left."""
    line = last_line(result.stderr)
    assert result.returncode == code, result.stderr
    assert line.startswith("error: "), result.stderr
    for culprit in culprits:
        assert str(culprit) in line, f"{culprit!r} not in last line: {line}"
    assert "Traceback" not in result.stderr, result.stderr
    for path in outputs:
        assert not Path(path).exists(), f"{path} left behind"
    if root is not None:
        assert leftovers(root) == []



def prepare_project(root):
    """params.yaml (TINY), prepared data, splits and init weights (baseline, ssl, and ssl of width 8)."""
    root.mkdir(parents=True, exist_ok=True)
    params_path = write_params(root / "params.yaml", **TINY)
    train, test = synthetic_images(16, seed=1), synthetic_images(4, seed=2)
    save_data(root / "data", train, test)
    val, labeled = splits.make_splits(train[1], TINY["data.val_size"], TINY["fraction"], 0)
    splits.save_splits(root / "splits", val, labeled)
    p = params.load(params_path, "seed", "model")
    for name, origin, width in (("baseline", "random", 4), ("ssl", "simclr", 4), ("wide", "simclr", 8)):
        torch.manual_seed(0)
        save_backbone(root / "init" / f"{name}.pt", ResNet("resnet18", width, "cifar"), origin=origin,
                      params=p.as_dict())
    return root



def edited_params(path, edit, **overrides):
    """Write the repository's params.yaml, TINY-sized and changed by edit(dict), to path."""
    write_params(path, **{**TINY, **overrides})
    raw = yaml.safe_load(path.read_text())
    edit(raw)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _parent(raw, dotted):
    """(the mapping that holds a dotted key, the key's last part)."""
    *parents, key = dotted.split(".")
    for name in parents:
        raw = raw[name]
    return raw, key


def setter(dotted, value):
    def edit(raw):
        node, key = _parent(raw, dotted)
        node[key] = value

    return edit


def deleter(dotted):
    def edit(raw):
        node, key = _parent(raw, dotted)
        del node[key]

    return edit


def renamer(old, new):
    def edit(raw):
        raw[new] = raw.pop(old)

    return edit



def tree(tmp_path, top="cifar10"):
    write_tree(tmp_path / "tree", n_train=2, n_test=1, top=top)
    return tmp_path / "tree"


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def zip_headers(path, field, value, name=None):
    """Set a zip's 2-byte field (flags, method or version needed) to value in the local and central directory headers
    of every entry, or of the entry stored as name."""
    data = bytearray(path.read_bytes())
    for signature, offsets in ((b"PK\x03\x04", {"version": 4, "flags": 6, "method": 8, "name": 30}),
                               (b"PK\x01\x02", {"version": 6, "flags": 8, "method": 10, "name": 46})):
        start = data.find(signature)
        while start != -1:
            if name is None or data.startswith(name.encode(), start + offsets["name"]):
                data[start + offsets[field]:start + offsets[field] + 2] = value.to_bytes(2, "little")
            start = data.find(signature, start + 1)
    return write(path, bytes(data))


def not_utf8_names(path):
    """A zip whose names are flagged as UTF-8 (flags bit 11) but hold a byte UTF-8 has not (0xFF): as an archiver that
    writes a local code page and sets the flag anyway leaves them."""
    zip_headers(path, "flags", 0x800)
    return write(path, path.read_bytes().replace(b".png", b".pn\xff"))


def flip_byte(path, offset):
    """Invert the bits of one byte of a file (a negative offset counts from its end)."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    return write(path, bytes(data))


def xz_compressed(path):
    """The file compressed with xz under its own name (tarfile reads a tar by its content, whatever its suffix)."""
    return write(path, lzma.compress(path.read_bytes()))


def replace_image(root, rel, data):
    target = root / rel
    target.write_bytes(data)
    return root


def jpeg_bytes(size=32):
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), 120, dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def empty_class(tmp_path, split="test"):
    root = tree(tmp_path) / "cifar10"
    for image in (root / split / "frog").iterdir():
        image.unlink()
    return root


def two_trees(tmp_path):
    root = tree(tmp_path)
    write_tree(root, n_train=2, n_test=1, top="copy")
    return root


def without(tmp_path, rel):
    root = tree(tmp_path) / "cifar10"
    shutil.rmtree(root / rel)
    return root


def extra_class(root):
    mkdir(root / "cifar10/test/unicorn")
    (root / "cifar10/test/unicorn/0000.png").write_bytes(png_bytes(synthetic_images(1)[0][0]))
    return root


def write(path, data):
    path.write_bytes(data)
    return path


def mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


IMAGE = "cifar10/train/cat/0007.png"  # the cat of write_tree(n_train=2): images 6 and 7

def npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()

