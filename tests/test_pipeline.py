"""`ldm.Pipeline` (issue 22): the images and PNG text chunks generate.py writes for the same settings, the
step callback, one-line errors for bad input, and README's "Python API" example on the shipped model."""
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import generate
from ldm import ControlNet, Pipeline, save_image
from ldm.controlnet import save_controlnet
from ldm.original_format import export_original
from ldm.png_metadata import RECORD_KEY, image_text, read_png_record
from test_generate import SIZE, tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "default" / "model.safetensors"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny model (ours and exported to the original format), a ControlNet on it whose zero convs are
    made non-zero (so the condition changes the image), and input images."""
    folder = tmp_path_factory.mktemp("pipeline")
    model = tiny_model()
    model.save(folder / "model.safetensors")
    config = export_original(model, folder / "original.safetensors")
    net = ControlNet.from_unet(model.unet, latent_factor=2)
    torch.manual_seed(1)
    for p in net.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    save_controlnet(folder / "controlnet.safetensors", net)
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(folder / "init.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4:12, 2:10] = 255
    Image.fromarray(mask).save(folder / "mask.png")
    photo = np.zeros((SIZE, SIZE, 3), np.uint8)
    photo[3:13, 5:11] = 255
    Image.fromarray(photo).save(folder / "photo.png")
    Image.new("L", (SIZE + 4, SIZE), 255).save(folder / "wide_mask.png")
    (folder / "notes.png").write_text("not an image")
    return {"model": folder / "model.safetensors", "original": folder / "original.safetensors", "config": config,
            "controlnet": folder / "controlnet.safetensors", "init": folder / "init.png", "mask": folder / "mask.png",
            "photo": folder / "photo.png", "wide_mask": folder / "wide_mask.png", "notes": folder / "notes.png"}


@pytest.fixture(scope="module")
def pipe(files) -> Pipeline:
    return Pipeline.from_file(files["model"])


def cli_files(folder: Path, prompt: str | None, *flags) -> list[Path]:
    """generate.py's image files for these flags, in seed order (the grid left out)."""
    generate.main([*([prompt] if prompt is not None else []), *map(str, flags), "--out", str(folder), "--overwrite"])
    return sorted(folder.glob("000-seed*.png"), key=lambda p: int(re.search(r"seed(\d+)", p.name).group(1)))


def assert_same_as_files(images: list[Image.Image], paths: list[Path]) -> None:
    """The pipeline's images have generate.py's pixels, text chunks and, saved, its bytes."""
    assert len(images) == len(paths) > 0
    for image, path in zip(images, paths):
        with Image.open(path) as written:
            assert np.array_equal(np.asarray(image), np.asarray(written)), path.name
            assert image_text(image) == dict(written.text), path.name
        buffer = io.BytesIO()
        save_image(image, buffer)
        assert buffer.getvalue() == path.read_bytes(), path.name


# Each case: the model files to load, Pipeline keywords, and generate.py's flags for the same settings.
CASES = {
    "text-to-image": ({}, dict(negative_prompt="blurry", sampler="ddim", eta=0.3, steps=3, guidance=4.0,
                               guidance_rescale=0.5, seed=5, num_images=3, batch_size=2, size=SIZE),
                      ["--negative", "blurry", "--sampler", "ddim", "--eta", 0.3, "--steps", 3, "--cfg", 4,
                       "--guidance-rescale", 0.5, "--seed", 5, "--n", 3, "--batch-size", 2, "--size", SIZE]),
    "spacing and size": ({}, dict(sampler="heun", spacing="trailing", steps=2, seed=1, size=2 * SIZE),
                         ["--sampler", "heun", "--spacing", "trailing", "--steps", 2, "--seed", 1,
                          "--size", 2 * SIZE]),
    "img2img": ({}, dict(init_image="init", strength=0.5, sampler="euler", steps=4, seed=2),
                ["--init-image", "init", "--strength", 0.5, "--sampler", "euler", "--steps", 4, "--seed", 2]),
    "inpainting": ({}, dict(init_image="init", mask="mask", sampler="ddpm", steps=4, repaint_resamples=2,
                            repaint_jump=2, num_images=2),
                   ["--init-image", "init", "--mask", "mask", "--sampler", "ddpm", "--steps", 4,
                    "--repaint-resamples", 2, "--repaint-jump", 2, "--n", 2]),
    "controlnet": (dict(controlnets=["controlnet"]),
                   dict(control_image="photo", control="canny", control_scale=0.7, canny_low=50, canny_high=150,
                        steps=2, guess_mode=True),
                   ["--controlnet", "controlnet", "--control-image", "photo", "--control", "canny",
                    "--control-scale", 0.7, "--canny-low", 50, "--canny-high", 150, "--steps", 2, "--guess-mode"]),
    "original format": (dict(checkpoint="original", config="config"), dict(steps=2, size=SIZE, seed=3),
                        ["--steps", 2, "--size", SIZE, "--seed", 3]),
}


def resolve(value, files):
    """A case's file names as paths (strings; other values as they are)."""
    if isinstance(value, list):
        return [resolve(v, files) for v in value]
    return str(files[value]) if isinstance(value, str) and value in files else value


@pytest.mark.parametrize("case", CASES)
def test_pipeline_draws_what_generate_writes(files, pipe, tmp_path, case):
    loads, keywords, flags = CASES[case]
    loads = {key: resolve(value, files) for key, value in loads.items()}
    keywords = {key: resolve(value, files) for key, value in keywords.items()}
    checkpoint = loads.pop("checkpoint", str(files["model"]))
    this = pipe if not loads and checkpoint == str(files["model"]) else Pipeline.from_file(checkpoint, **loads)
    cli_flags = ["--checkpoint", checkpoint, *resolve(flags, files)]
    if "config" in loads:
        cli_flags += ["--config", loads["config"]]
    images = this("a red apple", **keywords)
    assert_same_as_files(images, cli_files(tmp_path, "a red apple", *cli_flags))
    assert all(image.size == (keywords.get("size", SIZE),) * 2 for image in images)


def test_control_changes_the_image(files, tmp_path):
    """The ControlNet case above compares something: the condition's weight moves pixels."""
    controlled = Pipeline.from_file(files["model"], controlnets=[files["controlnet"]])
    run = lambda scale: np.asarray(controlled("x", control_image=files["photo"], control_scale=scale,  # noqa: E731
                                              steps=2)[0], dtype=np.int16)
    assert np.abs(run(1.0) - run(0.0)).max() > 0


def test_pil_images_give_what_their_files_give(files, pipe):
    with Image.open(files["init"]) as init, Image.open(files["mask"]) as mask:
        from_pil = pipe("a cat", init_image=init, mask=mask, steps=3, sampler="ddim")[0]
    from_paths = pipe("a cat", init_image=files["init"], mask=files["mask"], steps=3, sampler="ddim")[0]
    assert np.array_equal(np.asarray(from_pil), np.asarray(from_paths))
    assert image_text(from_pil) == image_text(from_paths)  # the record names the files PIL read them from
    unnamed = Image.fromarray(np.asarray(Image.open(files["init"])))
    record = pipe("a cat", init_image=unnamed, strength=0.0, steps=3)[0].info[RECORD_KEY]
    assert '"init_image": "(PIL image)"' in record


def test_images_carry_their_settings_for_from_png(files, pipe, tmp_path):
    """A saved pipeline image is a --from-png source like generate.py's own files."""
    image = pipe(["fire", "a red apple"], steps=2, seed=9, sampler="euler", num_images=2, size=SIZE)[3]
    save_image(image, tmp_path / "api.png")
    fields = read_png_record(str(tmp_path / "api.png")).fields
    assert (fields["prompt"], fields["seed"], fields["sampler"], fields["steps"]) == ("a red apple", 10, "euler", 2)
    (again,) = cli_files(tmp_path / "again", None, "--from-png", tmp_path / "api.png", "--checkpoint", files["model"])
    assert again.read_bytes() == (tmp_path / "api.png").read_bytes()


# -- the step callback ----------------------------------------------------------------------------------

@pytest.mark.parametrize("keywords, per_batch", [
    (dict(sampler="dpmpp-2m", steps=3), 3),
    (dict(sampler="heun", steps=3), 3),  # two network calls per step, one callback
    (dict(sampler="plms", steps=4), 4),
    (dict(sampler="ddim", steps=7), 8),  # LDM's uniform spacing, 1000 // 7 = 142 apart: 995, 853 .. 1 -> 8 levels
    (dict(sampler="euler", steps=4, init_image="init", strength=0.5), 2),
    (dict(sampler="euler", steps=4, init_image="init", strength=0.0), 0),
    # RePaint, 4 steps, jump 2, one resample: levels 0 1 2 3 (up to 1) 2 3 4 -> 6 steps down
    (dict(sampler="ddpm", steps=4, init_image="init", mask="mask", repaint_resamples=2, repaint_jump=2), 6),
])
def test_callback_once_per_step_with_the_total(files, pipe, keywords, per_batch):
    calls = []
    keywords = {key: resolve(value, files) for key, value in keywords.items()}
    if "init_image" not in keywords:
        keywords["size"] = SIZE  # the tiny model's default is SD's 512
    images = pipe(["a", "b"], num_images=3, batch_size=2, callback=lambda step, total: calls.append((step, total)),
                  **keywords)
    total = per_batch * 2 * 2  # 2 prompts x 2 batches (2 + 1 images)
    assert len(images) == 6
    assert calls == [(step, total) for step in range(total)]


# -- bad input ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keywords, error, message", [
    (dict(sampler="k_lms"), ValueError, "unknown sampler 'k_lms'"),
    (dict(init_image="init", mask="wide_mask"), ValueError, "mask is 20x16 but the init image is 16x16"),
    (dict(init_image="notes"), ValueError, "cannot read image {notes}: cannot identify image file"),
    (dict(init_image="missing.png"), FileNotFoundError, "init image not found: missing.png"),
    (dict(init_image=np.zeros((SIZE, SIZE, 3))), TypeError, "init image must be a PIL image or a file path, got "
                                                            "ndarray"),
    (dict(mask="mask"), ValueError, "mask needs init_image (the image to inpaint)"),
    (dict(control_image="photo"), ValueError, "give one control_image per ControlNet (got 1 images for 0 "
                                              "ControlNets)"),
    (dict(size=18), ValueError, "size must be a positive multiple of 4 for this model"),
    (dict(height=16), ValueError, "give both height and width (or size)"),
    (dict(guidance=float("nan")), ValueError, "guidance must be a number in [0.0, 100.0], got nan"),
    (dict(negative_prompt=3), ValueError, "negative_prompt must be a prompt or a list of prompts, got 3"),
    (dict(num_images=0), ValueError, "num_images must be positive, got 0"),
    (dict(seed=-1), ValueError, "seed must be an integer in [0, 2**64 - 1], got -1"),
])
def test_bad_input_is_a_one_line_error_before_any_step(files, pipe, keywords, error, message):
    calls = []
    keywords = {key: resolve(value, files) for key, value in keywords.items()}
    if not {"size", "height", "init_image"} & set(keywords):
        keywords["size"] = SIZE
    with pytest.raises(error) as info:
        pipe("a red apple", steps=2, callback=lambda step, total: calls.append(step), **keywords)
    text = str(info.value)
    assert type(info.value) is error and text.startswith(message.format(**files)) and "\n" not in text
    assert not calls


@pytest.mark.parametrize("checkpoint, loads, message", [
    ("controlnet", {}, "is a ControlNet file written by train_controlnet.py; pass it with controlnets=[...] (and the model it "
     "controls as the checkpoint)"),
    ("model", dict(controlnets=["model"]), "pass it with the checkpoint (controlnets=[...] takes a ControlNet file"),
    ("missing.safetensors", {}, "checkpoint not found: missing.safetensors"),
])
def test_bad_model_files_are_one_line_errors(files, checkpoint, loads, message):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        Pipeline.from_file(resolve(checkpoint, files), **{k: resolve(v, files) for k, v in loads.items()})
    assert message in str(info.value) and "\n" not in str(info.value)


# -- README ---------------------------------------------------------------------------------------------

def readme_api_example() -> str:
    """The code block of README's "Python API" subsection."""
    section = (ROOT / "README.md").read_text().split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_writes_what_generate_writes(tmp_path, monkeypatch):
    code = readme_api_example()
    assert len(code.strip().splitlines()) <= 6 and "Pipeline.from_file" in code
    (tmp_path / "models").symlink_to(ROOT / "models")  # the example's relative model path
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    made = sorted(tmp_path.glob("*.png"))
    prompt, steps, seed, count = re.search(r'pipe\("([^"]+)", steps=(\d+), seed=(\d+), num_images=(\d+)\)',
                                           code).groups()
    assert len(made) == int(count)
    expected = cli_files(tmp_path / "cli", prompt, "--checkpoint", DEFAULT_MODEL, "--steps", steps, "--seed", seed,
                         "--n", count)
    assert [p.read_bytes() for p in made] == [p.read_bytes() for p in expected]
