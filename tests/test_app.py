"""The web UI's parts without a browser (tests/test_app_browser.py drives the page): a PNG's settings as
field values, the mask drawn in the editor, the Canny preview, output names, the flags, and the handlers
called directly (step progress, messages for bad input, the files the gallery serves, the LoRA choice: the
Pipeline's pixels at its scale, and read back from a PNG).

The LoRA is a random one on the shipped default model (tests/test_generate_lora.py's `random_lora`), in a
models folder of its own beside links to the shipped files."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from ldm import Pipeline, save_image
from ldm.app import cli
from ldm.app.fields import (canny_preview, editor_images, next_output_paths, settings_from_png, shipped_controlnets,
                            shipped_loras, shipped_models)
from ldm.app.ui import CUSTOM_LORA, CUSTOM_MODEL, NO_LORA, Studio, page_message, size_keywords
from ldm.lora_files import write_lora
from ldm.original_format import export_original
from ldm.png_metadata import image_text
from ldm.request import condition_tensor
from test_generate import SIZE, tiny_model
from test_generate_lora import random_lora

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default" / "model.safetensors"
LORA_CHOICE = "default/lora-test.safetensors"


def a1111_png(path: Path, parameters: str) -> Path:
    info = PngInfo()
    info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.fixture(scope="module")
def studio(tmp_path_factory) -> Studio:
    args = cli.parse_args(["--outdir", str(tmp_path_factory.mktemp("ui-out"))])
    return Studio(args)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """models/default's model and ControlNet (links) with a random LoRA for the model, lora-test.safetensors."""
    folder = tmp_path_factory.mktemp("models")
    (folder / "default").mkdir()
    for name in ("model.safetensors", "controlnet-canny.safetensors"):
        (folder / "default" / name).symlink_to(MODEL.parent / name)
    model = Pipeline.from_file(MODEL).model
    write_lora(random_lora(model, 7), folder / "default" / "lora-test.safetensors", model, "kohya")
    return folder


@pytest.fixture(scope="module")
def lora_studio(models_dir, tmp_path_factory) -> Studio:
    args = cli.parse_args(["--models-dir", str(models_dir), "--outdir", str(tmp_path_factory.mktemp("ui-out"))])
    return Studio(args)


# -- a PNG's settings as field values -------------------------------------------------------------------

def test_a_png_made_here_fills_every_field(tmp_path):
    image = Pipeline.from_file(MODEL)("fire", negative_prompt="smoke", sampler="euler", steps=2, guidance=4.5,
                                      seed=11)[0]
    save_image(image, tmp_path / "ours.png")
    settings = settings_from_png(tmp_path / "ours.png")
    assert settings.values == {"prompt": "fire", "negative_prompt": "smoke", "sampler": "euler", "steps": 2,
                               "guidance": 4.5, "seed": 11, "width": 64, "height": 64, "lora": ""}
    assert settings.parameters == image.info["parameters"]
    assert any("model.safetensors" in note for note in settings.notes)


def test_an_a1111_png_fills_the_fields_it_has(tmp_path):
    path = a1111_png(tmp_path / "a.png", 'a "cat", on a mat\nNegative prompt: blurry\nSteps: 30, Sampler: DPM++ 2M '
                     "Karras, CFG scale: 7.5, Seed: 42, Size: 512x768, Denoising strength: 0.4, Clip skip: 2")
    settings = settings_from_png(path)
    assert settings.values == {"prompt": 'a "cat", on a mat', "negative_prompt": "blurry", "sampler": "dpmpp-2m",
                               "steps": 30, "guidance": 7.5, "seed": 42, "strength": 0.4, "width": 512,
                               "height": 768, "lora": ""}
    assert settings.notes == ["not reproduced: Clip skip: 2"]


def test_an_a1111_sampler_without_counterpart_keeps_the_current_one(tmp_path):
    settings = settings_from_png(a1111_png(tmp_path / "u.png", "x\nSteps: 20, Sampler: UniPC, Seed: 1"))
    assert "sampler" not in settings.values and settings.values["steps"] == 20
    assert any("UniPC" in note for note in settings.notes)


@pytest.mark.parametrize("content, message", [(b"not a png", "cannot read image"), (None, "no generation parameters")])
def test_a_png_without_settings_is_one_line(tmp_path, content, message):
    path = tmp_path / "x.png"
    if content is None:
        Image.new("RGB", (4, 4)).save(path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as error:
        settings_from_png(path)
    assert "\n" not in str(error.value) and "--from-png" not in str(error.value)


# -- images: the editor's mask, the Canny preview, output names ------------------------------------------

def test_the_painted_layers_are_the_mask():
    background = Image.new("RGBA", (8, 6), (10, 20, 30, 255))
    layer = np.zeros((6, 8, 4), np.uint8)
    layer[1:3, 2:5, 3] = 200  # painted: any alpha
    other = np.zeros((6, 8, 4), np.uint8)
    other[5, 7, 3] = 1
    image, mask = editor_images({"background": background, "layers": [Image.fromarray(layer), Image.fromarray(other)],
                                 "composite": None})
    expected = np.zeros((6, 8), np.uint8)
    expected[1:3, 2:5] = expected[5, 7] = 255
    assert image.mode == "RGB" and np.array_equal(np.asarray(mask), expected)
    assert editor_images({"background": background, "layers": [Image.new("RGBA", (8, 6))]})[1] is None
    assert editor_images(None) == (None, None)


def test_the_preview_is_the_condition_the_controlnet_gets(tmp_path):
    pixels = np.zeros((32, 32, 3), np.uint8)
    pixels[8:24, 10:20] = (200, 120, 30)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    edges = canny_preview(str(tmp_path / "p.png"), 50, 150)
    hint = condition_tensor(str(tmp_path / "p.png"), "canny", (50, 150))
    assert edges.any() and np.array_equal(edges, (hint[0, 0].numpy() * 255).astype(np.uint8))
    (tmp_path / "n.png").write_text("no image")
    with pytest.raises(ValueError, match="cannot read control image"):
        canny_preview(str(tmp_path / "n.png"), 50, 150)


def test_output_names_go_on_from_the_highest_number(tmp_path):
    assert [p.name for p in next_output_paths(tmp_path, "A cat, on a MAT!", [3, 4])] == [
        "00000-a-cat-on-a-mat-seed3.png", "00001-a-cat-on-a-mat-seed4.png"]
    (tmp_path / "00041-x-seed0.png").touch()
    assert next_output_paths(tmp_path, "", [0])[0].name == "00042-image-seed0.png"


def test_shipped_models_are_found():
    assert shipped_models(ROOT / "models")["default"] == str(MODEL)
    assert "default/controlnet-canny.safetensors" in shipped_controlnets(ROOT / "models")


def test_the_lora_choices_are_the_lora_files(models_dir, lora_studio):
    assert shipped_loras(models_dir) == {LORA_CHOICE: str(models_dir / "default" / "lora-test.safetensors")}
    assert lora_studio.lora_choices() == [NO_LORA, LORA_CHOICE, CUSTOM_LORA]
    assert all(Path(path).name.startswith("lora") for path in shipped_loras(ROOT / "models").values())


# -- flags --------------------------------------------------------------------------------------------

def test_flags_default_to_localhost_and_the_shipped_model():
    args = cli.parse_args([])
    assert (args.host, args.port, args.share, args.model, args.config) == ("127.0.0.1", 7860, False, str(MODEL), None)
    args = cli.parse_args(["--host", "0.0.0.0", "--port", "0", "--share"])
    assert (args.host, args.port, args.share) == ("0.0.0.0", 0, True)


@pytest.mark.parametrize("flags, message", [
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--model", "missing.safetensors"], "not found: missing.safetensors"),
    (["--model", str(ROOT / "models" / "default" / "controlnet-canny.safetensors")], "is a ControlNet"),
    (["--models-dir", "nowhere"], "--models-dir not found"),
])
def test_bad_flags_are_one_line_before_gradio_starts(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_code:
        cli.main(flags)
    err = capsys.readouterr().err
    assert exit_code.value.code == 2 and message in err and err.count("\n") == 1


def test_size_fields():
    assert size_keywords(0, 0) == {} and size_keywords(None, None) == {}
    assert size_keywords(32, 0) == {"width": 32, "height": 32}
    assert size_keywords(32, 48) == {"width": 32, "height": 48}


# -- the handlers, called as gradio calls them -----------------------------------------------------------

class Progress:
    """Records what a handler reports (gr.Progress's call)."""

    def __init__(self):
        self.calls = []

    def __call__(self, value, desc=None, **kwargs):
        self.calls.append(value)


def run(studio: Studio, mode="text to image", progress=None, **changes):
    """Studio.generate with the page's defaults and `changes`."""
    values = dict(mode=mode, model="default", model_path="", config="", prompt="fire", negative="",
                  sampler="dpmpp-2m", steps=3, guidance=3.0, seed=5, count=2, width=0, height=0, init_image=None,
                  strength=0.6, editor=None, mask_file=None, controlnet=None, control_file=None, canny_low=100,
                  canny_high=200, control_scale=1.0, lora=NO_LORA, lora_path="", lora_scale=1.0)
    values.update(changes)
    return studio.generate(**values, progress=progress or Progress())


def test_generate_reports_every_step_and_serves_the_pipelines_files(studio):
    progress = Progress()
    gallery, info = run(studio, progress=progress)
    assert progress.calls == [0] + [(k, 3) for k in range(1, 4)]  # 3 steps: both images in one batch
    expected = Pipeline.from_file(MODEL)("fire", steps=3, seed=5, num_images=2)
    for (path, caption), image, seed in zip(gallery, expected, (5, 6)):
        with Image.open(path) as written:
            assert np.array_equal(np.asarray(written), np.asarray(image)) and dict(written.text) == image_text(image)
        assert caption == f"seed {seed}"
    assert info == expected[0].info["parameters"]


def test_random_seed_is_recorded(studio):
    gallery, info = run(studio, seed=-1, count=1, steps=1)
    seed = int(gallery[0][1].split()[1])
    assert f"Seed: {seed}," in info and 0 <= seed < 2**31


@pytest.mark.parametrize("changes, message", [
    (dict(sampler="nope"), "unknown sampler 'nope'"),
    (dict(mode="image to image"), "upload an init image"),
    (dict(mode="inpainting", editor={"background": Image.new("RGBA", (64, 64)), "layers": []}), "paint the part"),
    (dict(mode="ControlNet", controlnet="default/controlnet-canny.safetensors"), "upload a control image"),
    (dict(model=CUSTOM_MODEL, model_path="nowhere.safetensors"), "not found: nowhere.safetensors"),
    (dict(width=30), "multiple of"),
    (dict(lora=CUSTOM_LORA, lora_path="nowhere.safetensors"), "LoRA file not found: nowhere.safetensors"),
    (dict(lora=CUSTOM_LORA, lora_path=str(MODEL)), "model.safetensors is .*takes LoRA files"),
    (dict(lora=CUSTOM_LORA, lora_path=" "), "choose a LoRA, or give a LoRA file's path"),
])
def test_bad_input_is_a_message_in_the_page(studio, changes, message):
    with pytest.raises(gr.Error, match=message):
        run(studio, **changes)


def test_a_mask_of_another_size_is_a_message(studio, tmp_path):
    Image.new("L", (32, 64), 255).save(tmp_path / "mask.png")
    editor = {"background": Image.new("RGBA", (64, 64), (0, 0, 0, 255)), "layers": []}
    with pytest.raises(gr.Error, match="mask is 32x64 but the init image is 64x64"):
        run(studio, mode="inpainting", editor=editor, mask_file=str(tmp_path / "mask.png"))


def test_inpainting_draws_with_the_painted_mask(studio):
    """The painted layer becomes Pipeline's mask (white = repaint) over the editor's background."""
    rng = np.random.default_rng(0)
    background = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    layer = np.zeros((64, 64, 4), np.uint8)
    layer[16:32, 16:48] = (255, 255, 255, 255)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:32, 16:48] = 255
    gallery, _ = run(studio, mode="inpainting", count=1, steps=4,
                     editor={"background": background.convert("RGBA"), "layers": [Image.fromarray(layer)]})
    expected = Pipeline.from_file(MODEL)("fire", init_image=background, mask=Image.fromarray(mask), steps=4, seed=5)
    with Image.open(gallery[0][0]) as out:
        assert np.array_equal(np.asarray(out), np.asarray(expected[0]))


def test_upload_paths_are_named_by_file_name():
    upload = "/tmp/gradio/abc/notes.png"
    error = ValueError(f"cannot read control image {upload}: cannot identify '{upload}'")
    assert page_message(error, None, upload) == "cannot read control image notes.png: cannot identify 'notes.png'"


def test_read_png_fills_fields_and_leaves_the_others(studio, tmp_path):
    updates = studio.read_png(str(a1111_png(tmp_path / "a.png", "a cat\nSteps: 9, Sampler: Euler, Seed: 3")))
    values = [u.get("value", "unchanged") for u in updates[:-1]]
    assert values == ["a cat", "", "euler", 9, "unchanged", 3, "unchanged", "unchanged", "unchanged", NO_LORA, "",
                      "unchanged"]
    assert updates[-1].startswith("a cat\nSteps: 9")
    Image.new("RGB", (4, 4)).save(tmp_path / "plain.png")
    with pytest.raises(gr.Error, match="plain.png holds no generation parameters"):
        studio.read_png(str(tmp_path / "plain.png"))


# -- the LoRA choice -------------------------------------------------------------------------------------

def drawn(gallery) -> np.ndarray:
    with Image.open(gallery[0][0]) as image:
        return np.asarray(image)


@pytest.mark.parametrize("scale", [0.7, 1.3])  # in this order: the second draws after the first is loaded
def test_a_lora_draws_the_pipelines_pixels_at_its_scale(lora_studio, models_dir, scale):
    gallery, info = run(lora_studio, lora=LORA_CHOICE, lora_scale=scale, count=1, steps=2)
    file = models_dir / "default" / "lora-test.safetensors"
    expected = Pipeline.from_file(MODEL, loras=[(file, scale)])("fire", steps=2, seed=5)[0]
    assert np.array_equal(drawn(gallery), np.asarray(expected)) and info == expected.info["parameters"]
    assert f"<lora:lora-test:{scale:g}>" in info
    base = Pipeline.from_file(MODEL)("fire", steps=2, seed=5)[0]
    assert not np.array_equal(drawn(gallery), np.asarray(base))


def test_a_lora_file_by_its_path_at_scale_0_draws_the_base_model(lora_studio, models_dir):
    file = str(models_dir / "default" / "lora-test.safetensors")
    gallery, info = run(lora_studio, lora=CUSTOM_LORA, lora_path=file, lora_scale=0, count=1, steps=2)
    none, _ = run(lora_studio, count=1, steps=2)
    assert np.array_equal(drawn(gallery), drawn(none)) and "<lora:lora-test:0>" in info


def test_read_png_fills_the_lora_found_in_the_models_folder(lora_studio, models_dir, tmp_path):
    file = models_dir / "default" / "lora-test.safetensors"
    image = Pipeline.from_file(MODEL, loras=[(file, 0.6)])("fire", steps=1, seed=2)[0]
    save_image(image, tmp_path / "ours.png")
    a1111_png(tmp_path / "a.png", "a cat <lora:lora-test:1.4>\nSteps: 9, Sampler: Euler, Seed: 3")
    a1111_png(tmp_path / "b.png", "a cat <lora:elsewhere:0.5>\nSteps: 9, Sampler: Euler, Seed: 3")
    a1111_png(tmp_path / "c.png", "a cat\nSteps: 9, Sampler: Euler, Seed: 3")
    fields = {}
    for name in ("ours", "a", "b", "c"):
        updates = lora_studio.read_png(str(tmp_path / f"{name}.png"))
        fields[name] = [u.get("value", "unchanged") for u in updates[-4:-1]] + [updates[0].get("value")]
    assert fields["ours"] == [LORA_CHOICE, "", 0.6, "fire"]
    assert fields["a"] == [LORA_CHOICE, "", 1.4, "a cat"]
    assert fields["b"] == ["unchanged", "unchanged", "unchanged", "a cat"]  # not found: the choice is kept
    assert "LoRA elsewhere (scale 0.5) not found" in lora_studio.read_png(str(tmp_path / "b.png"))[-1]
    assert fields["c"] == [NO_LORA, "", "unchanged", "a cat"]  # drawn without a LoRA


def test_a_lora_outside_the_models_folder_fills_the_path_box(lora_studio, models_dir, tmp_path):
    file = tmp_path / "mine.safetensors"
    file.write_bytes((models_dir / "default" / "lora-test.safetensors").read_bytes())
    png = a1111_png(tmp_path / "a.png", "x <lora:mine:0.3> <lora:lora-test:1>\nSteps: 9, Sampler: Euler, Seed: 3")
    settings = settings_from_png(png, [tmp_path])
    assert (settings.values["lora"], settings.values["lora_scale"]) == (str(file), 0.3)
    assert any("the page draws with one, mine" in note for note in settings.notes)
    assert lora_studio.lora_fields(str(file)) == (CUSTOM_LORA, str(file))


def test_an_original_format_file_with_its_yaml_draws_the_pipelines_pixels(studio, tmp_path):
    """A model given by path as an original SD / LDM checkpoint with its inference YAML (random weights of
    a tiny SD-style config): the page draws what Pipeline.from_file(path, config) draws, at the size asked."""
    config = export_original(tiny_model(), tmp_path / "original.safetensors")
    gallery, _ = run(studio, model=CUSTOM_MODEL, model_path=str(tmp_path / "original.safetensors"),
                     config=str(config), count=1, steps=2, width=SIZE, height=SIZE)
    expected = Pipeline.from_file(tmp_path / "original.safetensors", config)("fire", steps=2, seed=5, size=SIZE)
    assert drawn(gallery).shape == (SIZE, SIZE, 3)
    assert np.array_equal(drawn(gallery), np.asarray(expected[0]))
