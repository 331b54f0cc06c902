"""A local copy's files (stages/lib/local_copy.py): a tar archive reads as the folder it was made of."""
import os
import tarfile

import numpy as np
import pytest

from stages.lib import sources
from stages.lib.cli import UserError
from tests.test_sources import numbered_flat_folder


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
    with tarfile.open(tmp_path / "dangling.tgz", "w:gz") as archive:
        archive.add(root, arcname="flowers")
    with pytest.raises(UserError, match=r"dangling.tgz: flowers/rose/soft.png is a link to missing.png, which is no "):
        sources.read_source(str(tmp_path / "dangling.tgz"), 24, 0.2, 7, tmp_path / "dl")


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


def test_a_symbolic_link_before_its_target_reads_and_a_loop_of_links_stops(tmp_path):
    """tar stores a folder's entries in the order the file system lists them, so a link may come before its target;
    a link to itself is a loop, which stops with one line as a dangling link does."""
    root = numbered_flat_folder(tmp_path / "flat")
    (root / "daisy/000a.png").symlink_to("009.png")  # sorted before 009.png, as tarfile.add stores it
    expected = tar_reads_as_folder(tmp_path, root, "early.tgz", arcname="flowers")
    assert len(expected.train[0]) + len(expected.test[0]) == 26
    (root / "rose/loop.png").symlink_to("loop.png")
    with tarfile.open(tmp_path / "loop.tgz", "w:gz") as archive:
        archive.add(root, arcname="flowers")
    with pytest.raises(UserError, match=r"loop.tgz: flowers/rose/loop.png is a link to loop.png, .*a loop of links"):
        sources.read_source(str(tmp_path / "loop.tgz"), 24, 0.2, 7, tmp_path / "dl")
