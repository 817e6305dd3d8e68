"""Original SD / LDM files: configs, key mapping, EMA, proj reshape, safety, errors, diffusers oracle, CLI."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import generate
from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from conditioning import TextEncoderConfig
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.unet import UNetConfig
from ldm.original_config import parse_original_config
from ldm.original_format import (
    ema_key,
    export_original,
    load_model,
    load_original_autoencoder,
    load_original_model,
)
from common.weights import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # image pixels; the tiny autoencoder halves once


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_zeros(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Zero-initialised layers (proj_out, out.2, ...) get random values so every path reaches the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)


def tiny_model(linear: bool = False, channels: int = 32, kind: str = "kl") -> LatentDiffusion:
    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(kind=kind, embed_dim=4, n_embed=16, ddconfig=DDConfig(
        double_z=kind == "kl", z_channels=4, resolution=SIZE, ch=32, ch_mult=[1, 2], num_res_blocks=1,
        attn_resolutions=[]))
    cfg = LatentDiffusionConfig(
        unet=UNetConfig(model_channels=channels, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                        num_heads=4, num_head_channels=-1, image_size=SIZE // 2, use_linear_in_transformer=linear),
        text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2, max_length=8))
    model = LatentDiffusion(cfg, build_autoencoder(ae_cfg), ae_cfg, scale_factor=0.5)
    randomize_zeros(model.unet)
    return model.eval()


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=g)
    t = torch.tensor([7, 900])
    image = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    return x, t, image


@torch.no_grad()
def outputs(model: LatentDiffusion) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U-Net prediction, text context and autoencoder reconstruction on fixed inputs."""
    x, t, image = inputs()
    context = model.encode_text(["a red apple", ""])
    latents = model.autoencoder.encode_latents(image, sample=False)
    return model(x, t, context), context, model.autoencoder.decode_latents(latents)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("export") / "tiny.safetensors"
    config = export_original(model, path)
    return model, path, config


def assert_same(a, b):
    for x, y in zip(a, b):
        assert x.abs().max() > 1e-4  # the comparison means something
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("name, kind, context, param, linear", [
    ("v1-inference.yaml", "clip", 768, "eps", False),
    ("v2-inference.yaml", "openclip", 1024, "eps", True),
    ("v2-inference-v.yaml", "openclip", 1024, "v", True),
])
def test_sd_configs_parse(name, kind, context, param, linear):
    cfg = parse_original_config(ROOT / "configs/sd" / name)
    assert cfg.ldm.text.kind == kind and not cfg.ldm.text.pretrained
    assert cfg.ldm.unet.context_dim == context and cfg.ldm.unet.use_linear_in_transformer is linear
    assert cfg.ldm.diffusion.parameterization == param and cfg.scale_factor == pytest.approx(0.18215)
    assert cfg.ldm.diffusion.schedule.kind == "ldm-linear" and cfg.ldm.diffusion.schedule.linear_end == 0.012
    assert cfg.autoencoder.ddconfig.ch_mult == [1, 2, 4, 4] and cfg.autoencoder.embed_dim == 4
    if kind == "openclip":
        assert cfg.ldm.text.layer == "penultimate" and cfg.ldm.unet.num_head_channels == 64
    else:
        assert cfg.ldm.text.layer == "last" and cfg.ldm.unet.num_heads == 8 and cfg.ldm.unet.num_head_channels == -1


@pytest.mark.parametrize("name, unet_m, text_m, text_key", [
    ("v1-inference.yaml", 859.52, 123.06, "transformer.text_model.encoder.layers.11.mlp.fc2.weight"),
    ("v2-inference.yaml", 865.91, 354.03, "model.transformer.resblocks.23.mlp.c_proj.weight"),
])
def test_sd_builds_on_meta_with_the_original_parameter_counts(name, unet_m, text_m, text_key):
    from ldm.original_format import build_empty_model

    model = build_empty_model(parse_original_config(ROOT / "configs/sd" / name))
    assert all(p.is_meta for p in model.parameters())
    assert abs(sum(p.numel() for p in model.unet.parameters()) / 1e6 - unet_m) < 0.01
    assert abs(sum(p.numel() for p in model.text_encoder.parameters()) / 1e6 - text_m) < 0.01
    assert abs(sum(p.numel() for p in model.autoencoder.parameters()) / 1e6 - 83.65) < 0.01
    assert text_key in model.text_encoder.state_dict()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["model"].update(target="ldm.models.diffusion.ddpm.DDPM"), "ldm.models.diffusion.ddpm.DDPM"),
    (lambda r: r["model"]["params"]["cond_stage_config"].update(target="ldm.modules.encoders.modules.BERTEmbedder"),
     "BERTEmbedder"),
    (lambda r: r["model"]["params"]["unet_config"]["params"].update(num_classes=10), "num_classes"),
    (lambda r: r["model"]["params"].update(parameterization="x1"), "x1"),
])
def test_unknown_targets_and_keys_are_named(edit, message):
    raw = yaml.safe_load((ROOT / "configs/sd/v1-inference.yaml").read_text())
    edit(raw)
    with pytest.raises(ValueError, match=message):
        parse_original_config(raw)


# ----------------------------------------------------------------------------- round trips


def test_export_writes_original_keys_and_yaml(exported):
    model, path, config = exported
    keys = load_file(str(path)).keys()
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.conv_out.weight" in keys and "alphas_cumprod" in keys
    assert any(k.startswith("cond_stage_model.") for k in keys)
    raw = yaml.safe_load(config.read_text())
    assert raw["model"]["target"] == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert raw["model"]["params"]["unet_config"]["params"]["context_dim"] == 32


def test_round_trip_gives_identical_outputs(exported, tmp_path):
    model, path, config = exported
    loaded = load_original_model(path, config)
    assert not any(p.is_meta for p in loaded.parameters())
    assert loaded.scale_factor == 0.5 and loaded.cfg == LatentDiffusionConfig(**{
        **model.cfg.__dict__, "unet": UNetConfig(**{**model.cfg.unet.__dict__, "context_dim": 32})})
    assert_same(outputs(model), outputs(loaded))
    # Loaded weights may be mapped from the file: training them must never write to it.
    assert all(p.requires_grad for p in loaded.unet.parameters())
    assert not any(p.requires_grad for p in loaded.autoencoder.parameters())
    before = path.read_bytes()
    with torch.no_grad():
        for p in loaded.parameters():
            p.add_(1.0)
    assert path.read_bytes() == before
    # ... and as a .ckpt pickle with a state_dict (mmap'ed, weights_only)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(path)), "global_step": 3}, ckpt)
    from_ckpt = load_original_model(ckpt, config)
    assert_same(outputs(model), outputs(from_ckpt))
    before = ckpt.read_bytes()
    with torch.no_grad():
        next(from_ckpt.unet.parameters()).add_(1.0)
    assert ckpt.read_bytes() == before


def test_ema_weights_are_chosen_when_asked(exported, tmp_path):
    model, path, config = exported
    tensors = load_file(str(path))
    ema = {k: v + 0.01 for k, v in model.unet.state_dict().items()}
    tensors.update({ema_key(k): v for k, v in ema.items()})
    tensors.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(10)})
    assert ema_key("input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    save_file(tensors, tmp_path / "ema.safetensors")
    live = load_original_model(tmp_path / "ema.safetensors", config)
    chosen = load_original_model(tmp_path / "ema.safetensors", config, use_ema=True)
    torch.testing.assert_close(live.unet.state_dict(), model.unet.state_dict())
    torch.testing.assert_close(chosen.unet.state_dict(), ema)
    with pytest.raises(CheckpointError, match="no model_ema"):
        load_original_model(path, config, use_ema=True)


@pytest.mark.parametrize("file_linear, config_linear", [(True, False), (False, True)])
def test_proj_in_out_reshape_between_conv_and_linear(tmp_path, file_linear, config_linear):
    """A 1x1 conv and a Linear over tokens compute the same map: either file loads into either layout."""
    model = tiny_model(linear=file_linear)
    path = tmp_path / "m.safetensors"
    export_original(model, path)
    other = tiny_model(linear=config_linear)
    config = tmp_path / "other.yaml"
    export_original(other, tmp_path / "other.safetensors", config_path=config)
    shapes = {k: v.ndim for k, v in load_file(str(path)).items() if k.endswith("proj_in.weight")}
    assert set(shapes.values()) == {2 if file_linear else 4}
    loaded = load_original_model(path, config)
    assert loaded.cfg.unet.use_linear_in_transformer is config_linear
    assert_same(outputs(model), outputs(loaded))


def test_stand_alone_vae_and_first_stage_of_a_full_file(exported, tmp_path):
    model, path, _ = exported
    vae = dict(model.autoencoder.state_dict())
    vae["loss.logvar"] = torch.zeros(())
    vae["loss.discriminator.main.0.weight"] = torch.zeros(8, 3, 4, 4)
    save_file(vae, tmp_path / "vae.safetensors")
    _, _, image = inputs()
    want = model.autoencoder.decode_latents(model.autoencoder.encode_latents(image, sample=False))
    for file in (tmp_path / "vae.safetensors", path):
        ae = load_original_autoencoder(file, model.autoencoder_cfg)
        with torch.no_grad():
            torch.testing.assert_close(ae.decode_latents(ae.encode_latents(image, sample=False)), want)


# ----------------------------------------------------------------------------- safety and errors


class _RunsCode:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickle_needing_code_execution_is_refused(exported, tmp_path):
    _, _, config = exported
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _RunsCode()}, bad)
    with pytest.raises(CheckpointError, match="refused"):
        load_original_model(bad, config)


def test_truncated_file_is_a_clear_error(exported, tmp_path):
    _, path, config = exported
    cut = tmp_path / "cut.safetensors"
    data = path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_original_model(cut, config)


def test_missing_unexpected_and_misshaped_keys_are_listed(exported, tmp_path):
    model, path, config = exported
    tensors = load_file(str(path))
    del tensors["model.diffusion_model.out.2.bias"]
    save_file(tensors, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"1 missing.*model\.diffusion_model\.out\.2\.bias"):
        load_original_model(tmp_path / "missing.safetensors", config)
    tensors = load_file(str(path))
    tensors["model.diffusion_model.extra.weight"] = torch.zeros(1)
    save_file(tensors, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected.*model\.diffusion_model\.extra\.weight"):
        load_original_model(tmp_path / "extra.safetensors", config)
    wide = tmp_path / "wide.safetensors"
    export_original(tiny_model(channels=64), wide)
    with pytest.raises(CheckpointError, match=r"mis-shaped.*model\.diffusion_model\.input_blocks\.0\.0\.weight"):
        load_original_model(wide, config)


# ----------------------------------------------------------------------------- diffusers oracle


def test_diffusers_single_file_conversion_gives_the_same_unet_and_vae(exported):
    pytest.importorskip("diffusers")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )

    model, path, config = exported
    original_config = yaml.safe_load(config.read_text())
    checkpoint = load_file(str(path))
    unet_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    unet = UNet2DConditionModel(**unet_config).eval()
    unet.load_state_dict(convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    vae = AutoencoderKL(**vae_config).eval()
    vae.load_state_dict(convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)

    ours = load_original_model(path, config)
    x, t, image = inputs()
    with torch.no_grad():
        context = ours.encode_text(["a red apple", ""])
        want = unet(x, t, encoder_hidden_states=context).sample
        torch.testing.assert_close(ours(x, t, context), want, atol=1e-4, rtol=1e-4)
        mean = vae.encode(image).latent_dist.mean
        torch.testing.assert_close(ours.autoencoder.encode_latents(image, sample=False), mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours.autoencoder.decode_latents(mean), vae.decode(mean).sample, atol=1e-4, rtol=1e-4)
    assert vae_config["scaling_factor"] == 0.5 and want.abs().max() > 1e-3


# ----------------------------------------------------------------------------- CLI


def test_generate_runs_an_original_file_with_config(exported, tmp_path):
    _, path, config = exported
    args = ["a red apple", "--checkpoint", str(path), "--config", str(config), "--steps", "2", "--size", str(SIZE),
            "--sampler", "ddim", "--out", str(tmp_path / "out"), "--device", "cpu"]
    generate.main(args)
    assert len(list((tmp_path / "out").glob("00000-*-seed0.png"))) == 1
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": load_file(str(path))}, ckpt)
    with pytest.raises(ValueError, match="pass its YAML config"):
        load_model(ckpt)


# ----------------------------------------------------------------------------- variants


def test_fp16_export_loads_back_close(tmp_path):
    model = tiny_model()
    config = export_original(model, tmp_path / "half.safetensors", dtype=torch.float16)
    assert load_file(str(tmp_path / "half.safetensors"))["model.diffusion_model.out.2.weight"].dtype == torch.float16
    loaded = load_original_model(tmp_path / "half.safetensors", config)
    assert next(loaded.unet.parameters()).dtype == torch.float32
    # Measured (CPU, this tiny model): largest |difference| 1.6e-3 (U-Net output), 8.5e-4 (text context),
    # 2.3e-3 (reconstruction), on outputs up to 1.6, 2.8 and 1.3; 6e-3 leaves 2.6x headroom. Weights
    # rounded through bf16 instead (3 mantissa bits fewer) give 1.2e-2, 5.2e-3, 1.7e-2: caught here,
    # passed by the former atol = rtol = 2e-2.
    for name, a, b in zip(("unet", "context", "image"), outputs(model), outputs(loaded)):
        torch.testing.assert_close(a, b, atol=6e-3, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_schedule_mismatch_between_file_and_config_is_refused(exported, tmp_path):
    _, path, config = exported
    raw = yaml.safe_load(config.read_text())
    raw["model"]["params"]["linear_end"] = 0.02
    with pytest.raises(CheckpointError, match="alphas_cumprod"):
        load_original_model(path, raw)


def test_controlnet_ldm_config_skips_control_model_weights(exported, tmp_path):
    model, path, config = exported
    tensors = load_file(str(path))
    tensors["control_model.input_hint_block.0.weight"] = torch.zeros(16, 3, 3, 3)
    save_file(tensors, tmp_path / "control.safetensors")
    raw = yaml.safe_load(config.read_text())
    with pytest.raises(CheckpointError, match="control_model"):
        load_original_model(tmp_path / "control.safetensors", raw)
    raw["model"]["target"] = "cldm.cldm.ControlLDM"
    raw["model"]["params"]["unet_config"]["target"] = "cldm.cldm.ControlledUnetModel"
    raw["model"]["params"]["control_stage_config"] = {"target": "cldm.cldm.ControlNet", "params": {}}
    assert_same(outputs(model), outputs(load_original_model(tmp_path / "control.safetensors", raw)))


def test_vq_first_stage_round_trip(tmp_path):
    model = tiny_model(kind="vq")
    config = export_original(model, tmp_path / "vq.safetensors")
    raw = yaml.safe_load(config.read_text())
    assert raw["model"]["params"]["first_stage_config"]["target"] == "ldm.models.autoencoder.VQModelInterface"
    assert raw["model"]["params"]["first_stage_config"]["params"]["n_embed"] == 16
    loaded = load_original_model(tmp_path / "vq.safetensors", config)
    assert loaded.autoencoder_cfg.kind == "vq"
    assert_same(outputs(model), outputs(loaded))
