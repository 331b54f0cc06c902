"""The files of a local copy of a data set (data.source): a folder, or a .tar/.tar.gz/.tgz/.zip archive of one.

Each is read as (relative posix path, reader): reader() gives the file's bytes, None marks a folder. An archive's
bytes are read while it is open (its readers hold them); a folder's are read when asked.
"""
import lzma
import posixpath
import tarfile
import zipfile
import zlib
from functools import partial
from pathlib import PurePosixPath

from stages.lib.cli import UserError

ARCHIVES = (".tar", ".tar.gz", ".tgz", ".zip")


def folder_files(root):
    """Yield (relative posix path, reader) for every file under root, sorted; reader None for a folder."""
    for path in sorted(root.rglob("*")):
        yield PurePosixPath(path.relative_to(root).as_posix()), (None if path.is_dir() else path.read_bytes)


def archive_files(path):
    try:
        if path.name.lower().endswith(".zip"):
            yield from _zip_files(path)
        else:
            yield from _tar_files(path)
    # NotImplementedError: a zip of a version zipfile lacks; UnicodeDecodeError: a zip's name flagged UTF-8 is not
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError,
            NotImplementedError, UnicodeDecodeError) as error:
        detail = str(error).splitlines()[0].rstrip(":") if str(error) else type(error).__name__
        raise UserError(f"data.source: {path} is truncated or not a valid archive ({detail})") from None


def _tar_files(path):
    """Each name once, as its last copy (a name stored twice, as `tar -r` leaves it, file or link, reads as `tar -x`
    leaves it); a link reads as its target's bytes: every file is read before any link is followed, since a symbolic
    link may come before its target. So every file's bytes, ignored ones too, are held until the archive is done."""
    with tarfile.open(path, "r:*") as archive:
        stored, folders = {}, set()  # by a member's normalised name: a file's bytes or a link's member
        for member in archive:
            name = posixpath.normpath(member.name)
            if member.isdir():
                folders.add(name)
                yield PurePosixPath(name), None
            elif member.islnk() or member.issym():
                stored[name] = member
            elif member.isfile():  # not a device or a fifo
                stored[name] = archive.extractfile(member).read()
        # tarfile takes a cut-off header for the end; a whole archive ends with zero blocks.
        archive.fileobj.seek(archive.offset)
        if archive.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError("it ends before its end-of-archive marker")
        while archive.fileobj.read(1 << 20):  # to the stream's end: gzip and xz check their checksum there
            pass
    for name, entry in stored.items():
        if (reader := _tar_reader(name, entry, stored, folders, path)) is not None:
            yield PurePosixPath(name), reader


def _tar_reader(name, entry, stored, folders, path):
    """The reader of the entry stored as name (normalised): a file's bytes, or a link's target's bytes through links
    to links, as a folder reads it; None: a link to a folder the archive stores. A link to no file in the archive, or a
    loop of links, stops with one line when read (naming where the chain breaks or loops), as a folder's does."""
    link, seen = entry, set()
    while not isinstance(entry, bytes):
        folder = "" if entry.islnk() else posixpath.dirname(entry.name)  # a symbolic link's target is relative
        target = posixpath.normpath(posixpath.join(folder, entry.linkname))
        if target in folders:
            return None
        if target in seen or target not in stored:
            why = f"a loop of links through {target}" if target in seen else f"none at {target}"
            return partial(_dangling, f"data.source: {path}: {name} is a link to {link.linkname}, which is no "
                                      f"file in the archive ({why})")
        seen.add(target)
        entry = stored[target]
    return lambda data=entry: data


def _dangling(message):
    raise UserError(message)


def _zip_files(path):
    with zipfile.ZipFile(path) as archive:
        # a name stored twice (zipfile's mode "a" appends one) reads as its last copy, as `unzip -o` leaves it;
        # names normalised as a tar's are (./a/b and a/b are one name)
        for name, info in {posixpath.normpath(info.filename): info for info in archive.infolist()}.items():
            yield PurePosixPath(name), (None if info.is_dir() else _zip_reader(archive, name, info, path))


def _zip_reader(archive, name, info, path):
    """The reader of the entry stored as name (normalised). One that zipfile cannot read (encrypted, or compressed in
    a way it lacks) stops with one line when read, as a dangling link does: an ignored one (__MACOSX/) does not."""
    try:
        data = archive.read(info)
    except RuntimeError as error:  # an encrypted entry, or NotImplementedError: a compression zipfile lacks
        why = "it is encrypted" if info.flag_bits & 0x1 else error
        return partial(_dangling, f"data.source: {path}: {name} cannot be read ({why})")
    return lambda: data
