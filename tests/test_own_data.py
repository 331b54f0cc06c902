"""Your own images, end to end: `dvc repro` on a made-up folder of 3 classes with mixed sizes, formats
and modes (no test/ folder, so a test set is held out), resized to 48x48; the data facts, not CIFAR
constants, drive every stage."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import copy_project, write_params
from tests.test_pipeline import TINY, init_repo, sh

CLASSES = ("circle", "square", "stripes")
# (size, mode, file format) cycled over each class's images: grayscale, RGBA, palette, RGB; none is 48x48
# except one, and some are not square, so both resizing and centre cropping are exercised.
VARIANTS = [((48, 48), "RGB", "JPEG"), ((64, 40), "L", "PNG"), ((30, 50), "RGBA", "PNG"), ((72, 72), "P", "GIF"),
            ((56, 48), "RGB", "PNG"), ((48, 96), "LA", "PNG")]
PER_CLASS = 30


def drawing(label, index, rng):
    """A (96, 96, 3) uint8 picture whose class shows in its shape: a disc, a square, or stripes."""
    yy, xx = np.mgrid[:96, :96]
    if label == 0:
        mask = (yy - 48) ** 2 + (xx - 48) ** 2 < (20 + index % 10) ** 2
    elif label == 1:
        half = 18 + index % 10
        mask = (abs(yy - 48) < half) & (abs(xx - 48) < half)
    else:
        mask = (xx // (8 + index % 4)) % 2 == 0
    colour = rng.integers(60, 256, 3)
    picture = np.where(mask[..., None], colour, 255 - colour // 2) + rng.normal(0, 12, (96, 96, 3))
    return np.clip(picture, 0, 255).astype(np.uint8)


def make_folder(root):
    """root/<class>/<n>.<ext>: PER_CLASS images a class, in the VARIANTS' sizes, modes and formats."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for index in range(PER_CLASS):
            size, mode, fmt = VARIANTS[index % len(VARIANTS)]
            image = Image.fromarray(drawing(label, index, rng)).resize(size).convert(mode)
            image.save(root / name / f"{index:03d}.{fmt.lower()}", fmt)
    return root


@pytest.fixture
def own_project(tmp_path):
    repo = copy_project(tmp_path / "repo")
    folder = make_folder(tmp_path / "shapes")
    write_params(repo / "params.yaml", **{
        **TINY, "data.source": str(folder), "data.image_size": 48, "data.test_fraction": 0.2, "data.val_size": 12,
        "pretrain.batch_size": 32, "finetune.batch_size": 16, "fraction": [1.0, 0.5],
        # The standard stem and SimCLR's blur from 48 px, so this small run takes the large-image paths.
        "model.standard_stem_from": 48, "pretrain.augment.blur_from": 48})
    init_repo(repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "init", cwd=repo)
    return repo


def test_dvc_repro_on_your_own_image_folder(own_project):
    repro = sh("dvc", "repro", cwd=own_project)
    assert "standard stem" in repro.stderr + repro.stdout
    facts = json.loads((own_project / "data/prepared/meta.json").read_text())
    assert facts["classes"] == list(CLASSES) and facts["image_size"] == 48
    assert facts["test_split"].startswith("held out 20%") and facts["unlabeled"] == 0
    assert facts["counts"]["test"] == {name: 6 for name in CLASSES}  # 20% of 30, stratified
    assert all(0 < m < 1 for m in facts["mean"]) and all(0 < s < 0.5 for s in facts["std"])
    with np.load(own_project / "data/prepared/train.npz") as data:
        assert data["x"].shape == (72, 48, 48, 3) and sorted(set(data["y"].tolist())) == [0, 1, 2]
    weights = torch.load(own_project / "data/init/ssl.pt", weights_only=False)
    assert weights["stem"] == "standard" and weights["origin"] == "simclr"
    per_class = json.loads((own_project / "metrics/per_class.json").read_text())
    assert set(per_class["ssl"]["n100"]["per_class_recall"]) == set(CLASSES)
    assert np.array(per_class["baseline"]["n50"]["confusion"]).shape == (3, 3)
    report = (own_project / "metrics/report.md").read_text()
    assert "# SimCLR vs supervised baseline on shapes" in report and "3 classes" in report
    assert "Seed project" not in report  # the seed project's numbers are CIFAR-10's
    assert "Data and pipelines are up to date" in sh("dvc", "repro", cwd=own_project).stdout
