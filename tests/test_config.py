"""Typed YAML configs: overrides, unknown and missing keys, types, ranges; every error one line."""
import math
from pathlib import Path
from dataclasses import dataclass, field
from typing import Literal

import pytest

from common.config import ConfigError, at_least, check_range, load_config

ROOT = Path(__file__).resolve().parents[1]


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


@dataclass
class Train:
    max_steps: int = 10
    decay: float | None = None

    def __post_init__(self):  # the contract: ValueError, message starting with the field name
        at_least("max_steps", self.max_steps, 1)
        if self.decay is not None:
            check_range("decay", self.decay, low=0, high=1, high_inclusive=False)


@dataclass
class Run:
    train: Train = field(default_factory=Train)
    lr: float = 1e-4

    def __post_init__(self):
        check_range("lr", self.lr, low=0, low_inclusive=False)


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
    ("model:\n  ch: big\n", "'model.ch' must be an integer, got 'big'"),
    ("model:\n  ch: 1\n  ch_mult: 3\n", "'model.ch_mult' must be a list"),
    ("model:\n  ch: 1\nkind: ae\n", "'kind' must be one of"),
    ("model:\n  ch: true\n", "'model.ch' must be an integer, got True"),
    ("model:\n  ch: 1\nlr: abc\n", "c.yaml: 'lr' must be a number, got 'abc'$"),
    ("model:\n  ch: 1\nlr: nan\n", "'lr' must be a number, got 'nan'"),  # a string: YAML's NaN is .nan
    ("model:\n  ch: 1\n  ch_mult: [1, x]\n", "'model.ch_mult\\[1\\]' must be an integer, got 'x'"),
])
def test_type_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, text), Outer)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.yaml", Outer)
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(_write(tmp_path, "model:\n  ch: 1\n"), Outer, ["lr"])


def test_shipped_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    from train_stage1 import Stage1Config
    monkeypatch.chdir(tmp_path)
    by_path = load_config("configs/autoencoder/tiny-kl.yaml", Stage1Config)
    by_name = load_config("autoencoder/tiny-kl", Stage1Config)
    assert by_path == by_name and by_path.model.ddconfig.z_channels > 0
    local = tmp_path / "configs" / "autoencoder" / "tiny-kl.yaml"  # a file of the user's own wins
    local.parent.mkdir(parents=True)
    shipped = (ROOT / "configs/autoencoder/tiny-kl.yaml").read_text()
    local.write_text(shipped.replace("scale_factor_batches: 2", "scale_factor_batches: 3"))
    assert load_config("configs/autoencoder/tiny-kl.yaml", Stage1Config).scale_factor_batches == 3
    with pytest.raises(ConfigError, match=r"config file not found: ldm/nothing \(nor in .* or its configs/ folder\)"):
        load_config("ldm/nothing", Stage1Config)


def _one_line_error(path, schema=Outer, overrides=()) -> str:
    with pytest.raises(ConfigError) as error:
        load_config(path, schema, overrides)
    assert "\n" not in str(error.value)
    return str(error.value)


@pytest.mark.parametrize("text,position,problem", [
    ("model:\n  ch: 1\n  ch_mult: [1, 2\n", "4:1", "expected ',' or ']', but got '<stream end>'"),
    ("model:\n  ch: 1\nlr: a: 2\n", "3:6", "mapping values are not allowed here"),
    ("model:\n  ch: 1\n lr: 2\n", "3:2",
     "expected <block end>, but found '<block mapping start>' (while parsing a block mapping at line 1)"),
    ("model:\n\tch: 1\n", "2:1", "found character '\\t' that cannot start any token"),
    ("model:\n  ch: 1\nnote: a\x07b\n", "3:8", "character #x0007: special characters are not allowed"),
])
def test_invalid_yaml_is_one_line_with_file_line_and_column(tmp_path, text, position, problem):
    path = _write(tmp_path, text)
    message = _one_line_error(path)
    assert message.startswith(f"{path}:{position}: {problem}")


def test_invalid_yaml_in_an_override_is_one_line(tmp_path):
    assert _one_line_error(_write(tmp_path, "model:\n  ch: 1\n"), overrides=["model.ch_mult=[1,2"]) == (
        "override 'model.ch_mult=[1,2':1:5: expected ',' or ']', but got '<stream end>' (while parsing a flow sequence)")


def test_range_checks_in_post_init_name_the_file_and_the_section(tmp_path):
    assert _one_line_error(_write(tmp_path, "train:\n  max_steps: 0\n"), Run) == (
        f"{tmp_path / 'c.yaml'}: train: max_steps must be >= 1, got 0")
    assert _one_line_error(_write(tmp_path, "train:\n  decay: .nan\n"), Run) == (
        f"{tmp_path / 'c.yaml'}: train: decay must be a finite number in [0, 1), got nan")
    assert _one_line_error(_write(tmp_path, "lr: -.inf\n"), Run) == (
        f"{tmp_path / 'c.yaml'}: lr must be a finite number > 0, got -inf")  # top level: no section
    assert _one_line_error(_write(tmp_path, "{}\n"), Run, ["train.decay=1"]).endswith(
        "train: decay must be a finite number in [0, 1), got 1.0")
    assert load_config(_write(tmp_path, "train:\n  decay: 0.5\n"), Run).train == Train(decay=0.5)


@pytest.mark.parametrize("kwargs,value,message", [
    ({"low": 0, "low_inclusive": False}, 0, "x must be a finite number > 0, got 0"),
    ({"low": 0}, -1e-9, "x must be a finite number >= 0, got -1e-09"),
    ({"high": 1, "high_inclusive": False}, 1.0, "x must be a finite number < 1, got 1.0"),
    ({"low": 0, "high": 1}, math.nan, r"x must be a finite number in \[0, 1\], got nan"),
    ({"low": 0, "finite": False}, math.nan, "x must be a number >= 0, got nan"),  # NaN is in no range
    ({}, math.inf, "x must be a finite number, got inf"),
    ({}, "1", "x must be a finite number, got '1'"),
    ({}, True, "x must be a finite number, got True"),
])
def test_check_range_names_the_field_the_range_and_the_value(kwargs, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_range("x", value, **kwargs)


def test_values_in_range_pass_and_at_least_checks_counts():
    check_range("x", 0, low=0)
    check_range("x", math.inf, low=0, finite=False)
    check_range("x", 0.5, low=0, high=1, low_inclusive=False, high_inclusive=False)
    at_least("n", 1, 1)
    for bad in (0, -3, True, None, math.nan):
        with pytest.raises(ValueError, match=f"^n must be >= 1, got {bad!r}$"):
            at_least("n", bad, 1)
