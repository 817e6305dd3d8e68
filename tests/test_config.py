"""Typed YAML configs: overrides, unknown and missing keys, types."""
from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.config import ConfigError, load_config


@dataclass
class Inner:
    ch: int
    ch_mult: list[int] = field(default_factory=lambda: [1, 2])
    attn: list[int] = field(default_factory=list)


@dataclass
class Outer:
    model: Inner
    lr: float = 1e-4
    kind: Literal["kl", "vq"] = "kl"
    note: str | None = None


def _write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_loads_nested_with_overrides(tmp_path):
    path = _write(tmp_path, "model:\n  ch: 32\nlr: 2.0e-4\n")
    cfg = load_config(path, Outer, ["model.ch_mult=[1,2,4]", "lr=1e-5", "kind=vq", "note=hello"])
    assert cfg.model == Inner(ch=32, ch_mult=[1, 2, 4])
    assert cfg.lr == 1e-5 and isinstance(cfg.lr, float)
    assert (cfg.kind, cfg.note) == ("vq", "hello")


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, "model:\n  ch: 32\n  chmult: [1]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'model\.chmult'"):
        load_config(path, Outer)
    with pytest.raises(ConfigError, match="unknown config key 'model.nope'"):
        load_config(_write(tmp_path, "model:\n  ch: 1\n"), Outer, ["model.nope=3"])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match="missing required config key 'model.ch'"):
        load_config(_write(tmp_path, "model: {}\n"), Outer)


@pytest.mark.parametrize("text,message", [
    ("model:\n  ch: big\n", "'model.ch' must be int"),
    ("model:\n  ch: 1\n  ch_mult: 3\n", "'model.ch_mult' must be a list"),
    ("model:\n  ch: 1\nkind: ae\n", "'kind' must be one of"),
    ("model:\n  ch: true\n", "'model.ch' must be int"),
])
def test_type_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), Outer)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml", Outer)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(_write(tmp_path, "model:\n  ch: 1\n"), Outer, ["lr"])
