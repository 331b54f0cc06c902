"""The files of a local copy of a data set (data.source): a folder, or a .tar/.tar.gz/.tgz/.zip archive of one.

Each is read as (relative posix path, reader): reader() gives the file's bytes, None marks a folder. An archive's
bytes are read while it is open (its readers hold them); a folder's are read when asked.
"""
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
    except (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        detail = str(error).splitlines()[0].rstrip(":") if str(error) else type(error).__name__
        raise UserError(f"data.source: {path} is truncated or not a valid archive ({detail})") from None


def _tar_files(path):
    """Files first, then links: a link's target has then been read (a symbolic link may come before it)."""
    with tarfile.open(path, "r:*") as archive:
        read, links = {}, []  # read: a member's normalised name -> its bytes, for a link to it
        for member in archive:
            if member.isdir():
                yield PurePosixPath(member.name), None
            elif member.islnk() or member.issym():
                links.append(member)
            elif (reader := _tar_reader(archive, member, read, path)) is not None:  # None: a device, a fifo
                yield PurePosixPath(member.name), reader
        for member in links:
            if (reader := _tar_reader(archive, member, read, path)) is not None:  # None: a link to a folder
                yield PurePosixPath(member.name), reader
        # tarfile takes a cut-off header for the end; a whole archive ends with zero blocks.
        archive.fileobj.seek(archive.offset)
        if archive.fileobj.read(tarfile.BLOCKSIZE) != bytes(tarfile.BLOCKSIZE):
            raise tarfile.ReadError("it ends before its end-of-archive marker")


def _tar_reader(archive, member, read, path):
    """A member's reader (a link's reads its target, as a folder reads it); None: a device, a link to a folder.
    A target already in `read` is not read again (gzip would decompress the archive again to seek back to it), so
    `read` holds every file's bytes, ignored ones too, until the archive is done. A link to no file in the archive
    (or a loop of links) stops with one line when read, as a folder's does."""
    data = None
    if member.islnk() or member.issym():
        folder = "" if member.islnk() else posixpath.dirname(member.name)  # a symbolic link's target is relative
        data = read.get(posixpath.normpath(posixpath.join(folder, member.linkname)))
    if data is None:
        try:
            file = archive.extractfile(member)
        except (KeyError, RecursionError):  # tarfile's lookup of the target: not found, or a loop of links
            return partial(_dangling, f"data.source: {path}: {member.name} is a link to {member.linkname}, "
                                      "which is no file in the archive (or a loop of links)")
        if file is None:
            return None
        data = file.read()
    read[posixpath.normpath(member.name)] = data
    return lambda: data


def _dangling(message):
    raise UserError(message)


def _zip_files(path):
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.is_dir():
                yield PurePosixPath(info.filename), None
            else:
                data = archive.read(info)
                yield PurePosixPath(info.filename), (lambda data=data: data)
