"""LoRAs in generate.py (--lora PATH[:SCALE], --lora-merge, --lora-allow-partial) and `Pipeline.from_file(loras=)`:
the same bytes either way, unmerged = merged (`python -m ldm.lora merge`), stacking, scale 0, one-line
errors before anything is written, and the LoRAs in the PNG (our JSON, A1111's tags and "Lora hashes")
brought back by --from-png.

The LoRAs are random ones on a tiny model (tests/test_generate.py's), adapting every linear and conv
layer of its U-Net and text encoder; written by `ldm.lora_files.write_lora` in both formats.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from safetensors.torch import load_file, save_file

import generate
import ldm.lora
import ldm.pipeline
from ldm import Pipeline, save_image
from ldm.lora import LoRA, LoRALayer, model_parts, write_lora
from ldm.latent_diffusion import LatentDiffusion
from ldm.lora_keys import TargetTable
from ldm.pipeline_lora import LoRASpec, parse_lora_arg
from ldm.unet import UNetModel
from test_generate import SIZE, a1111_parse_generation_parameters, tiny_model
from test_pipeline import DEFAULT_MODEL, ROOT

PROMPT = "a red apple"
RUN = ["--steps", "3", "--size", str(SIZE), "--seed", "5", "--n", "2"]
KEYWORDS = dict(steps=3, size=SIZE, seed=5, num_images=2)


def random_lora(parts, seed: int, rank: int = 4, part: str | None = None) -> LoRA:
    """Random down / up (std 0.15) for every adaptable layer of `parts` (only those of `part` if given),
    alpha = rank + 1 so that alpha / rank is not 1."""
    g = torch.Generator().manual_seed(seed)
    lora = LoRA(source=f"random-{seed}")
    for name, target in TargetTable(model_parts(parts)).targets.items():
        if part is None or name.startswith(part + "."):
            w = target.module.weight
            down = torch.randn(rank, *w.shape[1:], generator=g) * 0.15
            up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.15
            lora.layers[name] = LoRALayer(down, up, float(rank + 1))
    return lora


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The model, LoRAs on it (kohya, PEFT, text-encoder only), one for a wider model, one with keys
    of no layer, and a file that is no LoRA."""
    folder = tmp_path_factory.mktemp("lora")
    model = tiny_model()
    (folder / "model").mkdir()  # a folder of its own: --from-png looks for LoRAs beside the checkpoint too
    model.save(folder / "model" / "model.safetensors")
    write_lora(random_lora(model, 1), folder / "style.safetensors", model, "kohya")
    write_lora(random_lora(model, 2, rank=2), folder / "detail.safetensors", model, "peft")
    write_lora(random_lora(model, 3, part="text_encoder"), folder / "words.safetensors", model, "kohya")
    wide = UNetModel(dataclasses.replace(model.unet.config, model_channels=64))
    write_lora(random_lora({"unet": wide}, 4), folder / "wide.safetensors", wide, "kohya")
    tensors = load_file(str(folder / "style.safetensors"))
    tensors |= {"lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 8),
                "lora_unet_not_a_layer.lora_up.weight": torch.zeros(8, 2),
                "lora_unet_not_a_layer.alpha": torch.tensor(2.0)}
    save_file(tensors, str(folder / "extra.safetensors"))
    return {"model": folder / "model" / "model.safetensors",
            **{name: folder / f"{name}.safetensors" for name in ("style", "detail", "words", "wide", "extra")}}


def cli(folder: Path, *flags, prompt: str | None = PROMPT) -> list[Path]:
    """generate.py's images for these flags (--overwrite names, seed order)."""
    generate.main([*([prompt] if prompt else []), *map(str, flags), "--out", str(folder), "--overwrite"])
    return sorted(folder.glob("000-seed*.png"))


def cli_error(capsys, *flags) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        generate.main([PROMPT, *map(str, flags)])
    return info.value.code, capsys.readouterr().err


def pixels(source) -> np.ndarray:
    with Image.open(source) as image:
        return np.asarray(image, dtype=np.int16)


def record(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["ldm-generation"])


@pytest.fixture(scope="module")
def base(files, tmp_path_factory) -> list[np.ndarray]:
    """The model's images without LoRAs."""
    return [pixels(p) for p in cli(tmp_path_factory.mktemp("base"), "--checkpoint", files["model"], *RUN)]


# -- the same images by every route ----------------------------------------------------------------------

def test_cli_lora_gives_the_pipeline_bytes(files, base, tmp_path):
    paths = cli(tmp_path, "--checkpoint", files["model"], "--lora", f"{files['style']}:0.7", "--lora",
                files["detail"], *RUN)
    pipe = Pipeline.from_file(files["model"], loras=[(files["style"], 0.7), str(files["detail"])])
    images = pipe(PROMPT, **KEYWORDS)
    assert len(images) == len(paths) == 2
    for image, path in zip(images, paths):
        buffer = io.BytesIO()
        save_image(image, buffer)
        assert buffer.getvalue() == path.read_bytes()
    assert np.abs(pixels(paths[0]) - base[0]).max() > 20  # the LoRAs change the image
    # batch invariance holds with hooks on: image 2 drawn alone is image 2 of the batch
    alone = pipe(PROMPT, **{**KEYWORDS, "seed": 6, "num_images": 1})[0]
    assert np.array_equal(np.asarray(alone), np.asarray(images[1]))


def test_unmerged_equals_the_merged_file_and_lora_merge(files, base, tmp_path):
    """Two LoRAs stacked as hooks against `python -m ldm.lora merge BASE A:0.7 B` drawn without --lora: pixels
    within 1/255 (float rounding of W x + s up(down(x)) against (W + s up down) x; 0 on this machine), and
    --lora-merge the merged file's pixels exactly."""
    merged = tmp_path / "merged.safetensors"
    ldm.lora.main(["merge", str(files["model"]), f"{files['style']}:0.7", str(files["detail"]), "--out", str(merged)])
    from_file = [pixels(p) for p in cli(tmp_path / "file", "--checkpoint", merged, *RUN)]
    loras = ["--lora", f"{files['style']}:0.7", "--lora", files["detail"]]
    unmerged = [pixels(p) for p in cli(tmp_path / "hooks", "--checkpoint", files["model"], *loras, *RUN)]
    at_load = cli(tmp_path / "at-load", "--checkpoint", files["model"], *loras, "--lora-merge", *RUN)
    for want, hooks, path, plain in zip(from_file, unmerged, at_load, base):
        assert np.abs(want - plain).max() > 20
        assert np.abs(hooks - want).max() <= 1
        assert np.array_equal(pixels(path), want)
    assert record(at_load[0])["lora_merge"] is True


def test_merged_at_load_changes_weights_and_hooks_nothing(files):
    """--lora-merge really merges (its pixels equal the hooks' here, so the test above cannot tell); a
    LoRA at scale 0 is not hooked."""
    cases = (([], False), ([files["style"]], False), ([files["style"]], True), ([(files["style"], 0.0)], False))
    plain, hooked, merged, zero = (Pipeline.from_file(files["model"], loras=loras, lora_merge=merge).model
                                   for loras, merge in cases)
    layer = "input_blocks.3.1.transformer_blocks.0.attn1.to_q"
    weights = [m.unet.get_submodule(layer).weight for m in (plain, hooked, merged)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])
    hooks = [sum(len(module._forward_hooks) for module in m.modules()) for m in (plain, hooked, merged, zero)]
    # one hook per adapted layer; none merged, nor at scale 0 (a hook would turn the fused kernels off for nothing)
    assert hooks[0] == hooks[2] == hooks[3] and hooks[1] - hooks[0] == len(load_file(str(files["style"]))) // 3


def test_each_lora_and_the_text_encoder_count(files, base, tmp_path):
    """Stacking is not the first LoRA alone, and a LoRA of the text encoder only changes the image."""
    both = pixels(cli(tmp_path / "both", "--checkpoint", files["model"], "--lora", files["style"], "--lora",
                      files["detail"], *RUN)[0])
    first = pixels(cli(tmp_path / "first", "--checkpoint", files["model"], "--lora", files["style"], *RUN)[0])
    words = pixels(cli(tmp_path / "words", "--checkpoint", files["model"], "--lora", files["words"], *RUN)[0])
    assert np.abs(both - first).max() > 20 and np.abs(words - base[0]).max() > 5  # 16 here


def test_scale_zero_is_the_base_model_and_the_scale_counts(files, base, tmp_path):
    zero = cli(tmp_path / "zero", "--checkpoint", files["model"], "--lora", f"{files['style']}:0", *RUN)
    assert all(np.array_equal(pixels(p), b) for p, b in zip(zero, base))
    assert record(zero[0])["lora_scales"] == [0.0]
    half = pixels(cli(tmp_path / "half", "--checkpoint", files["model"], "--lora", f"{files['style']}:0.5", *RUN)[0])
    whole = pixels(cli(tmp_path / "whole", "--checkpoint", files["model"], "--lora", files["style"], *RUN)[0])
    assert np.abs(half - whole).max() > 20 and np.abs(half - base[0]).max() > 20


def test_lora_arg_takes_the_scale_after_the_last_colon_only_if_a_number(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_lora_arg("style.safetensors:0.8") == LoRASpec("style.safetensors", 0.8)
    assert parse_lora_arg("a:b/style.safetensors:-1.5") == LoRASpec("a:b/style.safetensors", -1.5)
    assert parse_lora_arg("C:\\loras\\style.safetensors") == LoRASpec("C:\\loras\\style.safetensors", 1.0)
    assert parse_lora_arg("style.safetensors") == LoRASpec("style.safetensors", 1.0)
    (tmp_path / "v:2").write_bytes(b"")  # a file whose own name ends in ':<number>', and no file 'v'
    assert parse_lora_arg("v:2") == LoRASpec("v:2", 1.0)


# -- bad LoRAs: one line, exit 2, nothing written ----------------------------------------------------------

@pytest.mark.parametrize("lora, message, before_load", [
    ("missing.safetensors", "error: LoRA file not found: missing.safetensors", True),
    ("{model}", "{model} is a stage-2 model file written by train_stage2.py; --lora takes LoRA files", True),
    ("{style}:nan", "error: --lora {style}: the scale must be a finite number, got nan", True),
    ("{wide}", "error: {wide}: lora_unet_conv_in.lora_down.weight does not fit the model's unet.input_blocks.0.0: "
               "LoRA down (4, 4, 3, 3) / up (64, 4, 1, 1), model weight (32, 4, 3, 3)", False),
    ("{extra}", "error: {extra}: 3 of ", False),
])
def test_bad_lora_is_one_line_exit_2_and_nothing_written(files, tmp_path, capsys, monkeypatch, lora, message,
                                                         before_load):
    if before_load:  # found from the files alone: no weights are loaded
        monkeypatch.setattr(ldm.pipeline, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    code, err = cli_error(capsys, "--checkpoint", files["model"], "--lora", lora.format(**files), *RUN,
                          "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and message.format(**files) in err, err
    assert not (tmp_path / "out").exists()
    if lora == "{extra}":
        assert "lora_unet_not_a_layer" in err and "--lora-allow-partial skips them" in err


def test_allow_partial_warns_with_the_count_and_applies_the_rest(files, tmp_path, capsys):
    partial = cli(tmp_path / "partial", "--checkpoint", files["model"], "--lora", files["extra"],
                  "--lora-allow-partial", *RUN)
    err = capsys.readouterr().err
    assert f"warning: {files['extra']}: 3 of " in err and "LoRA keys match no layer" in err
    clean = cli(tmp_path / "clean", "--checkpoint", files["model"], "--lora", files["style"], *RUN)
    assert np.array_equal(pixels(partial[0]), pixels(clean[0]))


@pytest.mark.parametrize("keywords, error, message", [
    (dict(loras=["missing.safetensors"]), FileNotFoundError, "LoRA file not found: missing.safetensors"),
    (dict(loras=[("{style}", "0.5")]), TypeError, "loras=[...]: each LoRA is a file path or a (path, scale) pair"),
    (dict(loras="{style}"), TypeError, "loras=[...] takes a list of LoRA files, got the single path {style}"),
    (dict(loras=["{extra}"]), ValueError, "{extra}: 3 of "),
])
def test_pipeline_lora_errors_are_one_line(files, keywords, error, message):
    keywords = {k: [v.format(**files) if isinstance(v, str) else (v[0].format(**files), v[1]) for v in value]
                if isinstance(value, list) else value.format(**files) for k, value in keywords.items()}
    with pytest.raises(error) as info:
        Pipeline.from_file(files["model"], **keywords)
    assert str(info.value).startswith(message.format(**files)) and "\n" not in str(info.value)
    if "extra" in str(keywords):
        assert "lora_allow_partial=True skips them" in str(info.value)


# -- the PNG records them, --from-png brings them back -----------------------------------------------------

def a1111_lora_hash(path: Path) -> str:
    """kohya's / A1111's hash of a safetensors LoRA: sha256 of the bytes after the header, 12 hex digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_png_records_the_loras_as_json_and_as_a1111_writes_them(files, tmp_path):
    (path, _) = cli(tmp_path, "--checkpoint", files["model"], "--lora", f"{files['style']}:0.7", "--lora",
                    files["detail"], *RUN)
    got = record(path)
    assert {k: got[k] for k in ("prompt", "loras", "lora_scales", "lora_sha256", "lora_hashes")} == {
        "prompt": PROMPT, "loras": ["style.safetensors", "detail.safetensors"], "lora_scales": [0.7, 1.0],
        "lora_sha256": [hashlib.sha256(files[n].read_bytes()).hexdigest()[:12] for n in ("style", "detail")],
        "lora_hashes": [a1111_lora_hash(files[n]) for n in ("style", "detail")]}
    assert "lora_merge" not in got
    with Image.open(path) as image:
        parsed = a1111_parse_generation_parameters(image.text["parameters"])
    assert parsed["Prompt"] == f"{PROMPT} <lora:style:0.7> <lora:detail:1>"
    assert parsed["Lora hashes"] == (f"style: {a1111_lora_hash(files['style'])}, "
                                     f"detail: {a1111_lora_hash(files['detail'])}")


def test_from_png_finds_the_loras_again(files, tmp_path, capsys, monkeypatch):
    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("style", "detail"):
        shutil.copy(files[name], loras)
    (drawn, _) = cli(tmp_path / "drawn", "--checkpoint", files["model"], "--lora", f"{loras / 'style.safetensors'}:0.7",
                     "--lora", loras / "detail.safetensors", *RUN)
    # Ours: by file name in --lora-dir; the same bytes again.
    (again,) = cli(tmp_path / "again", "--from-png", drawn, "--checkpoint", files["model"], "--lora-dir", loras,
                     prompt=None)
    assert again.read_bytes() == drawn.read_bytes()
    # A1111's text alone: the tags leave the prompt, the names are found as NAME.safetensors in the current
    # folder; same pixels. A file of that name with another hash is used with a warning.
    with Image.open(drawn) as image:
        info, image_pixels = PngInfo(), image.copy()
        info.add_text("parameters", image.text["parameters"])
    image_pixels.save(tmp_path / "a1111.png", pnginfo=info)
    monkeypatch.chdir(loras)
    (a1111,) = cli(tmp_path / "a1111", "--from-png", tmp_path / "a1111.png", "--checkpoint", files["model"],
                     prompt=None)
    assert np.array_equal(pixels(a1111), pixels(drawn)) and record(a1111)["prompt"] == PROMPT
    shutil.copy(files["detail"], loras / "style.safetensors")
    cli(tmp_path / "other", "--from-png", tmp_path / "a1111.png", "--checkpoint", files["model"], prompt=None)
    assert f"is not the LoRA style the image was drawn with (sha256 {a1111_lora_hash(files['style'])}...)" in \
        capsys.readouterr().err
    beside = tmp_path / "beside"  # found beside the checkpoint, preferred to the current folder's for its hash
    beside.mkdir()
    for path in (files["model"], files["style"]):
        shutil.copy(path, beside)
    (found,) = cli(tmp_path / "found", "--from-png", tmp_path / "a1111.png", "--checkpoint",
                   beside / "model.safetensors", prompt=None)
    assert np.array_equal(pixels(found), pixels(drawn)) and "warning" not in capsys.readouterr().err
    (loras / "style.safetensors").unlink()
    code, err = cli_error(capsys, "--from-png", tmp_path / "a1111.png", "--checkpoint", files["model"], "--out",
                          tmp_path / "none")
    assert code == 2 and err.count("\n") == 1 and "was drawn with the LoRA style (scale 0.7), not found in ." in err


# -- README ---------------------------------------------------------------------------------------------------

def test_readme_lora_commands_run_as_written(tmp_path, monkeypatch):
    """README's "LoRA" commands on the shipped model, with random LoRAs of its U-Net as the two files (2 steps)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text[text.index("### LoRA"):].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    assert [c[:3] for c in commands] == [["python", "generate.py", "grinning face"],
                                        ["python", "-m", "ldm.lora"], ["python", "-m", "ldm.lora"]]
    (tmp_path / "models").symlink_to(ROOT / "models")
    monkeypatch.chdir(tmp_path)
    model = LatentDiffusion.load(DEFAULT_MODEL)
    for seed, name in ((1, "style"), (2, "detail")):
        write_lora(random_lora({"unet": model.unet}, seed, rank=2), f"{name}.safetensors", model, "kohya")
    generate.main([*commands[0][2:], "--steps", "2"])
    for command in commands[1:]:
        ldm.lora.main(command[3:])
    assert len(list(Path("outputs").glob("00000-grinning-face-seed0.png"))) == 1
    assert LatentDiffusion.load("merged.safetensors").unet.config == model.unet.config
    assert all(".lora_A.weight" in k or ".lora_B.weight" in k for k in load_file("extracted.safetensors"))
