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


def _posterior(mean: float, logvar: float, shape=(2, 4, 2, 2)) -> ae.DiagonalGaussianDistribution:
    return ae.DiagonalGaussianDistribution(torch.cat([torch.full(shape, mean), torch.full(shape, logvar)], dim=1))


def test_kl_generator_loss_hand_worked():
    # Two 3x4x4 images (48 values each); |x - x_hat| is 0.5 on half the values and 1.5 on the other
    # half; logvar = ln 2; posterior N(1, 1) on 2 x 16 latent values; no GAN term (disc_start not reached).
    #   nll = sum(|x - x_hat| / 2 + ln 2) / 2 = (48 * 0.25 + 48 * 0.75 + 96 ln 2) / 2 = 24 + 48 ln 2
    #   KL  = 1/2 sum(mu^2 + var - 1 - logvar) / 2 = 1/2 * 32 * 1 / 2 = 8;  loss = nll + 1e-3 * KL
    loss_fn = _loss(logvar_init=math.log(2.0), disc_start=10**6)
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.full((2, 3, 4, 4), 0.5)
    x_hat[:, :, :2] = -1.5
    loss, logs = loss_fn.generator_loss(x, x_hat, _posterior(1.0, 0.0), step=0)
    assert logs["nll"] == pytest.approx(24 + 48 * math.log(2), rel=1e-6)
    assert logs["kl"] == pytest.approx(8.0, rel=1e-6)
    assert loss.item() == pytest.approx(24 + 48 * math.log(2) + 0.008, rel=1e-6)
    assert logs["l1"] == pytest.approx(1.0) and logs["g_loss"] == 0.0


def test_perceptual_term_is_weighted_and_added_per_pixel():
    # LPIPS with a random trunk (offline; the calibrated heads ship with lpips). Its distance p_b per
    # image, from the lpips package's own module, is broadcast over the 3 x 32 x 32 pixels of image b:
    #   KL: nll = sum_b sum_pixels (|x - x_hat| + w p_b) / exp(logvar) / B + 3072 logvar
    #   VQ: nll = mean |x - x_hat| + w mean_b p_b
    w, pixels = 0.3, 3 * 32 * 32
    loss_fn = _loss(perceptual_weight=w, lpips_net="squeeze", lpips_random_backbone=True,
                    logvar_init=math.log(2.0), disc_start=10**6, kl_weight=0.0)
    x = pattern_images(2)
    x_hat = (0.8 * x.flip(3) + 0.1).requires_grad_(True)
    lpips_distance = loss_fn.perceptual.model(x, x_hat)  # the lpips package's LPIPS.forward
    p = lpips_distance.detach().double().flatten()
    l1 = (x - x_hat.detach()).double().abs()
    assert p.min() > 1e-3  # a term worth checking

    loss, logs = loss_fn.generator_loss(x, x_hat, _posterior(0.0, 0.0), step=0)
    expected = (l1.sum() / 2 + w * pixels * p.mean()) / 2 + pixels * math.log(2.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["perceptual"] == pytest.approx(p.mean().item(), rel=1e-5)
    # Its gradient reaches x_hat: (sign(x_hat - x) + w * pixels * d p_b / d x_hat) / (exp(logvar) B).
    (grad,) = torch.autograd.grad(loss, x_hat)
    (p_grad,) = torch.autograd.grad(lpips_distance.sum(), x_hat)
    torch.testing.assert_close(grad, (torch.sign(x_hat - x) + w * pixels * p_grad) / 4, rtol=1e-4, atol=1e-6)

    vq_loss, _ = loss_fn.generator_loss(x, x_hat, torch.tensor(0.25), step=0)
    assert vq_loss.item() == pytest.approx((l1.mean() + w * p.mean() + 0.25).item(), rel=1e-5)


def test_adaptive_weight_balances_the_gan_gradient_at_the_last_layer():
    # The adaptive weight's purpose: at the decoder's last layer W, the GAN term d_weight * g has a
    # gradient of disc_weight (0.5) times the norm of the reconstruction term's (up to the 1e-4 in its
    # denominator). Measured here from the losses with and without the GAN term, not from its formula.
    model = tiny_kl()
    with_gan, without_gan = _loss(logvar_init=0.3), _loss(logvar_init=0.3, disc_start=10**6)
    x = pattern_images(2)
    x_hat, posterior = model(x, generator=torch.Generator().manual_seed(0))
    last = model.get_last_layer()
    loss, logs = with_gan.generator_loss(x, x_hat, posterior, step=5, last_layer=last)
    base, _ = without_gan.generator_loss(x, x_hat, posterior, step=5, last_layer=last)
    (rec_grad,) = torch.autograd.grad(base, last, retain_graph=True)  # the KL term does not reach W
    (gan_grad,) = torch.autograd.grad(loss - base, last, retain_graph=True)
    assert gan_grad.norm().item() == pytest.approx(0.5 * rec_grad.norm().item(), rel=1e-3)
    # The GAN term itself: d_weight * (-mean D(x_hat)), D run separately.
    g = -with_gan.discriminator(x_hat).mean()
    assert logs["g_loss"] == pytest.approx(g.item(), rel=1e-5)
    assert (loss - base).item() == pytest.approx(logs["d_weight"] * g.item(), rel=1e-4, abs=1e-7)

    loss.backward()
    assert all(p.grad is None for p in with_gan.discriminator.parameters())  # D stayed frozen
    assert all(p.requires_grad for p in with_gan.discriminator.parameters())  # and is unfrozen again
    assert last.grad is not None and with_gan.logvar.grad is not None


def test_adaptive_weight_is_capped_at_1e4_times_disc_weight():
    # A discriminator blind to its input (last conv weight zero) gives the GAN term no gradient at W:
    # the ratio ||d nll|| / (0 + 1e-4) exceeds 1e4 and the weight stops at 1e4 * 0.5.
    model, loss_fn = tiny_kl(), _loss()
    with torch.no_grad():
        loss_fn.discriminator.main[-1].weight.zero_()
    x = pattern_images(2)
    x_hat, posterior = model(x)
    nll_grad = torch.autograd.grad((x - x_hat).abs().sum() / 2, model.get_last_layer(), retain_graph=True)[0]
    assert nll_grad.norm() > 1.0
    _, logs = loss_fn.generator_loss(x, x_hat, posterior, step=5, last_layer=model.get_last_layer())
    assert logs["d_weight"] == pytest.approx(5000.0)


def test_disc_factor_scales_both_gan_terms():
    # disc_factor 0.5 halves the generator's GAN term and the discriminator's loss (same seed, same D).
    model = tiny_kl()
    half, full, none = _loss(disc_factor=0.5), _loss(disc_factor=1.0), _loss(disc_start=10**6)
    x = pattern_images(2)
    x_hat, posterior = model(x, generator=torch.Generator().manual_seed(0))
    last = model.get_last_layer()
    loss_half, logs_half = half.generator_loss(x, x_hat, posterior, step=3, last_layer=last)
    loss_full, logs_full = full.generator_loss(x, x_hat, posterior, step=3, last_layer=last)
    loss_none, _ = none.generator_loss(x, x_hat, posterior, step=3, last_layer=last)
    gan_full = (loss_full - loss_none).item()
    assert abs(gan_full) > 1e-3
    assert (loss_half - loss_none).item() == pytest.approx(0.5 * gan_full, rel=1e-4)
    assert logs_half["disc_factor"] == 0.5 and logs_half["d_weight"] == pytest.approx(logs_full["d_weight"])

    # Discriminator: 0.5 * hinge, the hinge from D's logits in float64.
    d_half, _ = half.discriminator_loss(x, x_hat, step=3)
    with torch.no_grad():
        real = full.discriminator(x).double()
        fake = full.discriminator(x_hat).double()
    hinge = 0.5 * ((1 - real).clamp(min=0).mean() + (1 + fake).clamp(min=0).mean())
    assert d_half.item() == pytest.approx(0.5 * hinge.item(), rel=1e-5)
    assert half.discriminator_loss(x, x_hat, step=2)[0].item() > 0  # disc_start 0: on from the first step


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

    d_loss, _ = loss_fn.discriminator_loss(x, x_hat, step=99)
    assert d_loss.item() == 0.0
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
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ae.AutoencoderLossConfig(perceptual_weight=1.0)
    with pytest.raises(FileNotFoundError) as err:
        ae.build_autoencoder_loss(cfg)
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and "hub/checkpoints" in message and "perceptual_weight: 0" in message
    assert "HF_HUB_OFFLINE is set" in message
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
