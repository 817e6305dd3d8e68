"""common.weights.load_state_dict_strict: one message naming the file and the keys that do not fit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from common.weights import CheckpointError, load_state_dict_strict, load_weights, save_weights


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def _saved(tmp_path, state) -> tuple:
    path = tmp_path / "net.safetensors"
    save_weights(state, path)
    return path, load_weights(path)


def test_a_fitting_file_loads_exactly(tmp_path):
    source = _net()
    path, state = _saved(tmp_path, source.state_dict())
    target = _net()
    load_state_dict_strict(target, state, path)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


def test_missing_keys_are_named_with_the_file(tmp_path):
    state = _net().state_dict()
    del state["0.bias"]
    path, state = _saved(tmp_path, state)
    with pytest.raises(CheckpointError, match=r"net\.safetensors: Sequential does not fit the weights: "
                                              r"1 missing, e.g. \['0\.bias'\]$"):
        load_state_dict_strict(_net(), state, path)


def test_unexpected_keys_are_named_with_the_file(tmp_path):
    path, state = _saved(tmp_path, {**_net().state_dict(), "2.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"net\.safetensors: .*1 unexpected, e.g. \['2\.weight'\]"):
        load_state_dict_strict(_net(), state, path)


def test_misshaped_keys_are_named_before_torch_would_raise(tmp_path):
    path, state = _saved(tmp_path, {**_net().state_dict(), "0.weight": torch.zeros(4, 5)})
    with pytest.raises(CheckpointError, match=r"net\.safetensors: .*1 mis-shaped, e.g. "
                                              r"\['0\.weight \(4, 5\) \(model \(4, 3\)\)'\]") as error:
        load_state_dict_strict(_net(), state, path)
    assert "missing" not in str(error.value)  # a mis-shaped key is not also reported missing


def test_all_three_kinds_at_once_with_file_names_what_and_hint(tmp_path):
    state = _net().state_dict()
    del state["1.running_mean"]
    state["0.weight"] = torch.zeros(1)
    state["extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as error:
        load_state_dict_strict(_net(), state, tmp_path / "model.ckpt", what="the test net",
                               file_key=lambda k: "model." + k, hint="check the config")
    assert str(error.value) == (
        f"{tmp_path / 'model.ckpt'}: the test net does not fit the weights: 1 missing, e.g. ['model.1.running_mean']; "
        "1 unexpected, e.g. ['model.extra']; 1 mis-shaped, e.g. ['model.0.weight (1,) (model (4, 3))']; "
        "check the config")


def test_allowed_missing_prefixes_keep_their_values_and_the_error_is_also_a_value_error():
    target = _net()
    initial = target[1].weight.clone()
    state = {k: v for k, v in _net().state_dict().items() if not k.startswith("1.")}
    load_state_dict_strict(target, state, "memory", allow_missing=("1.",))
    assert torch.equal(target[1].weight, initial)
    with pytest.raises(ValueError, match="4 missing"):  # stage-1 loaders raised ValueError before
        load_state_dict_strict(target, state, "memory")
    assert issubclass(CheckpointError, RuntimeError)


def test_only_the_first_few_keys_are_listed():
    net = nn.Sequential(*[nn.Linear(1, 1) for _ in range(8)])
    with pytest.raises(CheckpointError, match=r"16 missing, e.g. \['0\.weight', '0\.bias', '1\.weight', "
                                              r"'1\.bias', '2\.weight'\]$"):
        load_state_dict_strict(net, {}, "empty.safetensors")
