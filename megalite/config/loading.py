"""Loading a config: a YAML file or a shipped preset, then dotted overrides,
every value coerced to its field's type; and writing the resolved config back."""
from __future__ import annotations

import difflib
import importlib.resources
import os
import types
import typing
from dataclasses import asdict, fields
from pathlib import Path

import yaml

from megalite.config.sections import Config, ConfigError
from megalite.data.blend import is_number


def _section_types() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in fields(Config)}


def _did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def list_presets() -> list[str]:
    """Names of the presets shipped in megalite/configs (usable wherever a CONFIG is asked for)."""
    root = importlib.resources.files("megalite").joinpath("configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_source(name_or_path: str) -> tuple[dict, str]:
    """YAML text of a file path or a preset name, parsed to a dict; also a label for messages."""
    looks_like_path = name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path
    if looks_like_path or Path(name_or_path).is_file():
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; give a YAML path or a preset "
                              f"({', '.join(list_presets())})")
        text, label = path.read_text(encoding="utf-8"), str(path)
    else:
        presets = list_presets()
        if name_or_path not in presets:
            raise ConfigError(f"unknown preset {name_or_path!r}{_did_you_mean(name_or_path, presets)}; "
                              f"presets: {', '.join(presets)} (or give a YAML path)")
        res = importlib.resources.files("megalite").joinpath("configs", f"{name_or_path}.yaml")
        text, label = res.read_text(encoding="utf-8"), f"preset {name_or_path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{label}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: top level must be a mapping of sections (model:, train:, ...), "
                          f"got {type(data).__name__}")
    return data, label


def _type_name(tp) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return "a list of str"
    return {int: "an int", float: "a float", bool: "a bool (true/false)", str: "a str",
            type(None): "null"}.get(tp, str(tp))


def _coerce(value, tp, key: str):
    """`value` converted to field type `tp`, or ConfigError naming key, value and expected type.

    Lenient only where YAML is surprising: '1e-3' (a str to PyYAML) is a float,
    an integral number like 1e4 is an int, a number is accepted for a str field.
    """
    bad = ConfigError(f"{key}={value!r} must be {_type_name(tp)}")
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(typing.get_args(tp)):
            return None
        tp, origin = args[0], typing.get_origin(args[0])
    if origin is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or any(isinstance(v, (list, dict, type(None))) for v in value):
            raise bad
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
        return float(value)
    if tp is int and isinstance(value, (int, float)) and float(value).is_integer():
        return int(value)
    raise bad


def _set_field(cfg: Config, section: str, key: str, value, source: str, parsed: bool = True) -> None:
    """Assign cfg.section.key = value after checking the names and coercing the type.

    `parsed` False means `value` is raw override text: str and list fields take it
    literally (so '1:30' or 'yes' stay strings), the rest go through YAML.
    """
    sections = _section_types()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}{_did_you_mean(section, sections)}; "
                          f"sections: {', '.join(sections)}")
    hints = typing.get_type_hints(sections[section])
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}{_did_you_mean(key, hints)}; "
                          f"keys of {section}: {', '.join(hints)}")
    tp = hints[key]
    if not parsed:
        value = _parse_override_value(value, tp, f"{section}.{key}")
    value = _coerce(value, tp, f"{section}.{key}")
    if (section, key) == ("data", "path"):
        value = split_blend_string(value)
    setattr(getattr(cfg, section), key, value)


def split_blend_string(items: list[str]) -> list[str]:
    """Megatron's space-separated blend '0.3 A 0.7 B' (an item that starts with a weight) -> its parts.

    Items without whitespace, or whose first word is not a number (a prefix
    with a space in it, like 'my corpus/A'), are kept whole.
    """
    out: list[str] = []
    for item in items:
        words = item.split()
        out.extend(words if len(words) > 1 and is_number(words[0]) else [item])
    return out


def _parse_override_value(raw: str, tp, key: str):
    """Raw override text -> Python value. See load_config for the rules."""
    text = raw.strip()
    optional = type(None) in typing.get_args(tp)
    if optional and text in ("null", "~", "None"):
        return None
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if typing.get_origin(base) is list:
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [v.strip().strip("'\"") for v in text.split(",") if v.strip()]
    if base is str:
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return text[1:-1] if quoted else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}={raw!r} must be {_type_name(tp)}") from None


def load_config(name_or_path: str, overrides: typing.Iterable[str] = ()) -> Config:
    """Config from a YAML file or shipped preset, then `section.key=value` overrides.

    Sections and keys missing from the YAML keep their defaults. Override values:
    str fields take the text literally (quotes stripped); list fields split on
    commas, with or without brackets (`data.path=[a,b]`, `data.path=0.3,A,0.7,B`,
    `data.path=[]`; data.path also takes Megatron's `'0.3 A 0.7 B'`, see
    split_blend_string); `null` sets an optional field to None; everything else is
    parsed as YAML (`train.steps=100`, `optim.lr=3e-4`, `model.bias=true`) and
    checked against the field's type. All unknown names and type errors are
    reported together. The result is not validated: call `validate`.
    """
    data, label = _read_source(str(name_or_path))
    cfg, errors = Config(), []
    for section, values in data.items():
        pairs = values.items() if isinstance(values, dict) else []
        if section in _section_types() and not isinstance(values, (dict, type(None))):
            errors.append(f"{label}: section {section!r} must be a mapping of keys, got {values!r}")
        elif section not in _section_types():
            pairs = [(None, None)]  # reported by _set_field with a did-you-mean
        for key, value in pairs:
            try:
                _set_field(cfg, str(section), str(key), value, label)
            except ConfigError as e:
                errors.append(str(e) if str(e).startswith(label) else f"{label}: {e}")
    for text in overrides:
        dotted, eq, raw = str(text).partition("=")
        parts = dotted.strip().split(".")
        try:
            if not eq or len(parts) != 2 or not all(parts):
                raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.steps=100")
            _set_field(cfg, parts[0], parts[1], raw, f"override {text!r}", parsed=False)
        except ConfigError as e:
            errors.append(str(e) if str(e).startswith("override") else f"override {text!r}: {e}")
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg


def to_yaml(cfg: Config) -> str:
    """The whole resolved config as YAML; load_config(path of it) gives an equal Config."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False, default_flow_style=False)


def save_config(cfg: Config, path) -> None:
    """Write to_yaml(cfg) to `path` atomically (temp file, fsync, rename): never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(to_yaml(cfg))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
