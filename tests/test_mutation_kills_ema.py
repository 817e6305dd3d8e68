"""EMA behaviour the mutation run (make mutation) found untested: the shadow builds no autograd graph,
and the messages naming a state or a model the EMA does not fit."""
import pytest
import torch
from torch import nn

from common.weights import CheckpointError
from training import EMA, ema_weights


def test_the_shadow_is_frozen():
    torch.manual_seed(0)
    ema = EMA(nn.Linear(3, 2))
    assert not any(p.requires_grad for p in ema.shadow.parameters())
    assert not ema.shadow(torch.randn(4, 3)).requires_grad  # sampling with it records no graph


def test_a_state_that_does_not_fit_names_its_source_and_the_ema_copy():
    ema = EMA(nn.Linear(3, 2))
    with pytest.raises(CheckpointError, match=r"^EMA state: the EMA copy does not fit the weights: 1 missing"):
        ema.load_state_dict({"weight": torch.zeros(2, 3)}, num_updates=5)
    with pytest.raises(CheckpointError, match=r"^run/last\.safetensors: the EMA copy does not fit"):
        ema.load_state_dict({"weight": torch.zeros(2, 3)}, num_updates=5, source="run/last.safetensors")


def test_ema_weights_of_another_model_name_the_first_differing_key():
    ema = EMA(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"^ema_weights: the EMA does not follow this model \(2 tensors, EMA 4; "
                                         r"first differing key '0\.bias'\)$"):
        with ema_weights(nn.Linear(2, 2), ema):
            pass
