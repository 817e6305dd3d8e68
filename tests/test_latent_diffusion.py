"""LatentDiffusion's latent scale: the U-Net sees scale_factor * autoencoder latents, and decoding
divides it out again. Expectations come straight from the autoencoder's own layers (encoder,
quant_conv, post_quant_conv, decoder), not from `encode_latents` / `decode_latents`."""
from __future__ import annotations

import inspect

import pytest
import torch
from autoencoder_helpers import TINY_KL, pattern_images

import train_stage2
from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder, measure_scale_factor
from conditioning import TextEncoderConfig
from data import DataConfig
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.unet import UNetConfig

SCALE = 0.25  # far from 1, so multiplying and dividing give latents 16x apart


@pytest.fixture(scope="module")
def model() -> LatentDiffusion:
    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(**TINY_KL))
    cfg = LatentDiffusionConfig(
        unet=UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
                        num_head_channels=16, image_size=16),
        text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2))
    return LatentDiffusion(cfg, build_autoencoder(ae_cfg), ae_cfg, scale_factor=SCALE).eval()


def _moments(model: LatentDiffusion, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior's mean and std from the autoencoder's layers: quant_conv(encoder(x)) = [mean, logvar]."""
    ae = model.autoencoder
    with torch.no_grad():
        mean, logvar = ae.quant_conv(ae.encoder(images)).chunk(2, dim=1)
    return mean, torch.exp(0.5 * logvar.clamp(-30.0, 20.0))


def test_encode_images_multiplies_the_autoencoder_latent_by_the_scale_factor(model):
    images = pattern_images(2)
    mean, std = _moments(model, images)
    torch.testing.assert_close(model.encode_images(images, sample=False), SCALE * mean, rtol=1e-5, atol=1e-6)
    # A posterior sample: the same standard normal draw, scaled after sampling.
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    sampled = model.encode_images(images, sample=True, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(sampled, SCALE * (mean + std * eps), rtol=1e-5, atol=1e-6)


def test_decode_latents_divides_the_scale_factor_out(model):
    ae = model.autoencoder
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ae.decoder(ae.post_quant_conv(latents / SCALE))
    torch.testing.assert_close(model.decode_latents(latents), expected, rtol=1e-5, atol=1e-5)
    # and the round trip is the autoencoder's own reconstruction from the posterior mean
    images = pattern_images(2)
    with torch.no_grad():
        reconstruction = ae.decoder(ae.post_quant_conv(_moments(model, images)[0]))
    torch.testing.assert_close(model.decode_latents(model.encode_images(images, sample=False)), reconstruction,
                               rtol=1e-4, atol=1e-5)


def test_a_measured_scale_factor_gives_the_unet_unit_variance_latents(model):
    # The point of the scale (LDM's scale_by_std): with scale_factor = 1 / s, s the std of the
    # autoencoder's latents, encode_images gives latents of std 1 (dividing by it instead: std s^2).
    images = pattern_images(4)
    mean, _ = _moments(model, images)
    measured = measure_scale_factor(lambda x: model.autoencoder.encode_latents(x, sample=False), [images])
    assert abs(mean.double().std().item() - 1) > 0.2  # the test would be vacuous for unit-variance latents
    original = model.scale_factor
    try:
        model.scale_factor = measured
        assert model.encode_images(images, sample=False).double().std().item() == pytest.approx(1.0, rel=1e-5)
    finally:
        model.scale_factor = original


def _training_latents(task: train_stage2.LatentDiffusionTask, batch: dict) -> torch.Tensor:
    """The task's latents with the posterior noise from the global generator (generators None, for a
    task whose `latents` also takes per-sample generators)."""
    takes_generators = len(inspect.signature(task.latents).parameters) > 1
    return task.latents(batch, None) if takes_generators else task.latents(batch)


def test_stage2_training_latents_are_scaled_from_images_and_from_the_latent_cache(model):
    cfg = train_stage2.Stage2Config(model=model.cfg, data=DataConfig(source="shapes", size=32, shapes_length=4))
    task = train_stage2.LatentDiffusionTask(cfg, model)
    images = pattern_images(2)
    mean, std = _moments(model, images)
    torch.manual_seed(3)  # the training step samples its posterior from the global generator
    eps = torch.randn(mean.shape)
    torch.manual_seed(3)
    got = _training_latents(task, {"image": images})
    torch.testing.assert_close(got, SCALE * (mean + std * eps), rtol=1e-5, atol=1e-6)
    # Cached posteriors are stored unscaled (mean, std) and scaled when a sample is drawn.
    cached_mean = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(4))
    cached_std = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(6)
    eps = torch.randn(cached_mean.shape)
    torch.manual_seed(6)
    got = _training_latents(task, {"latent_mean": cached_mean, "latent_std": cached_std})
    torch.testing.assert_close(got, SCALE * (cached_mean + cached_std * eps))


def test_the_model_file_records_which_latents_the_unet_was_trained_on(model, tmp_path, caplog):
    from common.weights import CheckpointError, load_weights, read_metadata, save_weights

    means, older = tmp_path / "means.safetensors", tmp_path / "older.safetensors"
    model.latent_sample = False
    try:
        model.save(means)
    finally:
        model.latent_sample = True
    loaded = LatentDiffusion.load(means)
    assert loaded.latent_sample is False
    # Fine-tuning it (ControlNet, LoRA, DreamBooth) trains on the means unless the config says otherwise.
    assert train_stage2.fine_tuning_latent_sample(loaded, None, str(means)) is False
    assert train_stage2.fine_tuning_latent_sample(loaded, True, str(means)) is True
    assert "trained on posterior means" in caplog.text
    cfg = train_stage2.Stage2Config(model=loaded.cfg, data=DataConfig())
    mean, std = torch.randn(2, 4, 16, 16), torch.ones(2, 4, 16, 16)
    batch = {"latent_mean": mean, "latent_std": std}
    assert torch.equal(train_stage2.LatentDiffusionTask(cfg, loaded).latents(batch), mean * SCALE)
    # A file written before the key existed holds a U-Net trained on posterior samples, as LDM's.
    meta = {k: v for k, v in read_metadata(means).items() if k != "latent_sample"}
    save_weights(load_weights(means), older, meta)
    assert LatentDiffusion.load(older).latent_sample is True
    save_weights(load_weights(means), older, {**meta, "latent_sample": "no"})
    with pytest.raises(CheckpointError, match="latent_sample must be true or false"):
        LatentDiffusion.load(older)
