"""Bad params: type and range of every key, unknown and missing keys, broken files; each named in one line."""

import pydantic
import pytest

from stages.lib import params
from stages.lib.cli import UserError
from tests.conftest import write_params
from tests.faults import (
    TINY, deleter, edited_params, renamer, setter,
)


# ---------------------------------------------------------------------------------------------
# 1. Params: type and range of every key, unknown and missing keys, broken files


PARAM_CASES = [
    ("fraction-zero", setter("fraction", 0), ["fraction = 0", "(0, 1]"]),
    ("fraction-above-one", setter("fraction", [1.0, 1.5]), ["fraction = [1.0, 1.5]", "(0, 1]"]),
    ("fraction-repeated", setter("fraction", [0.5, 0.5]), ["fraction", "distinct"]),
    ("fraction-empty", setter("fraction", []), ["fraction = []", "non-empty"]),
    ("seed-negative", setter("seed", -1), ["seed = -1", ">= 0"]),
    ("seed-bool", setter("seed", True), ["seed = True", "integer"]),
    ("val-size-text", setter("data.val_size", "5000"), ["data.val_size = '5000'", "integer"]),
    ("limit-tiny", setter("data.limit", 3), ["data.limit = 3", "null or"]),
    ("source-empty", setter("data.source", ""), ["data.source = ''", "non-empty"]),
    ("arch-unknown", setter("model.arch", "resnet50"), ["model.arch = 'resnet50'", "resnet18, resnet34"]),
    ("width-float", setter("model.width", 6.5), ["model.width = 6.5", "integer >= 4"]),
    ("epochs-zero", setter("pretrain.epochs", 0), ["pretrain.epochs = 0", ">= 1"]),
    ("batch-one", setter("pretrain.batch_size", 1), ["pretrain.batch_size = 1", ">= 2"]),
    ("temperature-zero", setter("pretrain.temperature", 0.0), ["pretrain.temperature = 0.0", "> 0"]),
    ("temperature-nan", setter("pretrain.temperature", float("nan")), ["pretrain.temperature = nan", "> 0"]),
    ("lr-negative", setter("pretrain.lr", -0.1), ["pretrain.lr = -0.1", "> 0"]),
    ("optimizer-unknown", setter("pretrain.optimizer", "adam"), ["pretrain.optimizer = 'adam'", "sgd, lars"]),
    ("flip-p-above-one", setter("pretrain.augment.flip_p", 1.5), ["pretrain.augment.flip_p = 1.5", "[0, 1]"]),
    ("grayscale-p-negative", setter("pretrain.augment.grayscale_p", -0.2),
     ["pretrain.augment.grayscale_p = -0.2", "[0, 1]"]),
    ("crop-scale-one", setter("pretrain.augment.crop_scale_min", 1.0),
     ["pretrain.augment.crop_scale_min = 1.0", "(0, 1)"]),
    ("compile-text", setter("pretrain.compile", "maybe"), ["pretrain.compile = 'maybe'", "true or false"]),
    ("backbone-scale-zero", setter("finetune.backbone_lr_scale", 0), ["finetune.backbone_lr_scale = 0", "(0, 1]"]),
    ("max-epochs-text", setter("finetune.max_epochs", "ten"), ["finetune.max_epochs = 'ten'", ">= 1"]),
    ("mode-unknown", setter("finetune.modes", ["ssl", "sll"]), ["finetune.modes = ['ssl', 'sll']", "baseline, ssl"]),
    ("seeds-negative", setter("finetune.seeds", [0, -1]), ["finetune.seeds = [0, -1]", ">= 0"]),
    ("blur-sigmas-reversed", setter("pretrain.augment.blur_sigma_min", 3.0),
     ["pretrain.augment.blur_sigma_min = 3.0", "must not exceed blur_sigma_max = 2.0"]),
    ("augment-key-typo", lambda raw: raw["pretrain"]["augment"].update(hu=raw["pretrain"]["augment"].pop("hue")),
     ["pretrain.augment.hu: unknown key", "did you mean pretrain.augment.hue?"]),
    ("augment-not-mapping", setter("finetune.augment", [4, 0.5]), ["finetune.augment = [4, 0.5]", "crop_padding"]),
    ("head-epochs-all", setter("finetune.head_epochs", 2),
     ["finetune.head_epochs = 2", "must be below finetune.max_epochs = 2"]),
    ("image-size-tiny", setter("data.image_size", 4), ["data.image_size = 4", ">= 8"]),
    ("test-fraction-one", setter("data.test_fraction", 1.0), ["data.test_fraction = 1.0", "(0, 1)"]),
    ("method-unknown", setter("pretrain.method", "byol"), ["pretrain.method = 'byol'", "simclr"]),
    ("confidence-one", setter("evaluate.confidence", 1.0), ["evaluate.confidence = 1.0", "(0, 1)"]),
    ("seed-empty", setter("seed", None), ["seed = None", "must be an integer >= 0"]),
    ("section-empty", setter("evaluate", None), ["evaluate = None", "must be a section with keys convergence"]),
    ("section-typo", renamer("fraction", "fractions"), ["fractions: unknown key", "did you mean fraction?"]),
    ("top-level-extra", setter("learning_rate", 0.1), ["learning_rate: unknown key", "allowed: seed"]),
    ("key-typo", lambda raw: raw["pretrain"].update(epoch=raw["pretrain"].pop("epochs")),
     ["pretrain.epoch: unknown key", "did you mean pretrain.epochs?"]),
    ("key-missing", deleter("pretrain.temperature"), ["pretrain.temperature is missing", "> 0"]),
    ("section-missing", deleter("model"), ["model is missing", "a section with keys arch, width"]),
    ("section-not-mapping", setter("pretrain", 5), ["pretrain = 5", "a section with keys method, epochs"]),
]


@pytest.mark.parametrize("edit, culprits", [case[1:] for case in PARAM_CASES], ids=[c[0] for c in PARAM_CASES])
def test_bad_params_are_named(tmp_path, edit, culprits):
    path = edited_params(tmp_path / "params.yaml", edit)
    with pytest.raises(UserError) as error:
        params.load(path, *params.SECTIONS)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for culprit in culprits:
        assert culprit in message


BROKEN_FILES = [
    ("empty", "", ["is empty", "seed, fraction"]),
    ("comments-only", "# nothing here\n", ["is empty"]),
    ("a-list", "- seed\n- fraction\n", ["mapping", "not a list"]),
    ("a-string", "just some text\n", ["mapping", "not a str"]),
    ("bad-yaml", "seed: 0\nfraction: [1.0, 0.5\n", ["not valid YAML", "line 3"]),
    ("bad-indent", "seed: 0\n  fraction: 1.0\n", ["not valid YAML", "line 2"]),
    ("not-utf8", b"seed: \xff\xfe\x00\n", ["not valid YAML"]),
]


@pytest.mark.parametrize("content, culprits", [c[1:] for c in BROKEN_FILES], ids=[c[0] for c in BROKEN_FILES])
def test_broken_params_file_is_named(tmp_path, content, culprits):
    path = tmp_path / "params.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as error:
        params.load(path, "seed")
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    for culprit in culprits:
        assert culprit in str(error.value)


def test_missing_params_file_is_named(tmp_path):
    with pytest.raises(UserError, match="params file not found: .*nowhere.yaml"):
        params.load(tmp_path / "nowhere.yaml", "seed")


def test_exponent_without_dot_is_a_number(tmp_path):
    """YAML 1.2 (and DVC's -S) read 1e-3 as a number; PyYAML alone would read text."""
    path = write_params(tmp_path / "params.yaml", **TINY)
    path.write_text(path.read_text().replace("  lr: 0.24", "  lr: 1e-3").replace("  lr: 0.1", "  lr: 2E-2"))
    p = params.load(path, "pretrain", "finetune")
    assert p.pretrain.lr == 0.001 and p.finetune.lr == 0.02


def test_sections_are_typed_and_only_the_loaded_ones_are_set(tmp_path):
    p = params.load(write_params(tmp_path / "params.yaml", **TINY), "seed", "pretrain")
    assert isinstance(p.pretrain, params.PretrainParams) and isinstance(p.pretrain.augment, params.SimCLRAugmentParams)
    assert p.model is None and set(p.as_dict()) == {"seed", "pretrain"}
    with pytest.raises(pydantic.ValidationError, match="frozen"):
        p.pretrain.lr = 1.0


def test_a_single_key_loads_its_whole_section_but_gives_only_itself(tmp_path):
    path = write_params(tmp_path / "params.yaml", **TINY)
    p = params.load(path, "model", "finetune.seeds")
    assert isinstance(p.finetune, params.FinetuneParams)  # a FinetuneParams holding only the named key
    assert p.as_dict() == {"model": p.model.model_dump(), "finetune": {"seeds": p.finetune.seeds}}
    with pytest.raises(AttributeError):  # a key dvc.yaml does not list for the stage cannot be read
        p.finetune.lr
    assert params.load(path, "finetune", "finetune.seeds").finetune.lr > 0  # named whole too: stays whole
    with pytest.raises(UserError, match="finetune.lr = -1"):  # a bad key beside the named one still stops
        params.load(edited_params(tmp_path / "bad.yaml", setter("finetune.lr", -1)), "finetune.seeds")


BAD_NAMES = [
    ("finetune.seedz", ["did you mean finetune.seeds?"]),
    ("seed.x", []),
    ("pretrain.augment.blur_p", ["did you mean pretrain.augment?"]),  # a nested section is loaded whole
    ("finetune.", []),
    ("sed", ["did you mean seed?"]),
]


@pytest.mark.parametrize("name, culprits", BAD_NAMES, ids=[c[0] for c in BAD_NAMES])
def test_a_name_that_is_no_section_or_key_stops_in_load(tmp_path, name, culprits):
    with pytest.raises(UserError) as error:
        params.load(write_params(tmp_path / "params.yaml", **TINY), "model", name)
    assert "\n" not in str(error.value)
    for culprit in [f"{name} is no section of params.yaml nor a key of one", *culprits]:
        assert culprit in str(error.value)
