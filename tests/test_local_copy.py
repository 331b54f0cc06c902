"""A local copy's files (stages/lib/local_copy.py): a tar or zip archive reads as the folder it was made of."""
import os
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from stages.lib import sources
from stages.lib.cli import UserError
from tests.conftest import make_archive
from tests.faults import zip_headers
from tests.test_sources import encode, numbered_flat_folder


def tar_reads_as_folder(tmp_path, root, name, arcname):
    """Pack root as tmp_path/name (a gzipped tar, root stored as arcname); it reads as the folder does (classes,
    train and test x and y). Returns the folder's read."""
    with tarfile.open(tmp_path / name, "w:gz") as archive:
        archive.add(root, arcname=arcname)
    found = sources.read_source(str(tmp_path / name), 24, 0.2, 7, tmp_path / "dl")
    expected = sources.read_source(str(root), 24, 0.2, 7, tmp_path / "dl")
    assert found.classes == expected.classes
    for split in ("train", "test"):
        for got, want in zip(getattr(found, split), getattr(expected, split)):
            np.testing.assert_array_equal(got, want)
    return expected


def test_an_archive_made_of_a_folder_with_tar_dot_reads_as_the_folder(tmp_path):
    root = numbered_flat_folder(tmp_path / "flat")
    # as `tar -C flowers -czf flat.tgz .`: an entry ./ for the top itself
    expected = tar_reads_as_folder(tmp_path, root, "flat.tgz", arcname=".")
    assert expected.classes == ["daisy", "rose", "tulip"]


def test_links_in_an_archive_read_as_their_targets_and_a_dangling_one_stops(tmp_path):
    root = numbered_flat_folder(tmp_path / "flat")
    os.link(root / "daisy/000.png", root / "daisy/hard.png")  # tar stores the second name as a hard link
    (root / "rose/soft.png").symlink_to("010.png")
    expected = tar_reads_as_folder(tmp_path, root, "links.tgz", arcname="flowers")
    assert len(expected.train[0]) + len(expected.test[0]) == 27
    (root / "rose/soft.png").unlink()
    (root / "rose/soft.png").symlink_to("missing.png")
    make_archive(root.parent, tmp_path / "dangle.tar.gz")
    with pytest.raises(UserError, match=r"dangle.tar.gz: flowers/rose/soft.png is a link to missing.png, which is no"):
        sources.read_source(str(tmp_path / "dangle.tar.gz"), 24, 0.2, 7, tmp_path / "dl")


def test_a_dangling_link_is_named_as_the_archive_s_other_files_are(tmp_path):
    """In a `tar -C copy .` archive, whose names begin with ./, as a bad image's message names its file."""
    root = numbered_flat_folder(tmp_path / "flat")
    (root / "rose/soft.png").symlink_to("missing.png")
    with tarfile.open(tmp_path / "dot.tgz", "w:gz") as archive:
        archive.add(root, arcname=".")
    with pytest.raises(UserError, match=r"dot.tgz: rose/soft\.png is a link to missing\.png, "
                                        r".*\(none at rose/missing\.png\)$"):
        sources.read_source(str(tmp_path / "dot.tgz"), 24, 0.2, 7, tmp_path / "dl")


def test_a_dangling_link_the_copy_ignores_reads_as_the_folder_does(tmp_path):
    """A dangling link stops the stage only where an image is (one in a hidden folder or beside the classes is ignored);
    links in a `tar -C copy .` archive (./ names) to a link through ../ read as the folder's files."""
    root = numbered_flat_folder(tmp_path / "flat")
    (root / ".git").mkdir()
    (root / ".git/HEAD").symlink_to("/nonexistent/HEAD")
    (root / "NOTES.md").symlink_to("../../NOTES.md")
    (root / "daisy/soft.png").symlink_to("003.png")
    (root / "tulip/twice.png").symlink_to("../daisy/soft.png")
    expected = tar_reads_as_folder(tmp_path, root, "dot.tgz", arcname=".")
    assert len(expected.train[0]) + len(expected.test[0]) == 27


def test_a_symbolic_link_before_its_target_reads_and_a_loop_of_links_stops(tmp_path, monkeypatch):
    """tar stores a folder's entries in the order the file system lists them, so a link may come before its target;
    it reads the target's bytes, not the archive again (gzip would decompress it again to seek back). A link to
    itself is a loop, which stops with one line as a dangling link does."""
    root = numbered_flat_folder(tmp_path / "flat")
    (root / "daisy/000a.png").symlink_to("009.png")  # sorted before 009.png, as tarfile.add stores it
    extracted, extractfile = [], tarfile.TarFile.extractfile
    monkeypatch.setattr(tarfile.TarFile, "extractfile",
                        lambda archive, member: extracted.append(member.name) or extractfile(archive, member))
    expected = tar_reads_as_folder(tmp_path, root, "early.tgz", arcname="flowers")
    assert len(expected.train[0]) + len(expected.test[0]) == 26
    assert "flowers/daisy/009.png" in extracted and "flowers/daisy/000a.png" not in extracted
    (root / "rose/loop.png").symlink_to("loop.png")
    make_archive(root.parent, tmp_path / "loop.tar.gz")
    with pytest.raises(UserError, match=r"loop.tar.gz: flowers/rose/loop.png is a link to loop.png, .*a loop of links"):
        sources.read_source(str(tmp_path / "loop.tar.gz"), 24, 0.2, 7, tmp_path / "dl")


@pytest.mark.parametrize("kind", ["tar", "tar, a link last", "zip", "zip, as ./"])
def test_a_name_stored_twice_reads_as_its_last_copy(tmp_path, kind):
    """`tar -r` (or zipfile's mode "a") appends a changed file under the same name; the archive reads as `tar -x`
    leaves it: the last copy, once (not both, which could land one in training and one in the test set). A file
    replaced by a link reads as the link; ./a/b and a/b are one name."""
    root = numbered_flat_folder(tmp_path / "flat")
    archive_path = make_archive(root.parent, tmp_path / ("twice.zip" if kind.startswith("zip") else "twice.tar"))
    changed, name = root / "daisy/000.png", "flowers/daisy/000.png"
    if kind == "tar, a link last":
        changed.unlink()
        changed.symlink_to("001.png")
    else:
        changed.write_bytes(encode(Image.new("L", (40, 30), 200), "PNG"))
    if kind == "zip":
        with zipfile.ZipFile(archive_path, "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
            archive.write(changed, name)
    elif kind == "zip, as ./":
        with zipfile.ZipFile(archive_path, "a") as archive:
            archive.writestr(f"./{name}", changed.read_bytes())
    else:
        with tarfile.open(archive_path, "a") as archive:
            archive.add(changed, arcname=name)
    found = sources.read_source(str(archive_path), 24, 0.2, 7, tmp_path / "dl")
    expected = sources.read_source(str(root), 24, 0.2, 7, tmp_path / "dl")
    assert len(found.train[0]) + len(found.test[0]) == 25
    for got, want in zip(found.train + found.test, expected.train + expected.test):
        np.testing.assert_array_equal(got, want)
    if kind != "tar, a link last":  # the folder holds the changed copy
        assert 200 in expected.train[0][:, 0, 0, 0].tolist() + expected.test[0][:, 0, 0, 0].tolist()


def test_a_loop_of_two_links_says_where_it_loops(tmp_path):
    root = numbered_flat_folder(tmp_path / "flat")
    (root / "rose/x.png").symlink_to("y.png")
    (root / "rose/y.png").symlink_to("x.png")
    make_archive(root.parent, tmp_path / "loop.tar")
    with pytest.raises(UserError, match=r"rose/(x|y).png is a link to (y|x).png, which is no file in the archive "
                                        r"\(a loop of links through flowers/rose/\2.png\)$"):
        sources.read_source(str(tmp_path / "loop.tar"), 24, 0.2, 7, tmp_path / "dl")


def test_a_broken_chain_of_links_names_where_it_breaks(tmp_path):
    root = numbered_flat_folder(tmp_path / "flat")
    (root / ".cache").mkdir()
    (root / ".cache/y.png").symlink_to("gone.png")
    (root / "daisy/x.png").symlink_to("../.cache/y.png")
    make_archive(root.parent, tmp_path / "chain.tar")
    with pytest.raises(UserError, match=r"daisy/x.png is a link to ../.cache/y.png, .*none at flowers/.cache/gone.png"):
        sources.read_source(str(tmp_path / "chain.tar"), 24, 0.2, 7, tmp_path / "dl")


def test_an_unreadable_zip_entry_stops_where_an_image_is_named_as_the_archive_s_other_files_are(tmp_path):
    """An encrypted entry stops with one line when read, as a dangling link does: one the copy ignores (__MACOSX/)
    does not stop it, and one in a `zip -r . ` archive (./ names) is named by its normalised name."""
    root = numbered_flat_folder(tmp_path / "flat")
    (root / "__MACOSX/daisy").mkdir(parents=True)
    (root / "__MACOSX/daisy/._000.png").write_bytes(b"resource fork")
    archive_path = zip_headers(make_archive(root.parent, tmp_path / "mac.zip"), "flags", 0x1,
                               name="flowers/__MACOSX/daisy/._000.png")
    assert zipfile.ZipFile(archive_path).getinfo("flowers/__MACOSX/daisy/._000.png").flag_bits & 0x1  # encrypted
    found = sources.read_source(str(archive_path), 24, 0.2, 7, tmp_path / "dl")
    expected = sources.read_source(str(root), 24, 0.2, 7, tmp_path / "dl")
    for got, want in zip(found.train + found.test, expected.train + expected.test):
        np.testing.assert_array_equal(got, want)
    with zipfile.ZipFile(tmp_path / "dot.zip", "w") as archive:
        for path in sorted(root.rglob("*.png")):
            archive.writestr(f"./{path.relative_to(root).as_posix()}", path.read_bytes())  # write() drops ./
    zip_headers(tmp_path / "dot.zip", "flags", 0x1, name="./rose/010.png")
    with pytest.raises(UserError, match=r"dot\.zip: rose/010\.png cannot be read \(it is encrypted\)$"):
        sources.read_source(str(tmp_path / "dot.zip"), 24, 0.2, 7, tmp_path / "dl")
