"""YAML configs read into typed dataclasses.

Every section of a config file is a dataclass; `load_config(path, Schema, overrides)` builds it,
applies dotted `key=value` overrides from the command line and rejects anything it does not
know. An error names the offending key and the file, so a typo never silently becomes a default.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit its schema."""


def load_config(path: str | Path, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read the YAML file at `path` into the dataclass `schema`.

    `overrides` are strings `a.b.c=value`; the value is parsed as YAML (`lr=1e-4`, `ch_mult=[1,2]`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item, source=str(path))
    return from_dict(schema, raw, source=str(path))


def apply_override(raw: dict, item: str, source: str = "command line") -> None:
    """Set `a.b.c=value` in the nested dict `raw` (value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{item}': '{part}' is not a section in {source}")
    node[parts[-1]] = yaml.safe_load(value)


def from_dict(schema: type[T], raw: Any, source: str = "config", prefix: str = "") -> T:
    """Build dataclass `schema` from a nested dict, checking keys and simple types."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{prefix or '<top>'}' must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"{source}: unknown config key '{where}' (known: {', '.join(fields)})")
    hints = typing.get_type_hints(schema)
    values = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name in raw:
            values[name] = _convert(hints[name], raw[name], source, dotted)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: missing required config key '{dotted}'")
    return schema(**values)


def to_dict(config: Any) -> dict:
    """The plain-dict form of a config dataclass (for saving next to a checkpoint)."""
    return dataclasses.asdict(config)


def _convert(hint: Any, value: Any, source: str, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, source, dotted)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, source, dotted)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{dotted}' must be a list, got {value!r}")
        item = args[0] if args else Any
        converted = [_convert(item, v, source, f"{dotted}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{dotted}' must be a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{dotted}' must be one of {list(args)}, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: '{dotted}' must be {hint.__name__}, got {value!r}")
    return value
