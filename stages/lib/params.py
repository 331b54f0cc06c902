"""params.yaml as typed, validated sections (pydantic). Values live only in params.yaml; each
setting is declared once, here, with its type and allowed range, and the stages, tasks and
augmentations take these typed sections. A bad value stops with one line naming key, value and rule.

Usage: p = params.load("params.yaml", "seed", "model", "pretrain"); p.pretrain.lr
       p = params.load("params.yaml", "model", "finetune.seeds")  # one key of a section: p.finetune.seeds only
"""
import difflib
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, model_validator

from stages.lib.cli import UserError


class Rule:
    """One check with the words a user reads when it fails ("must be ...")."""

    def __init__(self, check, text, convert=None):
        self.check, self.text, self.convert = check, text, convert

    def __call__(self, value):
        if not self.check(value):
            raise ValueError(self.text)
        return self.convert(value) if self.convert else value


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _passes(rule, value):
    try:
        rule(value)
        return True
    except ValueError:
        return False


def _typed(kind, rule):
    """A field type: `kind` for readers, checked by `rule` before pydantic sees the value."""
    return Annotated[kind, BeforeValidator(rule)]


def _at_least(low):
    return Rule(lambda v: _is_int(v) and v >= low, f"must be an integer >= {low}")


def Integer(low):  # noqa: N802 - a type
    return _typed(int, _at_least(low))


def Between(low, high):  # noqa: N802
    return _typed(float, Rule(lambda v: _is_number(v) and low <= v <= high, f"must be a number in [{low}, {high}]"))


def Choice(*options):  # noqa: N802
    return _typed(Literal[options], Rule(lambda v: v in options, f"must be one of {', '.join(map(str, options))}"))


def _optional(rule):
    return Rule(lambda v: v is None or _passes(rule, v), f"must be null or {rule.text.removeprefix('must be ')}")


def _distinct_list(item):
    """A value or a non-empty list of distinct values passing `item`; always a list."""
    items = lambda v: v if isinstance(v, list) else [v]  # noqa: E731
    return Rule(lambda v: bool(items(v)) and all(_passes(item, x) for x in items(v))
                and len(set(items(v))) == len(items(v)),
                f"must be {item.text.removeprefix('must be ')}, or a non-empty list of distinct such values", items)


_FRACTION = Rule(lambda v: _is_number(v) and 0 < v <= 1, "must be a number in (0, 1]")
Positive = _typed(float, Rule(lambda v: _is_number(v) and v > 0, "must be a number > 0"))
NonNegative = _typed(float, Rule(lambda v: _is_number(v) and v >= 0, "must be a number >= 0"))
Probability = Between(0, 1)
OpenUnit = _typed(float, Rule(lambda v: _is_number(v) and 0 < v < 1, "must be a number in (0, 1)"))
UnitFraction = _typed(float, _FRACTION)
Flag = _typed(bool, Rule(lambda v: isinstance(v, bool), "must be true or false"))
Text = _typed(str, Rule(lambda v: isinstance(v, str) and v.strip() != "", "must be a non-empty string"))
Fractions = _typed(list[float], _distinct_list(_FRACTION))
Seeds = _typed(list[int], _distinct_list(_at_least(0)))
MODES = ("baseline", "ssl", "linear")
Modes = _typed(list[str], Rule(lambda v: isinstance(v, list) and bool(v) and all(x in MODES for x in v)
                               and len(set(v)) == len(v),
                               f"must be a non-empty list of distinct names from: {', '.join(MODES)}"))


class Section(BaseModel):
    """A params section: its keys exactly, each typed and checked; read-only."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    source: Text
    image_size: Integer(8)
    test_fraction: OpenUnit
    limit: _typed(Optional[int], _optional(_at_least(10)))
    val_size: Integer(10)


class ModelParams(Section):
    arch: Choice("resnet18", "resnet34")
    width: Integer(4)
    standard_stem_from: Integer(8)


class SimCLRAugmentParams(Section):
    """SimCLR's views, drawn as torchvision's transforms draw them (stages.lib.augment.SimCLRAugment)."""

    crop_scale_min: OpenUnit
    crop_ratio_max: Between(1, 10)
    flip_p: Probability
    jitter_p: Probability
    brightness: Between(0, 1)
    contrast: Between(0, 1)
    saturation: Between(0, 1)
    hue: Between(0, 0.5)
    grayscale_p: Probability
    blur_p: Probability
    blur_from: Integer(1)
    blur_sigma_min: Positive
    blur_sigma_max: Positive

    @model_validator(mode="after")
    def _sigma_range(self):
        if self.blur_sigma_min > self.blur_sigma_max:
            raise ValueError(f"blur_sigma_min = {self.blur_sigma_min}: must not exceed blur_sigma_max = "
                             f"{self.blur_sigma_max}")
        return self


class PretrainParams(Section):
    method: Choice("simclr")
    epochs: Integer(1)
    batch_size: Integer(2)
    optimizer: Choice("sgd", "lars")
    lr: Positive
    momentum: Between(0, 0.999)
    weight_decay: NonNegative
    warmup_epochs: Integer(0)
    temperature: Positive
    proj_hidden: Integer(1)
    proj_dim: Integer(1)
    knn_every: Integer(1)
    knn_k: Integer(1)
    knn_temperature: Positive
    checkpoint_seconds: NonNegative
    compile: Flag
    sync_batchnorm: Flag
    augment: SimCLRAugmentParams


class SupervisedAugmentParams(Section):
    """Fine-tuning's augmentation (stages.lib.augment.SupervisedAugment)."""

    crop_padding: Integer(0)
    flip_p: Probability


class FinetuneParams(Section):
    modes: Modes
    seeds: Seeds
    max_epochs: Integer(1)
    batch_size: Integer(1)
    lr: Positive
    backbone_lr_scale: UnitFraction
    head_epochs: Integer(0)
    momentum: Between(0, 0.999)
    weight_decay: NonNegative
    warmup_epochs: Integer(0)
    label_smoothing: Between(0, 0.99)
    equal_steps: Flag
    checkpoint_seconds: NonNegative
    compile: Flag
    sync_batchnorm: Flag
    augment: SupervisedAugmentParams

    @model_validator(mode="after")
    def _backbone_trains(self):
        if self.head_epochs >= self.max_epochs:
            raise ValueError(f"head_epochs = {self.head_epochs}: must be below finetune.max_epochs = "
                             f"{self.max_epochs} (the backbone would never train)")
        return self


class EvaluateParams(Section):
    convergence_tolerance: NonNegative
    bootstrap_samples: Integer(100)
    confidence: OpenUnit


class Params(Section):
    """The params a stage loaded, as dvc.yaml names them: the other sections stay None, and a section
    named by single keys holds only those keys (reading another raises AttributeError)."""

    seed: Optional[Integer(0)] = None
    fraction: Optional[Fractions] = None
    launch: Optional[Text] = None
    data: Optional[DataParams] = None
    model: Optional[ModelParams] = None
    pretrain: Optional[PretrainParams] = None
    finetune: Optional[FinetuneParams] = None
    evaluate: Optional[EvaluateParams] = None

    def as_dict(self):
        """The params the stage loaded (whole sections, or only the keys named as section.key) as plain
        data, as dvc.yaml lists them (for MLflow, fingerprints and weights files)."""
        return self.model_dump(exclude_unset=True)


SECTIONS = tuple(Params.model_fields)


def load(path, *names: str) -> Params:
    """The named params of params file `path`, typed and validated, as `Params`: top-level sections
    ("model"), or single keys of one ("finetune.seeds": its whole section is checked, but the stage
    sees, and `as_dict` gives, only the named keys, which are what dvc.yaml lists for the stage; a
    section also named whole stays whole). A name that is no section, or no key of one, stops here.

    Every top-level key is checked for typos (each stage reports one); the named sections are
    checked key by key, and nested sections likewise.
    """
    for name in names:
        _check_name(name)
    path = Path(path)
    raw = _read(path)
    _check_keys(path, "", raw, Params, required=False)
    chosen, singles = {}, {}
    for name in names:
        section, dot, key = name.partition(".")
        if dot and section not in names:  # a section also named whole stays whole
            singles.setdefault(section, []).append(key)  # {section: its singly named keys}
        if section in chosen:
            continue
        if section not in raw:
            raise UserError(f"{path}: {section} is missing ({_expected(Params, section)})")
        if raw[section] is None:  # Params' None means "not loaded", never a value
            rule = _expected(Params, section)
            raise UserError(f"{path}: {section} = None: {rule if rule.startswith('must') else 'must be ' + rule}")
        _check_value(path, section, raw[section], Params, section)
        chosen[section] = raw[section]
    try:
        loaded = Params.model_validate(chosen)
    except ValidationError as error:
        raise UserError(_first_error(path, error, chosen)) from None
    narrowed = {}  # each section named only by single keys, as a copy holding only those keys
    for section, keys in singles.items():
        whole = getattr(loaded, section)
        narrowed[section] = type(whole).model_construct(**{key: getattr(whole, key) for key in keys})
    return loaded.model_copy(update=narrowed)


def _check_name(name):
    """A name a stage loads: a section of Params ("model") or one key of a section ("finetune.seeds")."""
    if name not in NAMES:
        raise UserError(f"params.load: {name} is no section of params.yaml nor a key of one"
                        f"{_did_you_mean(name, NAMES, '')}")


def _did_you_mean(key, known, prefix):
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _section_type(model, name):
    """The Section class of field `name` of `model`, or None for a plain value."""
    kind = model.model_fields[name].annotation
    for candidate in (kind, *getattr(kind, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, Section):
            return candidate
    return None


# What params.load takes: a section's name, or a section's name and one of its keys.
NAMES = (*SECTIONS, *(f"{section}.{key}" for section in SECTIONS
                      for key in getattr(_section_type(Params, section), "model_fields", ())))


def _expected(model, name):
    section = _section_type(model, name)
    if section is not None:
        return f"a section with keys {', '.join(section.model_fields)}"
    for meta in model.model_fields[name].metadata:
        if isinstance(meta, BeforeValidator):
            return meta.func.text
    kind = model.model_fields[name].annotation
    return next(m.func.text for m in kind.__args__[0].__metadata__ if isinstance(m, BeforeValidator))


def _check_keys(path, prefix, mapping, model, required=True):
    """Unknown keys (with the closest known one) and, when required, missing keys of one section."""
    fields = list(model.model_fields)
    unknown = sorted(str(key) for key in mapping if key not in fields)
    if unknown:
        hint = _did_you_mean(unknown[0], fields, prefix)
        raise UserError(f"{path}: {prefix}{unknown[0]}: unknown key{hint} (allowed: {', '.join(fields)})")
    for name in fields if required else ():
        if name not in mapping:
            raise UserError(f"{path}: {prefix}{name} is missing ({_expected(model, name)})")
        _check_value(path, f"{prefix}{name}", mapping[name], model, name)


def _check_value(path, key, value, model, name):
    section = _section_type(model, name)
    if section is None:
        return
    if not isinstance(value, dict):
        raise UserError(f"{path}: {key} = {value!r}: must be {_expected(model, name)}")
    _check_keys(path, f"{key}.", value, section)


def _first_error(path, error, raw):
    """One line for pydantic's first complaint: 'path: key = value: rule'."""
    first = error.errors()[0]
    loc = [str(part) for part in first["loc"] if not str(part).startswith("function-")]
    message = first["msg"].removeprefix("Value error, ")
    node = raw
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict):  # a check across a section's keys: its message starts with the key
        return f"{path}: {'.'.join(loc)}.{message}"
    return f"{path}: {'.'.join(loc)} = {node!r}: {message}"


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads 1e-3 as a number, as YAML 1.2 and DVC do (PyYAML alone reads text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def _read(path):
    if not path.is_file():
        raise UserError(f"params file not found: {path}")
    try:
        raw: Any = yaml.load(path.read_bytes(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML: {error.problem or error.context}{where}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if raw is None:
        raise UserError(f"{path} is empty; it must hold the sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of the sections {', '.join(SECTIONS)}, not a {type(raw).__name__}")
    return raw
