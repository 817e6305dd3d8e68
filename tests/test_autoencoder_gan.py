"""The stage-1 PatchGAN as LDM trains it: each side's loss moves its way on a toy problem, the adaptive
weight stays finite when the decoder's last layer gets no gradient, and in a training run the GAN terms
and the discriminator's optimizer step start at `disc_start` with weight `disc_factor`.

Unit-level gating (disc_factor_at, the 1e4 cap, disc_factor scaling) is in test_autoencoder_losses.py."""
from __future__ import annotations

import math
import sys

import pytest
import torch
from autoencoder_helpers import pattern_images

import autoencoder as ae
import train_stage1
from common.config import load_config
from common.weights import load_weights
from train_stage1 import AutoencoderTask, Stage1Config
from training.loop import seed_everything
from training.run_log import read_scalars


def _loss(**kw) -> ae.AutoencoderLoss:
    torch.manual_seed(0)
    return ae.AutoencoderLoss(**{**dict(perceptual_weight=0.0, disc_ndf=16, disc_num_layers=2, disc_start=0), **kw})


def _fakes(real: torch.Tensor) -> torch.Tensor:
    """Images unlike `real` (mirrored, shifted, duller), in [-1, 1]."""
    return real.flip(3).roll(5, 2) * 0.7


def test_discriminator_steps_lower_its_loss_and_separate_real_from_fake():
    # Hinge loss of a fresh D: its logits are near 0, so about 0.5 * (1 + 1) = 1. Trained for 8 Adam steps
    # (LDM's betas) on fixed real and fake images, it must score real above fake and lower its loss.
    loss_fn = _loss()
    real = pattern_images(4)
    fake = _fakes(real)
    optimizer = torch.optim.Adam(loss_fn.discriminator_parameters(), lr=2e-3, betas=(0.5, 0.9))
    history = []
    for _ in range(8):
        d_loss, logs = loss_fn.discriminator_loss(real, fake, step=0)
        history.append((d_loss.item(), logs["logits_real"] - logs["logits_fake"]))
        optimizer.zero_grad()
        d_loss.backward()
        optimizer.step()
    (first_loss, first_gap), (last_loss, last_gap) = history[0], history[-1]
    assert first_loss == pytest.approx(1.0, abs=0.1) and abs(first_gap) < 0.1
    assert last_loss < 0.5 * first_loss
    assert last_gap > 1.0  # mean D(real) - mean D(fake)


def test_a_generator_step_raises_the_fixed_discriminators_logits_on_its_fakes():
    # The simplest generator: its output is its parameter (and its "last layer"). D is fixed: eval mode,
    # not in the optimizer. With a = grad mean D(fake) and r = grad of the reconstruction term, the
    # adaptive weight w makes |w a| = disc_weight |r| = 10 |r|, so a small step -h (r - w a) changes
    # mean D(fake) by h (w |a|^2 - a.r) >= h |a| (10 |r| - |r|) > 0, whatever the L1 term's direction.
    loss_fn = _loss(disc_weight=10.0)
    loss_fn.discriminator.eval()
    real = pattern_images(4)
    fake = torch.nn.Parameter(_fakes(real))
    logits = []
    for _ in range(3):
        with torch.no_grad():
            logits.append(loss_fn.discriminator(fake).mean().item())
        loss, logs = loss_fn.generator_loss(real, fake, torch.tensor(0.0), step=0, last_layer=fake)
        assert logs["g_loss"] == pytest.approx(-logits[-1], rel=1e-5)  # the adversarial loss is -mean D(fake)
        (grad,) = torch.autograd.grad(loss, fake)
        with torch.no_grad():
            fake -= 0.3 * grad / grad.norm()
    with torch.no_grad():
        logits.append(loss_fn.discriminator(fake).mean().item())
    assert all(after > before for before, after in zip(logits, logits[1:])), logits
    assert all(p.grad is None for p in loss_fn.discriminator.parameters())


@pytest.mark.parametrize("blind_discriminator", [True, False])
def test_adaptive_weight_is_zero_and_finite_when_the_reconstruction_gradient_vanishes(blind_discriminator):
    # x_hat == x: |x - x_hat| has gradient 0 at the last layer (here x_hat itself). The weight is
    # ||0|| / (||g grad|| + 1e-4) = 0, also when D is blind (last conv zero, so g has gradient 0 too:
    # 0 / 1e-4, where a missing epsilon would give 0 / 0 = NaN). The loss and its gradient stay finite.
    loss_fn = _loss(disc_weight=0.5)
    if blind_discriminator:
        with torch.no_grad():
            loss_fn.discriminator.main[-1].weight.zero_()
    real = pattern_images(2)
    fake = torch.nn.Parameter(real.clone())
    loss, logs = loss_fn.generator_loss(real, fake, torch.tensor(0.0), step=0, last_layer=fake)
    assert logs["d_weight"] == 0.0
    assert math.isfinite(loss.item()) and math.isfinite(logs["g_loss"])
    (grad,) = torch.autograd.grad(loss, fake)
    assert torch.isfinite(grad).all()


def test_disc_start_and_disc_factor_in_a_training_run(tmp_path, monkeypatch):
    # LDM: at global step s (optimizer steps done before this one, 0 first) the GAN weight is
    # disc_factor if s >= disc_start else 0 (`adopt_weight`), for the generator's term and the
    # discriminator's loss alike. disc_start 2, 4 steps: s = 0, 1 without (logged at steps 1, 2), s = 2, 3
    # with factor 0.5 (logged at 3, 4). Here the discriminator's optimizer step is skipped before
    # disc_start (LDM runs it on a zero loss: no change either way), so its weights stay the initial ones.
    argv = ["--config", "autoencoder/tiny-kl", f"train.output_dir={tmp_path}", "train.max_steps=4",
            "data.shapes_length=8", "loss.disc_start=2", "loss.disc_factor=0.5", "train.checkpoint_every=1",
            "train.keep_checkpoints=4"]
    monkeypatch.setattr(sys, "argv", ["train_stage1.py", *argv])
    train_stage1.main()
    scalars = {tag: {step: value for _, step, value in values} for tag, values in read_scalars(tmp_path).items()}
    assert scalars["disc_factor"] == {1: 0.0, 2: 0.0, 3: 0.5, 4: 0.5}
    assert scalars["d_weight"][1] == scalars["d_weight"][2] == 0.0
    assert scalars["d_weight"][3] > 0 and scalars["d_weight"][4] > 0
    assert sorted(scalars["disc_loss"]) == [3, 4]  # the discriminator's step ran from s = 2 on

    def discriminator(step):
        weights = load_weights(tmp_path / "checkpoints" / f"step_{step:08d}" / "loss.safetensors")
        return {k: v for k, v in weights.items() if k.startswith("discriminator.")}

    seed_everything(0)  # the run's initial weights, as the trainer builds them
    initial = AutoencoderTask(load_config("autoencoder/tiny-kl", Stage1Config)).loss.state_dict()
    at_2, at_3 = discriminator(2), discriminator(3)
    assert all(torch.equal(initial[k], at_2[k]) for k in at_2)
    assert not torch.equal(at_2["discriminator.main.0.weight"], at_3["discriminator.main.0.weight"])
