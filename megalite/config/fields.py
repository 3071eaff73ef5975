"""The typed fields of the config: their sections, their types, their allowed values, and coercion.

A field's annotation in sections.py is the one statement of what it accepts: `int`, `float`,
`str`, `bool`, `list[str]`, `list[int]`, `X | None`, or a `Literal[...]` of choices. Loading coerces YAML and
override values through `coerce`; validation re-checks values set from code the same way; and
every other list of allowed values in the package comes from `choices`.
"""
from __future__ import annotations

import difflib
import math
import types
import typing
from dataclasses import fields
from functools import cache

from megalite.config.sections import Config, ConfigError


@cache
def section_types() -> dict[str, type]:
    """Section name -> its dataclass (model -> ModelConfig, ...), in Config's order."""
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


@cache
def field_types(section: str) -> dict[str, object]:
    """Key -> type annotation of every field of `section`."""
    return typing.get_type_hints(section_types()[section])


def choices(dotted: str) -> tuple:
    """The allowed values of a Literal field, e.g. choices('parallel.schedule') -> ('1f1b', ...)."""
    section, _, key = dotted.partition(".")
    tp = field_types(section).get(key) if section in section_types() else None
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    if len(args) != 1 or typing.get_origin(args[0]) is not typing.Literal:
        raise KeyError(f"{dotted} is not a config field with a fixed set of choices")
    return typing.get_args(args[0])


def all_choices() -> dict[str, tuple]:
    """'section.key' -> allowed values, for every Literal field."""
    out = {}
    for section in section_types():
        for key in field_types(section):
            try:
                out[f"{section}.{key}"] = choices(f"{section}.{key}")
            except KeyError:
                continue
    return out


def did_you_mean(word: str, options) -> str:
    """' (did you mean 'x'?)' for the closest of `options`, or '' when none is close."""
    close = difflib.get_close_matches(word, [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def describe_type(tp) -> str:
    """How an error message names what a field accepts ('an int', 'one of fp32, bf16, fp16', ...)."""
    if _is_union(tp):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is list:
        return f"a list of {typing.get_args(tp)[0].__name__}"
    return {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a str",
            type(None): "null"}.get(tp, str(tp))


def takes_text(tp) -> bool:
    """Whether override text for this field is taken literally (str, list and str-choice fields)."""
    args = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    base = args[0]
    if typing.get_origin(base) is typing.Literal:
        return all(isinstance(a, str) for a in typing.get_args(base))
    return base is str or typing.get_origin(base) is list


def coerce(value, tp, key: str):
    """`value` converted to field type `tp`, or ConfigError naming key, value and what is expected.

    Lenient only where YAML is surprising: '1e-3' (a str to PyYAML) is a float,
    an integral number like 1e4 is an int, a number is accepted for a str field.
    """
    expected = describe_type(tp)
    if _is_union(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        tp = args[0]
    if typing.get_origin(tp) is typing.Literal:
        return _coerce_choice(value, typing.get_args(tp), key)
    return _coerce_plain(value, tp, key, expected)


def _coerce_choice(value, allowed: tuple, key: str):
    value = _coerce_plain(value, type(allowed[0]), key, f"one of {', '.join(map(str, allowed))}")
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} must be one of {', '.join(map(str, allowed))}"
                          f"{did_you_mean(str(value), allowed)}")
    return value


def _coerce_plain(value, tp, key: str, expected: str | None = None):
    bad = ConfigError(f"{key}={value!r} must be {expected or describe_type(tp)}")
    if typing.get_origin(tp) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.strip().strip("[]").split(",") if v.strip()]
        if not isinstance(value, list) or any(isinstance(v, (list, dict, type(None))) for v in value):
            raise bad
        if typing.get_args(tp)[0] is int:  # each element as an int field's value ('32' and 32 alike)
            return [_coerce_plain(int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v, int, key,
                                  expected) for v in value]
        return [str(v) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if isinstance(value, bool):
        raise bad
    if tp is str:
        if isinstance(value, (str, int, float)):
            return str(value)
        raise bad
    if tp in (int, float) and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if tp is float and isinstance(value, (int, float)):
        if not math.isfinite(value):  # inf and nan pass every `> 0` rule and diverge at the first step
            raise ConfigError(f"{key}={value!r} must be a finite number; give a real value (inf and nan are not)")
        return float(value)
    if tp is int and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    raise bad
