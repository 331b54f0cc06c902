"""File input and output: every file a stage writes appears complete or not at all (atomic);
reading a missing or broken file is one readable error line."""
import contextlib
import csv
import glob
import hashlib
import json
import os
import shutil
import zipfile
import zlib
from pathlib import Path

from stages.lib.cli import UserError

# What reading arrays from an .npz with np.load raises when the file is truncated, foreign
# (a .npy or pickle under that name) or lacks a key.
NUMPY_FILE_ERRORS = (OSError, KeyError, ValueError, TypeError, AttributeError, EOFError, zipfile.BadZipFile,
                     zlib.error)

# torch is imported where it is used, so the stages that never need it (data, split,
# evaluate) start quickly and report bad params at once.


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary sibling path; rename it onto `path` only if the block succeeds.

    Works for files and directories. On failure the temporary is removed and `path`
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    _remove_stale_temporaries(path)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove_stale_temporaries(path):
    """Delete temporaries of `path` left by processes that were killed (kill -9, power loss)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)


def _alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's
        pass
    return True


@contextlib.contextmanager
def removed_on_failure(*paths):
    """Delete `paths` (files or directories) if the block fails or is interrupted, so that a
    failed stage leaves nothing that DVC or the next stage could take for its result."""
    try:
        yield
    except BaseException:
        remove(*paths)
        raise


def _remove(path):
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def remove(*paths):
    """Delete stale outputs (files or directories) if they exist."""
    for path in paths:
        _remove(Path(path))


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path, what="file"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{what} {path} is not valid JSON: {error}") from None


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_csv(path, rows):
    """Write a list of dicts (same keys, in order) as CSV."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def save_torch(path, obj):
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path, what="file"):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unpickling failure means a bad file
        raise UserError(f"{what} {path} is not a readable PyTorch file: {error}") from None


def load_npz(path, keys, what, hint):
    """Arrays `keys` of the .npz file `path`; a missing or unreadable file is a UserError naming it."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path} ({hint})")
    try:
        with np.load(path) as arrays:
            return tuple(arrays[key] for key in keys)
    except NUMPY_FILE_ERRORS as error:
        raise UserError(f"{path} is not a {what} file with {', '.join(keys)} ({error}); {hint}") from None


def sha256(path):
    """SHA-256 of the file at `path`, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
