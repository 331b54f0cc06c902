"""Sources of images (stages.lib.sources) and the prepared data's facts (stages.lib.prepared):
any image mode and size, both folder layouts, the held-out test set, named data sets (faked)."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from stages.lib import prepared, sources
from stages.lib.cli import UserError
from tests.conftest import prepared_split, save_data


def encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def palette():
    """A 30x20 palette image of colour index 1 (10, 200, 30); index 0 is black."""
    image = Image.new("P", (30, 20), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return image


def with_exif_rotation():
    """48x48, red left half and blue right half, EXIF orientation 3 (shown rotated by 180 degrees)."""
    image = Image.new("RGB", (48, 48), (255, 0, 0))
    image.paste((0, 0, 255), (24, 0, 48, 48))
    exif = Image.Exif()
    exif[0x0112] = 3
    return encode(image, "PNG", exif=exif)


WHITE = (255, 255, 255)
# (class, file name, bytes, expected colour of every pixel, tolerance): solid images of mixed sizes and modes.
SOLID = [
    ("apple", "cmyk.jpg", encode(Image.new("CMYK", (20, 20), (0, 255, 255, 0)), "JPEG", quality=95), (255, 0, 0), 3),
    ("apple", "grey.png", encode(Image.new("L", (20, 30), 90), "PNG"), (90, 90, 90), 0),
    ("apple", "i16.png", encode(Image.fromarray(np.full((40, 50), 32896, np.uint16)), "PNG"), (128, 128, 128), 0),
    ("apple", "rgb.jpg", encode(Image.new("RGB", (64, 64), (200, 40, 40)), "JPEG", quality=95), (200, 40, 40), 3),
    ("banana", "alpha-half.png", encode(Image.new("LA", (33, 70), (100, 128)), "PNG"), (177, 177, 177), 1),
    ("banana", "palette.gif", encode(palette(), "GIF"), (10, 200, 30), 0),
    ("banana", "palette-clear.png", encode(palette(), "PNG", transparency=1), WHITE, 0),
    ("banana", "rgba-clear.png", encode(Image.new("RGBA", (48, 48), (9, 9, 9, 0)), "PNG"), WHITE, 0),
    ("cherry", "bilevel.bmp", encode(Image.new("1", (20, 20), 1), "BMP"), WHITE, 0),
    ("cherry", "float.tif", encode(Image.new("F", (40, 40), 0.5), "TIFF"), (128, 128, 128), 0),
    ("cherry", "gif-clear.gif", encode(palette(), "GIF", transparency=1), WHITE, 0),
    ("cherry", "int32.tif", encode(Image.new("I", (40, 40), 65535), "TIFF"), WHITE, 0),
    ("cherry", "rgb.bmp", encode(Image.new("RGB", (96, 48), (5, 6, 7)), "BMP"), (5, 6, 7), 0),
    ("cherry", "rgba.webp", encode(Image.new("RGBA", (52, 52), (60, 70, 80, 0)), "WEBP", lossless=True), WHITE, 0),
    ("cherry", "rgb.webp", encode(Image.new("RGB", (52, 52), (60, 70, 80)), "WEBP", lossless=True), (60, 70, 80), 0),
]


def write(root, rel, data):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def mixed(tmp_path):
    """train/ of SOLID, test/ of one exact 48x48 RGB PNG per class; returns (root, test images)."""
    for name, file, data, _, _ in SOLID:
        write(tmp_path / "mixed", f"train/{name}/{file}", data)
    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, size=(3, 48, 48, 3), dtype=np.uint8)
    for image, name in zip(test, ("apple", "banana", "cherry")):
        write(tmp_path / "mixed", f"test/{name}/0.png", encode(Image.fromarray(image), "PNG"))
    return tmp_path / "mixed", test


def test_any_mode_and_size_becomes_rgb_of_image_size(tmp_path, mixed):
    root, test_images = mixed
    found = sources.read_source(str(root), 48, 0.2, 0, tmp_path / "dl")
    x, y = found.train
    assert found.classes == ["apple", "banana", "cherry"] and found.test_split == "test/ folder"
    assert x.dtype == np.uint8 and x.shape == (len(SOLID), 48, 48, 3) and y.dtype == np.int64
    expected = sorted(SOLID, key=lambda case: (case[0], case[1]))  # by class, then file name
    np.testing.assert_array_equal(y, [found.classes.index(case[0]) for case in expected])
    for image, (name, file, _, colour, tolerance) in zip(x, expected):
        error = np.abs(image.astype(int) - np.array(colour)).max()
        assert error <= tolerance, f"{name}/{file}: {image[24, 24]} is not {colour}"
    np.testing.assert_array_equal(found.test[0], test_images)  # already 48x48: exact pixels
    np.testing.assert_array_equal(found.test[1], [0, 1, 2])
    assert found.unlabeled is None and found.sha256 is None


def test_resize_keeps_the_shorter_side_and_crops_the_centre():
    tall = Image.new("RGB", (100, 200), (255, 0, 0))  # red top quarter, green middle half, blue bottom quarter
    tall.paste((0, 255, 0), (0, 50, 100, 150))
    tall.paste((0, 0, 255), (0, 150, 100, 200))
    x = np.asarray(sources.fit(tall, 48))  # 100x200 -> 48x96 -> rows 24..72: the green half
    assert x.shape == (48, 48, 3)
    np.testing.assert_array_equal(x[4:44].reshape(-1, 3), np.tile([0, 255, 0], (40 * 48, 1)))
    wide = np.zeros((48, 96, 3), np.uint8)
    wide[:, 24:72] = 200  # the shorter side is already 48: no resampling, only the crop
    np.testing.assert_array_equal(np.asarray(sources.fit(Image.fromarray(wide), 48)), wide[:, 24:72])


def test_exif_orientation_is_applied(tmp_path):
    for rel in ("left/0.png", "left/1.png", "right/0.png", "right/1.png"):
        write(tmp_path / "exif", rel, with_exif_rotation())
    found = sources.read_source(str(tmp_path / "exif"), 48, 0.5, 0, tmp_path / "dl")
    image = np.concatenate([found.train[0], found.test[0]])[0]
    assert tuple(image[24, 4]) == (0, 0, 255) and tuple(image[24, 44]) == (255, 0, 0)  # rotated by 180


def numbered_flat_folder(root, per_class=(10, 10, 5)):
    """Flat <class>/* below a wrapping folder (with a README beside the classes); image i is solid i."""
    write(root, "flowers/README.txt", b"three kinds of flowers\n")
    index = 0
    for name, count in zip(("daisy", "rose", "tulip"), per_class):
        for _ in range(count):
            write(root, f"flowers/{name}/{index:03d}.png", encode(Image.new("L", (40, 30), index), "PNG"))
            index += 1
    return root / "flowers"


def test_flat_layout_holds_out_a_stratified_seeded_test_set(tmp_path):
    root = numbered_flat_folder(tmp_path / "flat")
    found = sources.read_source(str(root), 24, 0.2, 7, tmp_path / "dl")
    assert found.classes == ["daisy", "rose", "tulip"]
    assert found.test_split == "held out 20% of the labelled images (stratified, seed 7)"
    (x, y), (test_x, test_y) = found.train, found.test
    assert x.shape == (20, 24, 24, 3) and test_x.shape == (5, 24, 24, 3)
    assert np.bincount(test_y).tolist() == [2, 2, 1] and np.bincount(y).tolist() == [8, 8, 4]
    train_ids, test_ids = x[:, 0, 0, 0], test_x[:, 0, 0, 0]  # each image's number (its grey level)
    assert sorted([*train_ids, *test_ids]) == list(range(25)) and not set(train_ids) & set(test_ids)
    np.testing.assert_array_equal(y, np.digitize(train_ids, [10, 20]))  # labels follow the files
    again = sources.read_source(str(root), 24, 0.2, 7, tmp_path / "dl")
    np.testing.assert_array_equal(again.test[0], test_x)
    other = sources.read_source(str(root), 24, 0.2, 8, tmp_path / "dl")
    assert not np.array_equal(other.test[0][:, 0, 0, 0], test_ids)


def test_stray_files_beside_a_wrapping_folder_are_ignored(tmp_path):
    root = numbered_flat_folder(tmp_path / "copy", per_class=(2, 2, 0))
    write(tmp_path / "copy", "README.txt", b"flowers, from somewhere\n")
    write(tmp_path / "copy", "LICENSE", b"CC BY 4.0\n")
    found = sources.read_source(str(root.parent), 24, 0.5, 0, tmp_path / "dl")
    assert found.classes == ["daisy", "rose"]
    assert np.bincount(found.train[1]).tolist() == [1, 1] and np.bincount(found.test[1]).tolist() == [1, 1]


@pytest.mark.parametrize("layout", [
    "{split}/{name}/images/{level}.png",  # tiny-imagenet style: images deeper in the class folders
    "train/{split}/{name}/{level}.png",  # a wrapping folder named like a split is not the split
    "test/{split}/{name}/{level}.png",
    "copy/{split}/{name}/{level}.png",
    "{split}/{name}/test/x/{level}.png",  # nor is a folder named like a split inside a class folder
])
def test_the_split_folders_are_the_outermost_train_and_test_that_hold_class_folders(tmp_path, layout):
    """train/<class>/ and test/<class>/, wrapped in any folder (one named train/ or test/ too) and with the
    images at any depth below (in a folder named train/ or test/ too); loose files around them are ignored."""
    for split, levels in (("train", (10, 20, 30, 40)), ("test", (200, 220))):
        for index, level in enumerate(levels):
            name = ("ant", "bee")[index % 2]
            image = encode(Image.new("L", (24, 24), level), "PNG")
            write(tmp_path / "local", layout.format(split=split, name=name, level=level), image)
    top = layout.partition("{split}")[0]  # the folder holding train/ and test/
    for rel in (f"{top}README.txt", "NOTES.txt", f"{top}train/NOTES.txt", f"{top}test/NOTES.txt"):
        write(tmp_path / "local", rel, b"not an image\n")  # beside, at the top, right inside train/ and test/
    found = sources.read_source(str(tmp_path / "local"), 24, 0.5, 0, tmp_path / "dl")
    assert found.classes == ["ant", "bee"] and found.test_split == "test/ folder"
    assert found.train[0][:, 0, 0, 0].tolist() == [10, 30, 20, 40] and found.train[1].tolist() == [0, 0, 1, 1]
    assert found.test[0][:, 0, 0, 0].tolist() == [200, 220] and found.test[1].tolist() == [0, 1]


@pytest.mark.parametrize("inner, culprit", [
    ("cat/train/a/0.png", "dog/0.png lies outside cat/train/ and cat/test/"),
    ("cat/test/old/0.png", "dog/0.png lies outside cat/train/ and cat/test/"),
    ("cat/train/0.png", "cat/train/0.png lies in a train/ folder inside class folder cat/"),
    ("cat/test/0.png", "cat/test/0.png lies in a test/ folder inside class folder cat/"),
], ids=["train", "test", "train-files", "test-files"])
def test_a_split_folder_inside_a_flat_class_folder_is_refused(tmp_path, inner, culprit):
    """<class>/* with a train/ or test/ folder inside one class: not a split tree that drops the classes, nor
    the class's own test images to mix into training."""
    for rel in ("dog/0.png", "dog/1.png", "cat/0.png", "cat/1.png", inner, inner.replace("0.png", "1.png")):
        write(tmp_path / "src", rel, encode(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(UserError) as error:
        sources.read_source(str(tmp_path / "src"), 8, 0.5, 0, tmp_path / "dl")
    assert "\n" not in str(error.value) and culprit in str(error.value), str(error.value)


def test_a_folder_of_files_beside_train_and_test_is_refused(tmp_path):
    for rel in ("copy/train/ant/0.png", "copy/train/bee/0.png", "copy/test/ant/0.png", "copy/test/bee/0.png",
                "copy/val/a/0.png"):
        write(tmp_path / "src", rel, encode(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(UserError) as error:
        sources.read_source(str(tmp_path / "src"), 8, 0.5, 0, tmp_path / "dl")
    message = str(error.value)
    assert ("\n" not in message and "copy/val/a/0.png lies outside copy/train/ and copy/test/" in message
            and "move or remove it" in message), message


def test_hold_out_too_small_a_class_is_named(tmp_path):
    root = numbered_flat_folder(tmp_path / "flat", per_class=(10, 10, 2))
    with pytest.raises(UserError) as error:
        sources.read_source(str(root), 24, 0.2, 0, tmp_path / "dl")
    assert "class tulip has 2 image(s)" in str(error.value) and "no test image" in str(error.value)
    with pytest.raises(UserError, match="class tulip has 2 image.*no training image"):
        sources.read_source(str(root), 24, 0.8, 0, tmp_path / "dl")


@pytest.mark.parametrize("extra, culprits", [
    ("test/plum/0.png", ["test/ class folders differ", "unexpected: plum"]),
    (None, ["test/ class folders differ", "missing: cherry"]),
], ids=["extra", "missing"])
def test_test_classes_must_match_train_classes(tmp_path, mixed, extra, culprits):
    root, _ = mixed
    (root / "test/cherry/0.png").unlink()
    (root / "test/cherry").rmdir()
    if extra:
        write(root, extra, encode(Image.new("RGB", (8, 8)), "PNG"))
        write(root, "test/cherry/0.png", encode(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(UserError) as error:
        sources.read_source(str(root), 48, 0.2, 0, tmp_path / "dl")
    assert "\n" not in str(error.value) and all(c in str(error.value) for c in culprits)


@pytest.mark.parametrize("files, culprits", [
    (["cats/0.png", "cats/1.png"], ["no class folders in cats/", "at least 2"]),
    (["pets/cats/0.png", "pets/README.md"], ["only 1 class (cats) in pets/", "at least 2"]),
    (["train/cats/0.png", "test/cats/0.png"], ["only 1 class (cats) in train/", "at least 2"]),
], ids=["one-folder", "one-class-flat", "one-class-split"])
def test_fewer_than_two_classes_is_one_line(tmp_path, files, culprits):
    for rel in files:
        write(tmp_path / "src", rel, encode(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(UserError) as error:
        sources.read_source(str(tmp_path / "src"), 32, 0.5, 0, tmp_path / "dl")
    assert "\n" not in str(error.value) and all(c in str(error.value) for c in culprits), str(error.value)


# ---------------------------------------------------------------------------------------------
# Named data sets, with small fakes of torchvision's classes (no download)


class FakeCIFAR100:
    url = "https://example.org/cifar-100.tar.gz"
    classes = ["apple", "aquarium_fish", "baby"]

    def __init__(self, root, train, download):
        rng = np.random.default_rng(int(train))
        n = 6 if train else 3
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 3 for i in range(n)]


class FakeSTL10:
    """Images (N, 3, 96, 96) as torchvision keeps them: channels (10, 20, 30) left, (110, 120, 130) right."""
    url = "https://example.org/stl10_binary.tar.gz"
    sizes = {"train": 4, "test": 2, "unlabeled": 7}

    def __init__(self, root, split, download):
        n = self.sizes[split]
        self.data = np.empty((n, 3, 96, 96), np.uint8)
        self.data[:, :, :, :48] = np.array([10, 20, 30], np.uint8).reshape(1, 3, 1, 1)
        self.data[:, :, :, 48:] = np.array([110, 120, 130], np.uint8).reshape(1, 3, 1, 1)
        self.labels = np.full(n, -1) if split == "unlabeled" else np.arange(n) % 2
        self.classes = ["airplane", "bird"]


def test_cifar100_gives_its_classes_and_exact_arrays(tmp_path, fake_torchvision):
    fake_torchvision.CIFAR100 = FakeCIFAR100
    found = sources.read_source("cifar100", 32, 0.2, 0, tmp_path / "dl")
    assert found.classes == FakeCIFAR100.classes and found.url == FakeCIFAR100.url
    train = FakeCIFAR100(None, True, False)
    np.testing.assert_array_equal(found.train[0], train.data)
    np.testing.assert_array_equal(found.train[1], train.targets)
    assert found.test[0].shape == (3, 32, 32, 3) and found.unlabeled is None and found.test_split == "official"


def test_stl10_unlabeled_images_join_and_are_resized(tmp_path, fake_torchvision):
    fake_torchvision.STL10 = FakeSTL10
    found = sources.read_source("stl10", 32, 0.2, 0, tmp_path / "dl")
    assert found.classes == ["airplane", "bird"]
    assert found.train[0].shape == (4, 32, 32, 3) and found.test[0].shape == (2, 32, 32, 3)
    assert found.unlabeled.shape == (7, 32, 32, 3) and found.unlabeled.dtype == np.uint8
    np.testing.assert_array_equal(found.train[1], [0, 1, 0, 1])
    for x in (found.train[0], found.unlabeled):  # channels last; the left third stays (10, 20, 30)
        assert (x[:, :, :12] == [10, 20, 30]).all() and (x[:, :, 20:] == [110, 120, 130]).all()
    native = sources.read_source("stl10", 96, 0.2, 0, tmp_path / "dl")
    np.testing.assert_array_equal(native.unlabeled, FakeSTL10(None, "unlabeled", True).data.transpose(0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------
# Facts of the prepared data


def test_channel_statistics_match_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, size=(7, 5, 5, 3), dtype=np.uint8), rng.integers(0, 60, size=(4, 5, 5, 3),
                                                                                    dtype=np.uint8)]
    mean, std = prepared.channel_statistics(parts, chunk=3)
    pixels = np.concatenate(parts).reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), rtol=1e-12)


def small_prepared(path, **arrays):
    rng = np.random.default_rng(0)
    arrays = {"train": (rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 2] * 2)),
              "test": (rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8), np.array([0, 1, 2])), **arrays}
    save_data(path, arrays["train"], arrays["test"], source="small", classes=["a", "b", "c"],
              unlabeled=arrays.get("unlabeled"))
    return arrays, prepared.read_facts(path)


def test_prepared_data_round_trips_with_its_facts(tmp_path):
    unlabeled = np.full((5, 8, 8, 3), 7, np.uint8)
    arrays, facts = small_prepared(tmp_path / "with", unlabeled=unlabeled)
    assert prepared.read_facts(tmp_path / "with") == facts and facts.unlabeled == 5 and facts.image_size == 8
    assert facts.counts == {"train": {"a": 2, "b": 2, "c": 2}, "test": {"a": 1, "b": 1, "c": 1}}
    mean, _ = prepared.channel_statistics([arrays["train"][0], unlabeled])  # train and unlabeled images
    assert facts.mean == tuple(round(v, 4) for v in mean)
    np.testing.assert_array_equal(prepared_split(tmp_path / "with", "unlabeled"), unlabeled)
    np.testing.assert_array_equal(prepared_split(tmp_path / "with", "test")[0], arrays["test"][0])
    small_prepared(tmp_path / "without")
    assert prepared_split(tmp_path / "without", "unlabeled").shape == (0, 8, 8, 3)


@pytest.mark.parametrize("content, culprit", [
    (None, "data facts not found"),
    (b"{not json", "Invalid JSON"),
    (b'{"source": "x"}', "url: Field required"),
    (b"[1, 2]", "Input should be an object"),
], ids=["missing", "broken", "incomplete", "not-an-object"])
def test_read_facts_of_a_bad_meta_json_is_one_line(tmp_path, content, culprit):
    if content is not None:
        (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(UserError) as error:
        prepared.read_facts(tmp_path)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "meta.json") in message and culprit in message, message
    assert message.endswith("rerun: dvc repro -f data")


def test_facts_that_contradict_themselves_are_refused(tmp_path):
    _, facts = small_prepared(tmp_path)
    raw = facts.model_dump(mode="json")
    for change, culprit in ((lambda r: r.update(classes=["a"]), "classes"),
                            (lambda r: r["counts"].pop("test"), "counts"),
                            (lambda r: r.update(std=[0.2, 0.0, 0.2]), "std")):
        edited = {**raw, "counts": dict(raw["counts"])}
        change(edited)
        (tmp_path / "meta.json").write_text(json.dumps(edited))
        with pytest.raises(UserError, match=culprit):
            prepared.read_facts(tmp_path)
