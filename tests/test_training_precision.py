"""train.mixed_precision: "auto" is bf16 autocast where the device has native bf16 and float32 elsewhere;
an unquoted YAML `no` means "no"."""
import logging

import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from loop_helpers import LoggingTask
from test_training_loop import NoisyRegression, _cfg

import training.precision
from common.config import ConfigError, from_dict
from training import TrainConfig, train
from training.precision import resolve_mixed_precision


@pytest.fixture
def cpu_bf16(monkeypatch):
    """`set(avx512_bf16, amx)`: what this CPU is said to have."""
    def set_features(avx512_bf16: bool, amx: bool) -> None:
        monkeypatch.setattr(training.precision.torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(training.precision.torch.cpu, "_is_amx_tile_supported", lambda: amx)
    return set_features


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "no")])
def test_auto_is_bf16_only_on_cpus_with_native_bf16(cpu_bf16, avx512_bf16, amx, expected):
    cpu_bf16(avx512_bf16, amx)
    assert resolve_mixed_precision("auto", "cpu") == expected
    for explicit in ("no", "fp16", "bf16"):  # what is asked is what runs
        assert resolve_mixed_precision(explicit, "cpu") == explicit
    assert resolve_mixed_precision("auto", "mps") == "no"
    with pytest.raises(ValueError, match="train.mixed_precision must be one of no, fp16, bf16, auto, got 'fp8'"):
        resolve_mixed_precision("fp8", "cpu")


class AutocastProbe(LoggingTask):
    """Notes whether each training step runs under CPU bf16 autocast."""

    def training_step(self, batch, step):
        self.seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        yield from super().training_step(batch, step)


@pytest.mark.parametrize("native", [True, False])
def test_an_auto_run_trains_in_bf16_autocast_where_native(tmp_path, cpu_bf16, caplog, native):
    cpu_bf16(native, False)
    AcceleratorState._reset_state(True)  # the process's accelerate state is fixed to the first precision used
    task = AutocastProbe()
    try:
        with caplog.at_level(logging.INFO, logger="training.loop"):
            train(task, NoisyRegression(), _cfg(tmp_path, max_steps=2, mixed_precision="auto"))
    finally:
        AcceleratorState._reset_state(True)
    assert task.seen == [native, native]
    assert f"train.mixed_precision=auto: {'bf16' if native else 'float32'} on cpu" in caplog.messages


def test_an_unquoted_yaml_no_reads_as_no():
    raw = yaml.safe_load("mixed_precision: no\nshard: none")
    assert raw["mixed_precision"] is False  # YAML 1.1
    assert from_dict(TrainConfig, raw).mixed_precision == "no"
    with pytest.raises(ConfigError, match="'shard' must be one of"):
        from_dict(TrainConfig, {"shard": False})  # only where "no" is a choice


def test_a_torch_without_the_cpu_feature_probes_trains_in_fp32(monkeypatch):
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.delattr(training.precision.torch.cpu, name)
    assert resolve_mixed_precision("auto", "cpu") == "no"
