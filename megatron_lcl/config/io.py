"""YAML + `a.b=c` overrides -> a typed `LCLConfig`, and back to YAML for the run directory.

    cfg = load_config("examples/configs/tiny_cpu.yaml", ["optimizer.lr=1e-3", "model.vision.preset=B/16"])

Every key is checked against the dataclass fields (unknown keys name the closest field), every value
against the field's type ("optimizer.lr: expected a float, got 'fast' (str)"). A section's `preset`
(model.vision, model.lm) fills that section's sizes first; keys given explicitly then win.
"""

import dataclasses
import difflib
import typing
from typing import Any, List, Optional, Sequence

import yaml

from megatron_lcl.config.model import LM_PRESETS, VISION_PRESETS, LMConfig, VisionConfig, apply_preset
from megatron_lcl.config.run import LCLConfig
from megatron_lcl.config.validate import ConfigError

PRESETS = {VisionConfig: VISION_PRESETS, LMConfig: LM_PRESETS}


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> LCLConfig:
    """The run config from a YAML file (optional) with `a.b=c` overrides applied on top."""
    raw = {}
    if path is not None:
        raw = _read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return config_from_dict(raw)


def _read_yaml(path: str):
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None


def _yaml_problem(e: "yaml.YAMLError") -> str:
    """One line for a YAML error: where (line/column, 1-based) and what."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return where + problem + (f" ({context})" if context else "")


def apply_override(raw: dict, item: str) -> None:
    """`a.b.c=value` -> raw["a"]["b"]["c"] = value, the value parsed as YAML (`null`, `true`, `[1, 2]`)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}); quote "
                          "a string that is meant literally") from None


def from_dict(cls, raw: Any, where: str):
    """Build dataclass `cls` from a (nested) dict, checking keys and types; `where` is the dotted path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {raw!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        hints = {k: difflib.get_close_matches(k, names, n=1) for k in unknown}
        raise ConfigError("; ".join(
            f"unknown key {_join(where, k)!r}" + (f" (did you mean {_join(where, hints[k][0])!r}?)"
                                                  if hints[k] else f" ({where or 'config'} has: {', '.join(names)})")
            for k in unknown))
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(hints[k], v, _join(where, k)) for k, v in raw.items()}
    obj = cls()
    if cls in PRESETS and values.get("preset") is not None:
        try:
            obj = apply_preset(cls(preset=values["preset"]), PRESETS[cls])
        except ValueError as e:
            raise ConfigError(f"{_join(where, 'preset')}: {e}") from None
    return dataclasses.replace(obj, **values)


def _coerce(tp, value, where: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin in (list, tuple, List):
        if isinstance(value, str):  # one item may be given without brackets
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r} ({type(value).__name__})")
        return list(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads 3e-4 as a string
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        return value
    raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _type_name(tp) -> str:
    return {bool: "true or false", int: "an integer", float: "a float", str: "a string"}.get(tp, str(tp))


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def section_to_dict(section) -> dict:
    """Dataclass -> plain dict (nested), for YAML dumps and checkpoints."""
    out = {}
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        out[f.name] = section_to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def config_from_dict(raw: dict) -> LCLConfig:
    """The inverse of `section_to_dict(cfg)` (e.g. the config a checkpoint's meta.json holds)."""
    return from_dict(LCLConfig, raw, "")


def config_to_yaml(cfg: LCLConfig) -> str:
    return yaml.safe_dump(section_to_dict(cfg), sort_keys=False)


def save_config(cfg: LCLConfig, path: str) -> None:
    """Write the resolved config (every field, presets applied); loading it gives back `cfg`."""
    with open(path, "w") as f:
        f.write("# resolved configuration of this run (megatron_lcl.config)\n")
        f.write(config_to_yaml(cfg))
