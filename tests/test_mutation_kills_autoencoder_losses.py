"""Stage-1 loss behaviour the mutation run (make mutation) found untested: the class defaults are the
config's (kl-f8's), every option reaches what it configures, the adaptive weight's early exits and its
global-batch gradients (with a stand-in for the other process), and the logged keys."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import autoencoder as ae
from autoencoder.config import AutoencoderLossConfig
from autoencoder.discriminator import NLayerDiscriminator
from autoencoder.losses import hinge_d_loss

TINY = dict(perceptual_weight=0.0, disc_ndf=8, disc_num_layers=2, disc_start=0)


def test_class_defaults_are_the_config_defaults():
    """build_autoencoder_loss passes every config field: AutoencoderLoss() must mean the default config."""
    params = inspect.signature(ae.AutoencoderLoss).parameters
    config = AutoencoderLossConfig()
    assert set(params) == {f.name for f in dataclasses.fields(config)}
    for name, param in params.items():
        assert param.default == getattr(config, name), name


def test_a_loss_built_with_the_defaults_has_the_config_values():
    config = AutoencoderLossConfig()
    loss_fn = ae.AutoencoderLoss(lpips_random_backbone=True)  # the default VGG trunk, untrained: no file needed
    for name in ("perceptual_weight", "kl_weight", "codebook_weight", "disc_start", "disc_weight", "disc_factor"):
        assert getattr(loss_fn, name) == getattr(config, name), name
    assert loss_fn.logvar.item() == config.logvar_init and loss_fn.disc_loss_fn is hinge_d_loss
    reference = NLayerDiscriminator(config.disc_in_channels, config.disc_ndf, config.disc_num_layers, config.disc_norm)
    assert [p.shape for p in loss_fn.discriminator.parameters()] == [p.shape for p in reference.parameters()]


def _logits_loss(loss_fn, x, x_hat):
    real, fake = loss_fn.discriminator(x).float(), loss_fn.discriminator(x_hat).float()
    return real, fake


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_disc_loss_option_picks_the_loss(kind):
    torch.manual_seed(0)
    loss_fn = ae.AutoencoderLoss(**TINY, disc_loss=kind)
    x, x_hat = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    loss, logs = loss_fn.discriminator_loss(x, x_hat, step=0)
    with torch.no_grad():
        real, fake = _logits_loss(loss_fn, x, x_hat)
    if kind == "hinge":
        expected = 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())
    else:
        expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(logs) == {"disc_loss", "logits_real", "logits_fake"}
    assert logs["disc_loss"] == pytest.approx(expected.item(), rel=1e-5)
    assert logs["logits_real"] == pytest.approx(real.mean().item(), rel=1e-5, abs=1e-7)
    assert logs["logits_fake"] == pytest.approx(fake.mean().item(), rel=1e-5, abs=1e-7)


def test_bad_options_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="^disc_loss must be 'hinge' or 'vanilla', got 'wgan'$"):
        ae.AutoencoderLoss(**TINY, disc_loss="wgan")
    with pytest.raises(ValueError, match="^perceptual_weight must be >= 0, got -1.0$"):
        ae.AutoencoderLoss(**{**TINY, "perceptual_weight": -1.0})
    missing = tmp_path / "my-vgg16.pth"
    with pytest.raises(FileNotFoundError, match="my-vgg16.pth"):  # lpips_path reaches the loader
        ae.AutoencoderLoss(**{**TINY, "perceptual_weight": 1.0}, lpips_path=str(missing))
    with pytest.raises(TypeError, match="got str$"):
        ae.AutoencoderLoss(**TINY).generator_loss(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), "kl", step=0)


def test_disc_norm_reaches_the_discriminator():
    for norm, layer in (("group", nn.GroupNorm), ("batch", nn.BatchNorm2d)):
        modules = list(ae.AutoencoderLoss(**TINY, disc_norm=norm).discriminator.modules())
        assert any(isinstance(m, layer) for m in modules), norm
    group = ae.AutoencoderLoss(**TINY, disc_norm="group").discriminator
    assert not any(isinstance(m, nn.BatchNorm2d) for m in group.modules())


def test_parameter_groups_split_logvar_from_the_discriminator():
    loss_fn = ae.AutoencoderLoss(**TINY)
    disc = loss_fn.discriminator_parameters()
    assert [id(p) for p in disc] == [id(p) for p in loss_fn.discriminator.parameters()] and disc
    assert loss_fn.autoencoder_parameters() == [loss_fn.logvar]


def _weighted(a: torch.Tensor, b: torch.Tensor):
    """nll and g_loss whose gradients at the layer w are exactly a and b."""
    w = nn.Parameter(torch.zeros_like(a))
    return (w * a).sum(), (w * b).sum(), w


def test_adaptive_weight_is_zero_whenever_a_gradient_is_missing():
    loss_fn = ae.AutoencoderLoss(**TINY, disc_weight=0.5)
    a, b = torch.ones(4), torch.full((4,), 2.0)
    nll, g, w = _weighted(a, b)
    assert loss_fn.adaptive_weight(nll, g, w).item() == pytest.approx(0.5 * 2.0 / (4.0 + 1e-4))
    assert loss_fn.adaptive_weight(nll, g, None).item() == 0.0
    assert loss_fn.adaptive_weight(nll.detach(), g, w).item() == 0.0
    assert loss_fn.adaptive_weight(nll, g.detach(), w).item() == 0.0
    meta = torch.zeros((), device="meta")
    assert loss_fn.adaptive_weight(meta, meta, None).device.type == "meta"


def test_adaptive_weight_below_one_is_not_raised():
    loss_fn = ae.AutoencoderLoss(**TINY, disc_weight=1.0)
    nll, g, w = _weighted(torch.full((4,), 0.05), torch.ones(4))
    assert loss_fn.adaptive_weight(nll, g, w).item() == pytest.approx(0.1 / (2.0 + 1e-4), rel=1e-6)


def test_adaptive_weight_uses_the_global_batch_mean_gradients(monkeypatch):
    """With two processes the weight comes from the mean of both processes' gradients. The other process
    is a stand-in whose gradients are (0, 0): all_reduce then halves this one's. The 1e-4 in the
    denominator makes the weight depend on the gradients' size, not only on their ratio."""
    summed = []

    def all_reduce(tensor):
        summed.append(tensor.clone())
        tensor += 0.0  # the other process contributes zeros

    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    loss_fn = ae.AutoencoderLoss(**TINY, disc_weight=1.0)
    a, b = torch.tensor([0.6, 0.8]), torch.tensor([1.2e-4, 1.6e-4])  # |a| = 1, |b| = 2e-4
    nll, g, w = _weighted(a, b)
    weight = loss_fn.adaptive_weight(nll, g, w).item()
    assert weight == pytest.approx(0.5 / (1e-4 + 1e-4), rel=1e-4)  # |a / 2| / (|b / 2| + 1e-4) = 2500
    assert len(summed) == 1 and torch.equal(summed[0], torch.stack([a, b]))


def _images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1


def test_generator_logs_name_every_term():
    x, x_hat = _images()
    loss_fn = ae.AutoencoderLoss(**{**TINY, "disc_start": 10**6}, logvar_init=0.25)
    posterior = ae.DiagonalGaussianDistribution(torch.zeros(2, 8, 2, 2))
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, step=0)
    assert set(logs) == {"l1", "nll", "kl", "logvar", "g_loss", "d_weight", "disc_factor", "loss"}
    assert logs["logvar"] == 0.25 and logs["loss"] == pytest.approx(loss.item())
    loss, logs = loss_fn.generator_loss(x, x_hat, torch.tensor(0.5), step=0)
    assert set(logs) == {"l1", "nll", "q_loss", "g_loss", "d_weight", "disc_factor", "loss"}
    assert logs["nll"] == pytest.approx((x - x_hat).abs().mean().item(), rel=1e-6)
    assert logs["loss"] == pytest.approx(loss.item())
