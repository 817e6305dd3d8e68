"""generate_latents on a tiny LatentDiffusion, and the generate.py command line."""
import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import generate
from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from autoencoder.model_file import save_autoencoder
from common.weights import CheckpointError
from conditioning import TextEncoderConfig
from ldm.generation import SamplingOptions, SizeLimits, generate_latents, read_prompt_lines
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.original_format import (CONTROL_LDM_FILE, ORIGINAL_CONTROLNET_FILE, ORIGINAL_FILE, UNKNOWN_FILE, VAE_FILE,
                                 load_model, model_file_kind)
from ldm.unet import UNetConfig

ROOT = Path(__file__).resolve().parents[1]
SIZE = 16  # pixels; the tiny autoencoder and U-Net each halve once, so sizes are multiples of 4


def tiny_model() -> LatentDiffusion:
    """A tiny text-to-image model (tests/test_bad_input.py saves it too): 4-channel latents at half the
    image size, no `image_size` in its U-Net config (so its training size is SD's default 512)."""
    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(
        z_channels=4, resolution=SIZE, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]))
    cfg = LatentDiffusionConfig(
        unet=UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                        num_head_channels=16),
        text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2))
    model = LatentDiffusion(cfg, build_autoencoder(ae_cfg), ae_cfg, scale_factor=0.5)
    # Zero-initialised output convs would make every prediction 0; random weights give real images.
    for p in model.unet.parameters():
        if p.abs().sum() == 0 and p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    tiny_model().save(path)
    return path


@pytest.fixture(scope="module")
def model(checkpoint):
    return LatentDiffusion.load(checkpoint)


def test_generate_latents_as_train_stage2_calls_it(model):
    latents = generate_latents(model, ["a red circle", "a blue square"], seed=3, sampler="ddim", steps=4,
                               guidance=5.0, height=SIZE, width=SIZE)
    assert latents.shape == (2, 4, SIZE // 2, SIZE // 2) and torch.isfinite(latents).all()
    again = generate_latents(model, ["a blue square"], seed=4, sampler="ddim", steps=4, guidance=5.0,
                             height=SIZE, width=SIZE)
    torch.testing.assert_close(latents[1:], again, rtol=1e-4, atol=1e-4)  # image i == seed + i alone


def test_negative_prompt_and_scale_one(model):
    run = lambda **kw: generate_latents(model, ["a red circle"], sampler="euler", steps=3, height=SIZE,  # noqa: E731
                                        width=SIZE, **kw)
    assert not torch.allclose(run(guidance=5.0), run(guidance=5.0, negative="blue"))
    # Scale 1 is the conditional model: the negative prompt cannot matter.
    torch.testing.assert_close(run(guidance=1.0), run(guidance=1.0, negative="blue"), rtol=0, atol=0)


def test_img2img_and_inpainting_in_latents(model):
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, SIZE, SIZE, generator=g) * 2 - 1
    encoded = model.encode_images(image, sample=False)
    same = generate_latents(model, ["x", "y"], height=SIZE, width=SIZE, init_image=image, strength=0.0, steps=5)
    torch.testing.assert_close(same, encoded.expand(2, -1, -1, -1), rtol=0, atol=0)
    mask = torch.zeros(1, 1, SIZE, SIZE)
    mask[..., 4:9, 4:12] = 1  # pixel rows 4..8 touch latent rows 2..4
    out = generate_latents(model, ["x"], height=SIZE, width=SIZE, init_image=image, mask=mask, steps=5,
                           sampler="dpmpp-2m")
    keep = torch.ones_like(out, dtype=torch.bool)
    keep[..., 2:5, 2:6] = False
    assert torch.equal(out[keep], encoded[keep])
    assert not torch.allclose(out[~keep], encoded[~keep])


def test_generate_latents_takes_an_options_object(model):
    options = SamplingOptions(sampler="euler", steps=2, guidance=3.0, seed=4, height=SIZE, width=SIZE)
    by_fields = generate_latents(model, ["a red circle"], sampler="euler", steps=2, guidance=3.0, seed=4,
                                 height=SIZE, width=SIZE)
    torch.testing.assert_close(generate_latents(model, ["a red circle"], options), by_fields, rtol=0, atol=0)
    # Fields given besides the object replace its own (and are validated again).
    torch.testing.assert_close(generate_latents(model, ["a red circle"], options, seed=4), by_fields, rtol=0, atol=0)
    with pytest.raises(ValueError, match="eta applies to the ddim sampler only"):
        generate_latents(model, ["a red circle"], options, eta=0.3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(sampler="lms"), "unknown sampler 'lms'"),
    (dict(height=18), "multiples of 4"),
    (dict(negative=["a", "b"]), "2 negative prompts for 1 prompts"),
    (dict(mask=torch.ones(1, 1, SIZE, SIZE)), "needs the init_image"),
    (dict(init_image=torch.zeros(1, 3, 8, 8)), r"init_image must be \[B, 3, 16, 16\]"),
])
def test_generate_latents_bad_input(model, kwargs, message):
    args = dict(height=SIZE, width=SIZE, steps=2) | kwargs
    with pytest.raises(ValueError, match=message):
        generate_latents(model, ["x"], **args)


# -- the command line -------------------------------------------------------------------------------


def cli(*args):
    generate.main([str(a) for a in args])


def png_text(path):
    with Image.open(path) as image:
        return dict(image.text)


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


def test_cli_writes_pngs_with_metadata_deterministically(tmp_path, checkpoint, capsys):
    common = ["a red apple", "--checkpoint", checkpoint, "--n", 2, "--steps", 3, "--size", SIZE, "--sampler", "ddim",
              "--negative", "blurry", "--cfg", 4, "--seed", 5]
    cli(*common, "--out", tmp_path / "a")
    cli(*common, "--out", tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["000-seed5.png", "000-seed6.png", "grid.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    text = png_text(tmp_path / "a" / "000-seed6.png")
    assert text["prompt"] == "a red apple" and text["negative"] == "blurry" and text["seed"] == "6"
    assert text["sampler"] == "ddim" and text["steps"] == "3" and text["guidance"] == "4.0"
    assert text["checkpoint_sha256"] == hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()[:12]
    assert json.loads(text["parameters"])["seed"] == 6
    assert pixels(tmp_path / "a" / "grid.png").shape == (SIZE, 2 * SIZE, 3)
    assert "wrote 2 images" in capsys.readouterr().out


def test_cli_batch_invariance_and_prompts_file(tmp_path, checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na blue cube\n")
    common = ["--checkpoint", checkpoint, "--steps", 2, "--size", SIZE, "--sampler", "heun"]
    cli("--prompts-file", prompts, *common, "--n", 3, "--out", tmp_path / "all")
    cli("--prompts-file", prompts, *common, "--n", 3, "--batch-size", 2, "--out", tmp_path / "split")
    cli("a blue cube", *common, "--n", 1, "--seed", 2, "--out", tmp_path / "one")
    assert len(list((tmp_path / "all").glob("*.png"))) == 7
    assert pixels(tmp_path / "all" / "grid.png").shape == (2 * SIZE, 3 * SIZE, 3)
    reference = pixels(tmp_path / "all" / "001-seed2.png")
    for other in (tmp_path / "split" / "001-seed2.png", tmp_path / "one" / "000-seed2.png"):
        assert np.abs(pixels(other) - reference).max() <= 1  # equal up to float rounding at a pixel edge
    assert not np.array_equal(pixels(tmp_path / "all" / "000-seed2.png"), reference)


def test_cli_img2img_strength_zero_round_trips(tmp_path, checkpoint, model):
    rgb = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    cli("a cat", "--checkpoint", checkpoint, "--init-image", tmp_path / "in.png", "--strength", 0,
        "--out", tmp_path / "o")
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = generate.to_uint8(model.decode_latents(model.encode_images(image, sample=False)))[0]
    assert np.abs(pixels(tmp_path / "o" / "000-seed0.png") - expected).max() <= 1
    assert png_text(tmp_path / "o" / "000-seed0.png")["strength"] == "0.0"


@pytest.fixture
def images(tmp_path):
    Image.new("RGB", (SIZE, SIZE), (200, 30, 30)).save(tmp_path / "init.png")
    Image.new("L", (SIZE + 4, SIZE), 255).save(tmp_path / "wide_mask.png")
    Image.new("RGB", (SIZE + 2, SIZE + 2)).save(tmp_path / "odd.png")
    return tmp_path


SQUARE = ["--size", SIZE]


@pytest.mark.parametrize("extra, message", [
    (["--sampler", "k_lms", *SQUARE], "unknown sampler 'k_lms'"),
    (["--size", 18], "--size must be a positive multiple of 4 for this model"),
    (["--init-image", "odd.png"], "init image odd.png is 18x18: its sides must be multiples of 4"),
    (["--init-image", "missing.png"], "init image not found"),
    (["--mask", "wide_mask.png", *SQUARE], "--mask needs --init-image"),
    (["--init-image", "init.png", "--mask", "wide_mask.png"], "mask is 20x16 but the init image is 16x16"),
    (["--init-image", "init.png", "--size", 32], "differs from the init image"),
    (["--eta", 0.5, *SQUARE], "eta applies to the ddim sampler only"),
    (["--prompts-file", "nowhere.txt", *SQUARE], "exactly one of them"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),  # argparse's errors: one line too
    (["--spacing", "cosine"], "argument --spacing: invalid choice: 'cosine'"),
    (["--cfg", "nan", *SQUARE], "--cfg must be a number in [0.0, 100.0], got nan"),
    (["--steps", 0, *SQUARE], "--steps must be positive, got 0"),
    (["--guidance-rescale", 2, *SQUARE], "--guidance-rescale must be a number in [0.0, 1.0], got 2.0"),
    (["--sampler", "ddim", "--spacing", "karras", *SQUARE],
     "--spacing 'karras' does not apply to the ddim sampler"),
    (["--sampler", "euler", "--init-image", "init.png", "--mask", "init.png", "--repaint-resamples", 2],
     "--repaint-resamples (RePaint) applies to the ddpm / ddim samplers only, got 2 with 'euler'"),
    (["--repaint-resamples", 2, *SQUARE], "--repaint-resamples (RePaint) applies to inpainting, with --mask"),
    (["--size", 4104], "--size 4104 is above this model's limit of 4096 (8x the 512 pixels it was trained at)"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(images, checkpoint, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(images)
    with pytest.raises(SystemExit) as exit_info:
        cli("a red apple", "--checkpoint", checkpoint, "--steps", 2, *extra, "--out", "out")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.startswith("error:") and message in err and "\n" not in err
    assert not (images / "out").exists()


def test_cli_missing_prompts_file(images, checkpoint, capsys, monkeypatch):
    monkeypatch.chdir(images)
    with pytest.raises(SystemExit) as exit_info:
        cli("--prompts-file", "nowhere.txt", "--checkpoint", checkpoint, "--out", "out")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: prompts file not found: nowhere.txt"
    assert not (images / "out").exists()


def test_cli_as_a_script_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "a red apple", "--checkpoint",
                             str(tmp_path / "none.safetensors"), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: checkpoint not found: {tmp_path / 'none.safetensors'}"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("failure, message", [
    (lambda latents: latents * float("nan"), "came out NaN or infinite; they were not written"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory"),
     "out of memory drawing 2 images of 16x16 pixels: lower --batch-size (now 2) or --size"),
])
def test_cli_run_failures_are_one_line_exit_1_and_write_nothing(tmp_path, checkpoint, capsys, monkeypatch,
                                                                failure, message):
    real = generate.generate_latents

    def failing(*args, **kwargs):
        if isinstance(failure, Exception):
            raise failure
        return failure(real(*args, **kwargs))

    monkeypatch.setattr(generate, "generate_latents", failing)
    with pytest.raises(SystemExit) as exit_info:
        cli("a red apple", "--checkpoint", checkpoint, "--n", 2, "--steps", 1, "--size", SIZE, "--out", tmp_path / "o")
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 1 and err[-1].startswith("error:") and message in err[-1]
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_prompts_file_is_utf8_and_a_byte_order_mark_is_no_part_of_the_first_prompt(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffcaf\u00e9\n\nteapot\n".encode("utf-8"))
    assert read_prompt_lines(tmp_path / "bom.txt") == ["caf\u00e9", "teapot"]
    (tmp_path / "latin1.txt").write_bytes("teapot\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 0xe9 on line 2\)"):
        read_prompt_lines(tmp_path / "latin1.txt")


def test_size_limits_from_the_configs(model):
    limits = SizeLimits.of(model.cfg, model.autoencoder_cfg)
    assert (limits.multiple, limits.training_size, limits.largest) == (4, 512, 4096)
    with_size = SizeLimits.of(dataclasses.replace(model.cfg, unet=dataclasses.replace(model.cfg.unet, image_size=6)),
                              model.autoencoder_cfg)
    assert (with_size.training_size, with_size.largest) == (12, 96)  # 6 latent pixels at factor 2; 8 x 12
    with pytest.raises(ValueError, match=r"^--size 100 is above this model's limit of 96 \(8x the 12 pixels"):
        with_size.check(100)


@pytest.mark.parametrize("keys, kind", [
    (["model.diffusion_model.out.0.weight", "first_stage_model.decoder.conv_out.weight"], ORIGINAL_FILE),
    (["model.diffusion_model.out.0.weight", "control_model.input_hint_block.0.weight"], CONTROL_LDM_FILE),
    (["control_model.input_hint_block.0.weight"], ORIGINAL_CONTROLNET_FILE),
    (["input_hint_block.0.weight", "zero_convs.0.0.weight"], ORIGINAL_CONTROLNET_FILE),
    (["encoder.conv_in.weight", "decoder.conv_out.weight"], VAE_FILE),
    (["down_blocks.0.resnets.0.conv1.weight"], UNKNOWN_FILE),  # e.g. a diffusers U-Net
])
def test_original_files_are_told_by_their_keys(tmp_path, keys, kind):
    path = tmp_path / "weights.safetensors"
    save_file({key: torch.zeros(1) for key in keys}, str(path), metadata={"format": "pt"})
    assert model_file_kind(path) == kind
    torch.save({"state_dict": {key: torch.zeros(1) for key in keys}}, tmp_path / "weights.ckpt")
    assert model_file_kind(tmp_path / "weights.ckpt") == kind


def test_load_model_names_a_file_that_holds_no_model(tmp_path, model):
    save_autoencoder(model.autoencoder, model.autoencoder_cfg, tmp_path / "ae.safetensors", 0.5)
    with pytest.raises(CheckpointError, match="ae.safetensors is a stage-1 autoencoder file written by "
                                              "train_stage1.py; a text-to-image model is a stage-2 model file"):
        load_model(tmp_path / "ae.safetensors")


def test_every_image_seed_of_a_batch_must_fit_the_generator(model):
    with pytest.raises(ValueError, match=r"seed 18446744073709551615 \+ 1 \(the batch's last image\) is past 2\*\*64"):
        generate_latents(model, ["x", "y"], seed=2**64 - 1, steps=1, height=SIZE, width=SIZE)
