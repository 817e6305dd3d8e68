"""YAML configs read into typed dataclasses.

Every section of a config file is a dataclass; `load_config(path, Schema, overrides)` builds it,
applies dotted `key=value` overrides from the command line and rejects anything it does not
know. An error names the offending key and the file, so a typo never silently becomes a default.
Every error is one ConfigError of one line (the command-line tools print it as it is).

Ranges are the dataclasses' own business: a config dataclass checks its values in `__post_init__`
and raises ValueError with a message starting with the field name (`max_steps must be >= 1, got 0`);
`check_range` and `at_least` below write such messages. `from_dict` turns that ValueError into a
ConfigError naming the file and the section (`configs/x.yaml: train: max_steps must be >= 1, got 0`),
so the same check serves a dataclass built in code and one read from a file.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from numbers import Real
from pathlib import Path
from typing import Any, TypeVar

import yaml
import yaml.reader

T = TypeVar("T")

# The project's own folder: a relative config path that is not found from the current folder is looked
# up here, so the shipped configs work from anywhere (`--config configs/ldm/emoji64.yaml` or `ldm/emoji64`).
PROJECT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """A config file or override that does not fit its schema."""


def load_config(path: str | Path, schema: type[T], overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read the YAML file at `path` into the dataclass `schema`.

    `overrides` are strings `a.b.c=value`; the value is parsed as YAML (`lr=1e-4`, `ch_mult=[1,2]`).
    """
    path = find_config(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_line(e, str(path), text)) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        apply_override(raw, item, source=str(path))
    return from_dict(schema, raw, source=str(path))


def find_config(path: str | Path) -> Path:
    """The config file `path` names: as given when it exists (or is absolute), else the same relative path
    in the project folder, else a shipped config by name (`ldm/emoji64` for configs/ldm/emoji64.yaml).
    A ConfigError lists where it looked."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [] if path.is_absolute() else [PROJECT / path, PROJECT / "configs" / path,
                                                 PROJECT / "configs" / f"{path}.yaml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise ConfigError(f"config {path} is a folder, not a YAML file")
    where = f" (nor in {PROJECT} or its configs/ folder)" if candidates else ""
    raise ConfigError(f"config file not found: {path}{where}")


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
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(yaml_error_line(e, f"override '{item}'", value)) from None


def yaml_error_line(error: yaml.YAMLError, source: str, text: str) -> str:
    """PyYAML's error in `text` as one line, `<source>:<line>:<column>: <problem>` (1-based, as editors
    count). PyYAML's own message spans several lines (the context, the position and an excerpt)."""
    if isinstance(error, yaml.reader.ReaderError):  # a character YAML refuses: an offset, not a mark
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        return f"{source}:{line}:{column}: character #x{error.character:04x}: {error.reason}"
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None)
    if mark is None or not problem:
        return f"{source}: not valid YAML: {' '.join(str(error).split())}"
    context = getattr(error, "context", None)
    context_mark = getattr(error, "context_mark", None)
    if context and context_mark is not None and context_mark.line != mark.line:
        problem = f"{problem} ({context} at line {context_mark.line + 1})"
    elif context:
        problem = f"{problem} ({context})"
    return f"{source}:{mark.line + 1}:{mark.column + 1}: {' '.join(problem.split())}"


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
    try:
        return schema(**values)
    except ValueError as e:  # a range check in __post_init__ (ConfigError too): name the file and section
        where = f"{source}: {prefix}:" if prefix else f"{source}:"
        raise ConfigError(f"{where} {' '.join(str(e).split())}") from None


def to_dict(config: Any) -> dict:
    """The plain-dict form of a config dataclass (for saving next to a checkpoint)."""
    return dataclasses.asdict(config)


def check_range(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True, finite: bool = True) -> None:
    """Raise ValueError unless `value` is a number within the bounds given (and finite, unless
    `finite=False`), naming the field, the range and the value:
    `ema_decay must be a finite number in [0, 1), got 1.0`. For `__post_init__` checks.
    """
    is_number = isinstance(value, Real) and not isinstance(value, bool)
    # Written as "not inside" so that NaN, which fails every comparison, is outside every range.
    inside = is_number and (not finite or math.isfinite(value)) and (
        low is None or (value >= low if low_inclusive else value > low)) and (
        high is None or (value <= high if high_inclusive else value < high))
    if not inside:
        bounds = _bounds(low, high, low_inclusive, high_inclusive)
        expected = ("a finite number" if finite else "a number") + (f" {bounds}" if bounds else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def at_least(name: str, value: Any, minimum: int) -> None:
    """Raise ValueError unless `value` is a number >= `minimum`: `batch_size must be >= 1, got 0`.
    For counts, sizes and steps in `__post_init__`."""
    if isinstance(value, bool) or not isinstance(value, Real) or not value >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")


def _bounds(low: float | None, high: float | None, low_inclusive: bool, high_inclusive: bool) -> str:
    """'in [0, 1)', '> 0', '<= 1' or '' (no bounds)."""
    if low is not None and high is not None:
        return f"in {'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
    if low is not None:
        return f"{'>=' if low_inclusive else '>'} {low}"
    if high is not None:
        return f"{'<=' if high_inclusive else '<'} {high}"
    return ""


# What a type check says a scalar must be ("'optim.lr' must be a number").
_KINDS = {float: "a number", int: "an integer", str: "a string", bool: "true or false"}


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
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted no as false
            value = "no"
        if value not in args:
            raise ConfigError(f"{source}: '{dotted}' must be one of {list(args)}, got {value!r}")
        return value
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" as a string
            number = float(value)
        except ValueError:
            number = math.nan
        # float() also reads 'nan' and 'inf'; a non-finite value is written .nan / .inf in YAML, on purpose
        if math.isfinite(number):
            return number
    if isinstance(hint, type) and not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        kind = _KINDS.get(hint, hint.__name__)
        raise ConfigError(f"{source}: '{dotted}' must be {kind}, got {value!r}")
    return value
