"""Loading a config: a YAML file or a shipped preset, then dotted overrides,
every value coerced to its field's type; and writing the resolved config back."""
from __future__ import annotations

import importlib.resources
import os
import typing
import warnings
from dataclasses import asdict
from pathlib import Path

import yaml

from megalite.config.blend import split_blend_string
from megalite.config.fields import coerce, describe_type, did_you_mean, field_types, section_types, takes_text
from megalite.config.sections import Config, ConfigError, ConfigWarning


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
            raise ConfigError(f"unknown preset {name_or_path!r}{did_you_mean(name_or_path, presets)}; "
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


def _set_field(cfg: Config, section: str, key: str, value, source: str, parsed: bool = True) -> None:
    """Assign cfg.section.key = value after checking the names and coercing the type.

    `parsed` False means `value` is raw override text: str and list fields take it
    literally (so '1:30' or 'yes' stay strings), the rest go through YAML.
    """
    sections = section_types()
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}{did_you_mean(section, sections)}; "
                          f"sections: {', '.join(sections)}")
    hints = field_types(section)
    if key not in hints:
        raise ConfigError(f"{source}: unknown key {section}.{key}{did_you_mean(key, hints)}; "
                          f"keys of {section}: {', '.join(hints)}")
    tp = hints[key]
    if not parsed:
        value = _parse_override_value(value, tp, f"{section}.{key}")
    value = coerce(value, tp, f"{section}.{key}")
    if (section, key) == ("data", "path"):
        value = split_blend_string(value)
    setattr(getattr(cfg, section), key, value)


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
    if takes_text(base):
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        return text[1:-1] if quoted else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}={raw!r} must be {describe_type(tp)}") from None


def load_config(name_or_path: str, overrides: typing.Iterable[str] = ()) -> Config:
    """Config from a YAML file or shipped preset, then `section.key=value` overrides.

    Sections and keys missing from the YAML keep their defaults. Override values:
    str fields take the text literally (quotes stripped); list fields split on
    commas, with or without brackets (`data.path=[a,b]`, `data.path=0.3,A,0.7,B`,
    `data.path=[]`; data.path also takes Megatron's `'0.3 A 0.7 B'`, see
    config.blend.split_blend_string); `null` sets an optional field to None; everything
    else is parsed as YAML (`train.steps=100`, `optim.lr=3e-4`, `model.bias=true`) and
    checked against the field's type. All unknown names and type errors are
    reported together. A preset's schedule follows a shorter run (see
    `follow_the_run`). The result is not validated: call `validate`.
    """
    data, label = _read_source(str(name_or_path))
    cfg, errors = Config(), []
    preset = label.startswith("preset ")
    written = set() if preset else _keys_of(data)
    for section, values in data.items():
        pairs = _flattened(section, values) if isinstance(values, dict) else values
        pairs = pairs.items() if isinstance(pairs, dict) else []
        if section in section_types() and not isinstance(values, (dict, type(None))):
            errors.append(f"{label}: section {section!r} must be a mapping of keys, got {values!r}")
        elif section not in section_types():
            pairs = [(None, None)]  # reported by _set_field with a did-you-mean
        for key, value in pairs:
            try:
                _set_field(cfg, str(section), str(key), value, label)
            except ConfigError as e:
                errors.append(str(e) if str(e).startswith(label) else f"{label}: {e}")
    for text in overrides:
        dotted, eq, raw = str(text).partition("=")
        parts = dotted.strip().split(".")
        if len(parts) == 3 and tuple(parts[:2]) in NESTED:  # model.moe.top_k is model.moe_top_k
            parts = [parts[0], f"{parts[1]}_{parts[2]}"]
        try:
            if not eq or len(parts) != 2 or not all(parts):
                raise ConfigError(f"override {text!r} must look like section.key=value, e.g. train.steps=100")
            _set_field(cfg, parts[0], parts[1], raw, f"override {text!r}", parsed=False)
            written.add(".".join(parts))
        except ConfigError as e:
            errors.append(str(e) if str(e).startswith("override") else f"override {text!r}: {e}")
    if errors:
        raise ConfigError("\n".join(errors))
    return follow_the_run(cfg, written, {key: label for key in _keys_of(data)} if preset else {})


# (section, group): a YAML mapping `group:` in the section, or a dotted key section.group.name, is the
# field section.group_name (Megatron-Core's and torchtitan's nesting of MoE settings, and of ours)
NESTED = {("model", "moe"), ("train", "stability")}


def _flattened(section: str, values: dict) -> dict:
    """A YAML section with its nested mappings (NESTED) as flat group_* keys."""
    out = dict(values)
    for outer, group in NESTED:
        if outer == section and isinstance(values.get(group), dict):
            del out[group]
            out.update({f"{group}_{k}": v for k, v in values[group].items()})
    return out


def _keys_of(data: dict) -> set[str]:
    return {f"{section}.{key}" for section, values in data.items() if isinstance(values, dict)
            for key in _flattened(section, values)}


def follow_the_run(cfg: Config, written: set[str], origins: dict[str, str]) -> Config:
    """Adjust schedule values the user did not write to the run the user did write, with a warning.

    A preset plans its own run (tiny: 300 steps, 20 of warmup); `megalite train tiny train.steps=10`
    is a shorter one, not a contradiction, so the warmup shrinks to fit it, as a learning rate the
    user lowered below the preset's floor takes the floor down with it. Only values the user wrote
    (overrides, or keys of their own YAML file) are left alone; their contradictions stay errors.
    `origins` names where the other values came from (a preset), for the warning; else the default.
    """
    o, t = cfg.optim, cfg.train
    adjust = []
    if o.warmup_steps > t.steps and "optim.warmup_steps" not in written:
        adjust.append(("optim.warmup_steps", o.warmup_steps, t.steps, f"train.steps={t.steps}"))
        o.warmup_steps = t.steps
    if o.min_lr > o.lr and "optim.min_lr" not in written:
        adjust.append(("optim.min_lr", o.min_lr, o.lr, f"optim.lr={o.lr}"))
        o.min_lr = o.lr
    for key, old, new, why in adjust:
        source = origins.get(key, "the defaults")
        warnings.warn(ConfigWarning(f"{key}={old} from {source} exceeds {why}: using {key}={new} (set {key} to "
                                    "choose another)"), stacklevel=3)
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
