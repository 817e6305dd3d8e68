"""Stage-1 losses: the generator loss against a hand computation, GAN-loss gating and adaptive
weight, discriminator losses and layout, LPIPS loading."""
from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from autoencoder_helpers import pattern_images, tiny_kl, tiny_vq

import autoencoder as ae
from autoencoder.losses import frozen, hinge_d_loss, vanilla_d_loss


def _loss(**kw) -> ae.AutoencoderLoss:
    torch.manual_seed(0)
    defaults = dict(perceptual_weight=0.0, disc_ndf=16, disc_num_layers=2, disc_start=0, disc_weight=0.5, kl_weight=1e-3)
    return ae.AutoencoderLoss(**{**defaults, **kw})


def test_generator_loss_matches_hand_computation():
    model, loss_fn = tiny_kl(), _loss(logvar_init=0.3)
    x = pattern_images(2)
    x_hat, posterior = model(x, generator=torch.Generator().manual_seed(0))
    last = model.get_last_layer()
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, step=5, last_layer=last)

    logvar = torch.tensor(0.3)
    nll = ((x - x_hat).abs() / logvar.exp() + logvar).sum() / 2
    kl = posterior.kl().sum() / 2
    g = -loss_fn.discriminator(x_hat).mean()
    grad_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = (grad_nll.norm() / (grad_g.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    assert logs["d_weight"] == pytest.approx(d_weight.item(), rel=1e-4)
    assert logs["nll"] == pytest.approx(nll.item(), rel=1e-5)
    torch.testing.assert_close(loss, nll + 1e-3 * kl + d_weight * g)

    loss.backward()
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())  # D stayed frozen
    assert all(p.requires_grad for p in loss_fn.discriminator.parameters())  # and is unfrozen again
    assert last.grad is not None and loss_fn.logvar.grad is not None


def test_vq_generator_loss_uses_mean_reconstruction_and_codebook_weight():
    model, loss_fn = tiny_vq(), _loss(disc_start=10**6, codebook_weight=2.0)
    x = pattern_images(2)
    x_hat, q_loss, _ = model(x)
    loss, logs = loss_fn.generator_loss(x, x_hat, q_loss, step=0, last_layer=model.get_last_layer())
    torch.testing.assert_close(loss, (x - x_hat).abs().mean() + 2.0 * q_loss)
    assert logs["q_loss"] == pytest.approx(q_loss.item(), rel=1e-5)
    with pytest.raises(TypeError, match="reg must be"):
        loss_fn.generator_loss(x, x_hat, "posterior", step=0)


def test_disc_start_gates_gan_terms():
    model, loss_fn = tiny_kl(), _loss(disc_start=100)
    calls = []
    loss_fn.discriminator.register_forward_hook(lambda *args: calls.append(1))
    x = pattern_images(2)
    x_hat, posterior = model(x)
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, step=99, last_layer=model.get_last_layer())
    assert calls == [] and logs["d_weight"] == 0.0 and logs["disc_factor"] == 0.0
    nll = (x - x_hat).abs().sum() / 2
    torch.testing.assert_close(loss, nll + 1e-3 * posterior.kl().sum() / 2)
    assert not loss_fn.discriminator_active(99) and loss_fn.discriminator_active(100)

    d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, step=99)
    assert d_loss.item() == 0.0 and d_logs["disc_factor"] == 0.0
    d_loss.backward()  # still a graph: a loop may step the discriminator unconditionally
    _, logs = loss_fn.generator_loss(x, x_hat, posterior, step=100, last_layer=model.get_last_layer())
    assert logs["d_weight"] > 0 and logs["disc_factor"] == 1.0
    d_loss, _ = loss_fn.discriminator_loss(x, x_hat, step=100)
    assert d_loss.item() > 0


def test_adaptive_weight_is_zero_without_gradients():
    model, loss_fn = tiny_kl(), _loss()
    x = pattern_images(2)
    with torch.no_grad():
        x_hat, posterior = model(x)
        loss, logs = loss_fn.generator_loss(x, x_hat, posterior, step=10, last_layer=model.get_last_layer())
    assert logs["d_weight"] == 0.0 and math.isfinite(loss.item())


def test_discriminator_losses_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.5])
    # hinge: relu(1 - real) = [0, .5, 2]; relu(1 + fake) = [0, 1, 2.5]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3.5 / 3))
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    assert vanilla_d_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(math.log(2))


def test_frozen_restores_requires_grad_flags():
    layer = torch.nn.Linear(2, 2)
    layer.bias.requires_grad_(False)
    with frozen(layer):
        assert not layer.weight.requires_grad
    assert layer.weight.requires_grad and not layer.bias.requires_grad


def test_patchgan_layout():
    d = ae.NLayerDiscriminator()
    names = {k: tuple(v.shape) for k, v in d.state_dict().items()}
    assert names["main.0.weight"] == (64, 3, 4, 4) and "main.0.bias" in names
    assert names["main.2.weight"] == (128, 64, 4, 4) and "main.2.bias" not in names  # BatchNorm follows
    assert names["main.3.running_mean"] == (128,)
    assert names["main.8.weight"] == (512, 256, 4, 4)
    assert names["main.11.weight"] == (1, 512, 4, 4)
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    g = ae.NLayerDiscriminator(norm="group", ndf=32, n_layers=2)
    assert isinstance(g.main[3], torch.nn.GroupNorm) and "main.2.bias" in g.state_dict()


# -- LPIPS -----------------------------------------------------------------------------------------

def test_lpips_without_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = ae.AutoencoderLossConfig(perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError) as err:
        ae.build_autoencoder_loss(cfg)
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and "hub/checkpoints" in message and "perceptual_weight: 0" in message
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        ae.LPIPS("vgg", backbone_path=tmp_path / "nowhere.pth")


def test_lpips_random_backbone_is_explicit_and_not_saved(caplog):
    with caplog.at_level(logging.WARNING):
        loss_fn = _loss(perceptual_weight=1.0, lpips_net="squeeze", lpips_random_backbone=True)
    assert "RANDOM" in caplog.text
    assert not any(k.startswith("perceptual") for k in loss_fn.state_dict())
    assert all(not n.startswith("perceptual") for n, _ in loss_fn.named_parameters())
    x = pattern_images(2)
    distance = loss_fn.perceptual(x, x.flip(3))
    assert distance.shape == (2, 1, 1, 1) and (distance > 0).all()
    loss_fn.train()
    assert not loss_fn.perceptual.model.training  # dropout in the heads stays off


def test_lpips_loads_torchvision_backbone_file(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    features = torchvision.models.squeezenet1_1(weights=None).features
    path = tmp_path / "squeezenet1_1-b8a52dc0.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    lpips = ae.LPIPS("squeeze", backbone_path=path)
    assert torch.equal(lpips.model.net.slice1[0].weight, features[0].weight)
    assert torch.equal(getattr(lpips.model.net.slice7, "12").expand3x3.weight, features[12].expand3x3.weight)
    x = pattern_images(2)
    assert lpips(x, x).abs().max().item() < 1e-6
    torch.save({"something": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision backbone"):
        ae.LPIPS("squeeze", backbone_path=tmp_path / "bad.pth")
