"""Read and validate params.yaml. Values live only in params.yaml; this module knows
each key's type and allowed range, and fails with one line naming key, value and rule.

Usage: p = params.load("params.yaml", "seed", "model", "pretrain")
"""
import difflib
import math
import re
from pathlib import Path

import yaml

from stages.lib.cli import UserError


class _Rule:
    def __init__(self, check, text):
        self.check, self.text = check, text

    def __call__(self, value):
        if not self.check(value):
            raise ValueError(self.text)
        return value


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def integer(low):
    return _Rule(lambda v: _is_int(v) and v >= low, f"must be an integer >= {low}")


def positive():
    return _Rule(lambda v: _is_number(v) and v > 0, "must be a number > 0")


def non_negative():
    return _Rule(lambda v: _is_number(v) and v >= 0, "must be a number >= 0")


def probability():
    return _Rule(lambda v: _is_number(v) and 0 <= v <= 1, "must be a number in [0, 1]")


def between(low, high):
    return _Rule(lambda v: _is_number(v) and low <= v <= high, f"must be a number in [{low}, {high}]")


def open_unit():
    return _Rule(lambda v: _is_number(v) and 0 < v < 1, "must be a number in (0, 1)")


def boolean():
    return _Rule(lambda v: isinstance(v, bool), "must be true or false")


def choice(*options):
    return _Rule(lambda v: v in options, f"must be one of {', '.join(map(str, options))}")


def text():
    return _Rule(lambda v: isinstance(v, str) and v.strip() != "", "must be a non-empty string")


def optional(rule):
    return _Rule(lambda v: v is None or _passes(rule, v), f"must be null or {rule.text.removeprefix('must be ')}")


def _passes(rule, value):
    try:
        rule(value)
        return True
    except ValueError:
        return False


def number_list(item_rule, what):
    """A number or a non-empty list of distinct numbers; always returned as a list."""

    def check(value):
        items = value if isinstance(value, list) else [value]
        return bool(items) and all(_passes(item_rule, v) for v in items) and len(set(items)) == len(items)

    rule = _Rule(check, f"must be {what}, or a non-empty list of distinct such values")
    return _Listify(rule)


class _Listify(_Rule):
    def __init__(self, rule):
        super().__init__(rule.check, rule.text)

    def __call__(self, value):
        super().__call__(value)
        return value if isinstance(value, list) else [value]


def name_list(*options):
    rule = _Rule(
        lambda v: isinstance(v, list) and bool(v) and all(x in options for x in v) and len(set(v)) == len(v),
        f"must be a non-empty list of distinct names from: {', '.join(options)}",
    )
    return rule


FRACTION = _Rule(lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")

SCHEMA = {
    "seed": integer(0),
    "fraction": number_list(FRACTION, "a number in (0, 1]"),
    "launch": text(),
    "data": {
        "source": text(),
        "limit": optional(integer(10)),
        "val_size": integer(10),
    },
    "model": {
        "arch": choice("resnet18", "resnet34"),
        "width": integer(4),
    },
    "pretrain": {
        "epochs": integer(1),
        "batch_size": integer(2),
        "optimizer": choice("sgd", "lars"),
        "lr": positive(),
        "momentum": between(0, 0.999),
        "weight_decay": non_negative(),
        "warmup_epochs": integer(0),
        "temperature": positive(),
        "proj_hidden": integer(1),
        "proj_dim": integer(1),
        "knn_every": integer(1),
        "knn_k": integer(1),
        "knn_temperature": positive(),
        "checkpoint_seconds": non_negative(),
        "compile": boolean(),
        "sync_batchnorm": boolean(),
        "crop_scale_min": open_unit(),
        "crop_ratio_max": between(1, 10),
        "flip_p": probability(),
        "jitter_p": probability(),
        "brightness": between(0, 1),
        "contrast": between(0, 1),
        "saturation": between(0, 1),
        "hue": between(0, 0.5),
        "grayscale_p": probability(),
    },
    "finetune": {
        "modes": name_list("baseline", "ssl", "linear"),
        "seeds": number_list(integer(0), "an integer >= 0"),
        "max_epochs": integer(1),
        "batch_size": integer(1),
        "lr": positive(),
        "backbone_lr_scale": _Rule(lambda v: _is_number(v) and 0 < v <= 1, "must be a number in (0, 1]"),
        "head_epochs": integer(0),
        "momentum": between(0, 0.999),
        "weight_decay": non_negative(),
        "warmup_epochs": integer(0),
        "label_smoothing": between(0, 0.99),
        "equal_steps": boolean(),
        "crop_padding": integer(0),
        "flip_p": probability(),
        "checkpoint_seconds": non_negative(),
        "compile": boolean(),
        "sync_batchnorm": boolean(),
    },
    "evaluate": {
        "convergence_tolerance": non_negative(),
        "bootstrap_samples": integer(100),
        "confidence": open_unit(),
    },
}


def load(path, *sections):
    """Return {section: validated value} for the named top-level keys of params file `path`.

    Every top-level key is checked against SCHEMA (a typo is reported by every stage);
    the named sections are validated key by key.
    """
    path = Path(path)
    raw = _read(path)
    _check_known(path, "", raw, SCHEMA)
    return {name: _validate(path, name, raw, SCHEMA[name]) for name in sections}


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads 1e-3 as a number, as YAML 1.2 and DVC do (PyYAML alone reads text)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"), list("-+0123456789.")
)


def _read(path):
    if not path.is_file():
        raise UserError(f"params file not found: {path}")
    try:
        raw = yaml.load(path.read_bytes(), Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML: {error.problem or error.context}{where}") from None
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
    if raw is None:
        raise UserError(f"{path} is empty; it must hold the sections {', '.join(SCHEMA)}")
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of the sections {', '.join(SCHEMA)}, not a {type(raw).__name__}")
    return raw


def _check_known(path, prefix, mapping, schema):
    unknown = sorted(str(key) for key in mapping if key not in schema)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(schema), n=1)
        hint = f"; did you mean {prefix}{close[0]}?" if close else ""
        raise UserError(f"{path}: {prefix}{unknown[0]}: unknown key{hint} (allowed: {', '.join(schema)})")


def _allowed(rule):
    return rule.text if isinstance(rule, _Rule) else f"a section with keys {', '.join(rule)}"


def _validate(path, key, parent, rule):
    if key not in parent:
        raise UserError(f"{path}: {key} is missing ({_allowed(rule)})")
    value = parent[key]
    if isinstance(rule, dict):
        return _validate_section(path, key, value, rule)
    try:
        return rule(value)
    except ValueError as error:
        raise UserError(f"{path}: {key} = {value!r}: {error}") from None


def _validate_section(path, name, value, schema):
    if not isinstance(value, dict):
        raise UserError(f"{path}: {name} = {value!r}: must be {_allowed(schema)}")
    _check_known(path, f"{name}.", value, schema)
    result = {}
    for key, rule in schema.items():
        if key not in value:
            raise UserError(f"{path}: {name}.{key} is missing ({_allowed(rule)})")
        try:
            result[key] = rule(value[key])
        except ValueError as error:
            raise UserError(f"{path}: {name}.{key} = {value[key]!r}: {error}") from None
    return result
