"""DreamBooth (train_stage2.py with a `dreambooth:` section) on a tiny model built here.

A full fine-tune with prior preservation runs once for most tests: the subject's loss goes down, the
class images are the base model's own drawings, written once and reused by a resumed and a second
run, and resuming halfway gives the same bytes. The loss is checked in closed form (instance mean +
lambda * class mean, each half conditioned on its own prompt), lambda = 0 against a plain fine-tune
on the same pictures, the LoRA variant for its files, and bad input through the command line.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ldm.class_images
import train_stage2
from common.cli import run
from common.config import from_dict
from common.weights import load_weights, read_metadata
from data.dreambooth import PriorPairs
from ldm.generation import generate_latents
from ldm.latent_diffusion import LatentDiffusion
from ldm.parameterization import parameterization
from test_lora_training import base_file, base_model  # noqa: F401 (base_file: the tiny model's file, a fixture)

ROOT = Path(__file__).resolve().parents[1]
INSTANCE, CLASS = "a sks square", "a square"
SIZE = 16
CONFIG = {
    "model": {},
    "data": {"size": SIZE},
    "dreambooth": {"instance_dir": None, "instance_prompt": INSTANCE, "class_prompt": CLASS, "num_class_images": 6,
                   "prior_loss_weight": 1.0, "class_dir": None, "class_sampler": "ddim", "class_steps": 2,
                   "class_batch_size": 4, "instance_repeats": 2},
    "train": {"batch_size": 4, "max_steps": 16, "checkpoint_every": 8, "log_every": 4},
    "optim": {"lr": 3.0e-3, "warmup_steps": 1, "weight_decay": 0.0},
    "caption_dropout": 0.0,
}


def write_pictures(folder: Path, count: int = 4, size: int = 20) -> Path:
    """`count` pictures of one 'subject': a dark square on a light ground, shifted a little each time."""
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        pixels = np.full((size, size, 3), 230, np.uint8)
        pixels[4 + k % 3: 14 + k % 3, 5 + k % 2: 15 + k % 2] = (40, 60 + 9 * k, 160)
        Image.fromarray(pixels).save(folder / f"{k:02d}.png")
    return folder


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    return write_pictures(tmp_path_factory.mktemp("subject") / "pictures")


def config_file(folder: Path, pictures: Path, class_dir: Path, lora: dict | None = None, **dreambooth) -> Path:
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in CONFIG.items()}
    config["dreambooth"].update(instance_dir=str(pictures), class_dir=str(class_dir), **dreambooth)
    if lora is not None:
        config["lora"] = lora
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stage2(config: Path, base: Path, out: Path, *extra, resume=False) -> Path:
    argv = ["prog", "--config", config, "--init-from", base, f"train.output_dir={out}", *extra,
            *(["--resume"] if resume else [])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(a) for a in argv])
        train_stage2.main()
    return out


class Drawings:
    """Counts the sampler calls that draw class images."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ldm.class_images.generate_latents

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(ldm.class_images, "generate_latents", counted)


@pytest.fixture(scope="module")
def trained(base_file, pictures, tmp_path_factory):
    """A 16-step full fine-tune with prior preservation; its folder, class folder and drawing count."""
    folder = tmp_path_factory.mktemp("dreambooth")
    with pytest.MonkeyPatch.context() as mp:
        drawings = Drawings(mp)
        out = stage2(config_file(folder, pictures, folder / "classes"), base_file, folder / "run")
    return {"out": out, "classes": folder / "classes", "calls": drawings.calls, "folder": folder}


def instance_loss(model: LatentDiffusion, pictures: Path) -> float:
    """The diffusion loss on the subject's pictures under the instance prompt, fixed timesteps and noise."""
    images = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB").resize((SIZE, SIZE)),
                                                      dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
                          for p in sorted(pictures.glob("*.png"))])
    g = torch.Generator().manual_seed(9)
    total = 0.0
    with torch.no_grad():
        z = model.encode_images(images, sample=False)
        context = model.encode_text([INSTANCE] * len(images))
        for _ in range(8):
            t = torch.randint(0, 1000, (len(images),), generator=g)
            noise = torch.randn(z.shape, generator=g)
            total += model.diffusion.training_losses(model, z, {"context": context}, t=t, noise=noise)["mse"].mean()
    return float(total) / 8


def test_the_subject_is_learned(trained, base_file, pictures):
    before = instance_loss(LatentDiffusion.load(base_file), pictures)
    after = instance_loss(LatentDiffusion.load(trained["out"] / "model.safetensors"), pictures)
    assert after < 0.7 * before, (before, after)
    # Both terms were logged, and the class half is there (its loss is not the instance half's).
    events = EventAccumulator(str(trained["out"] / "tensorboard")).Reload()
    assert {"loss", "instance_loss", "class_loss"} <= set(events.Tags()["scalars"])
    first = {tag: events.Scalars(tag)[0].value for tag in ("loss", "instance_loss", "class_loss")}
    assert first["loss"] == pytest.approx(first["instance_loss"] + first["class_loss"], rel=1e-5)


def test_class_images_are_the_base_models_drawings(trained, base_file):
    folders = list(trained["classes"].iterdir())
    assert len(folders) == 1 and trained["calls"] == 2  # 6 images in batches of 4
    folder = folders[0]
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(6)]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (manifest["prompt"], manifest["count"], manifest["size"]) == (CLASS, 6, SIZE)
    captions = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert {row["text"] for row in captions} == {CLASS} and len(captions) == 6
    base = LatentDiffusion.load(base_file).eval()
    latents = generate_latents(base, [CLASS], seed=5, sampler="ddim", steps=2, guidance=3.0, height=SIZE, width=SIZE)
    expected = ((base.decode_latents(latents).clamp(-1, 1) + 1) * 127.5).round().byte()[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(Image.open(folder / "00005.png")), expected)


def test_class_images_are_reused_and_redrawn_when_their_key_changes(trained, base_file, pictures, tmp_path):
    config = config_file(tmp_path, pictures, trained["classes"])
    with pytest.MonkeyPatch.context() as mp:
        drawings = Drawings(mp)
        stage2(config, base_file, tmp_path / "second", "train.max_steps=1")
    assert drawings.calls == 0  # a second run with the same base, prompt and count draws nothing
    with pytest.MonkeyPatch.context() as mp:
        drawings = Drawings(mp)
        stage2(config, base_file, tmp_path / "more", "train.max_steps=1", "dreambooth.num_class_images=7")
        stage2(config, base_file, tmp_path / "other", "train.max_steps=1", "dreambooth.class_prompt=a circle")
    assert drawings.calls == 4 and len(list(trained["classes"].iterdir())) == 3
    # A folder left unfinished (no manifest, an image missing) gets its missing image only.
    folder = next(p for p in trained["classes"].iterdir() if json.loads((p / "manifest.json").read_text())["count"] == 7)
    (folder / "manifest.json").unlink()
    (folder / "00003.png").unlink()
    with pytest.MonkeyPatch.context() as mp:
        drawings = Drawings(mp)
        stage2(config, base_file, tmp_path / "again", "train.max_steps=1", "dreambooth.num_class_images=7")
    assert drawings.calls == 1 and (folder / "00003.png").is_file() and (folder / "manifest.json").is_file()


def test_resume_is_exact_and_reuses_the_class_images(trained, base_file, pictures, tmp_path):
    config = config_file(tmp_path, pictures, tmp_path / "classes")
    with pytest.MonkeyPatch.context() as mp:
        drawings = Drawings(mp)
        stage2(config, base_file, tmp_path / "run", "train.max_steps=8")
        stage2(config, base_file, tmp_path / "run", resume=True)
    assert drawings.calls == 2  # drawn by the first half only
    for name in ("checkpoints/step_00000016/unet.safetensors", "model.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (trained["out"] / name).read_bytes(), name


def test_without_prior_it_is_a_plain_fine_tune_on_the_pictures(base_file, pictures, tmp_path):
    """prior_loss_weight 0 trains exactly what train_stage2.py trains on a folder of the pictures captioned
    with the instance prompt (and draws no class image)."""
    captioned = tmp_path / "captioned"
    write_pictures(captioned)
    for png in captioned.glob("*.png"):
        png.with_suffix(".txt").write_text(INSTANCE)
    config = config_file(tmp_path / "db", captioned, tmp_path / "classes", prior_loss_weight=0.0, instance_repeats=1)
    stage2(config, base_file, tmp_path / "dreambooth", "train.max_steps=6")
    assert not (tmp_path / "classes").exists()
    plain = {k: v for k, v in CONFIG.items() if k != "dreambooth"}
    plain["data"] = {"source": "folder", "path": str(captioned), "size": SIZE}
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump(plain))
    stage2(tmp_path / "plain.yaml", base_file, tmp_path / "plain", "train.max_steps=6")
    dreambooth, fine_tune = load_weights(tmp_path / "dreambooth/model.safetensors"), load_weights(
        tmp_path / "plain/model.safetensors")
    assert dreambooth.keys() == fine_tune.keys()
    assert all(torch.equal(dreambooth[k], fine_tune[k]) for k in dreambooth)
    assert not torch.equal(dreambooth["unet.out.2.weight"], load_weights(base_file)["unet.out.2.weight"])


@pytest.mark.parametrize("weight", [0.0, 0.37, 2.0])
def test_the_loss_is_instance_mean_plus_lambda_class_mean(weight):
    """In closed form: an x0-predicting model whose U-Net outputs 0 has per-example loss mean(z^2), the
    latents z = scale * mean (std 0), whatever t and noise. Each half sees its own prompt's context."""
    model = base_model()
    model.diffusion.parameterization = parameterization("x0")
    seen = {}

    def zero_unet(x, t, context=None, **kwargs):
        seen["context"], seen["t"] = context, t
        return torch.zeros_like(x)
    model.unet.forward = zero_unet
    g = torch.Generator().manual_seed(3)
    inst, cls = torch.randn(3, 4, 8, 8, generator=g), 2 * torch.randn(3, 4, 8, 8, generator=g) + 1
    batch = {"latent_mean": inst, "latent_std": torch.zeros_like(inst), "caption": [INSTANCE] * 3,
             "class_latent_mean": cls, "class_latent_std": torch.zeros_like(cls), "class_caption": [CLASS] * 3,
             "sample_key": torch.tensor([4, 9, 1])}
    cfg = from_dict(train_stage2.Stage2Config, {**CONFIG, "dreambooth": {**CONFIG["dreambooth"], "instance_dir": ".",
                                                                        "prior_loss_weight": weight}})
    task = train_stage2.LatentDiffusionTask(cfg, model)
    [(name, loss, logs)] = list(task.training_step(batch, 0))
    s = model.scale_factor
    instance_term = ((s * inst.double()) ** 2).mean(dim=(1, 2, 3)).mean()
    class_term = ((s * cls.double()) ** 2).mean(dim=(1, 2, 3)).mean()
    if weight == 0:  # no prior: the class half is not in the batch at all
        torch.testing.assert_close(loss.double(), instance_term, rtol=1e-6, atol=0)
        assert seen["context"].shape[0] == 3 and "class_loss" not in logs
        return
    torch.testing.assert_close(loss.double(), instance_term + weight * class_term, rtol=1e-6, atol=0)
    assert logs["instance_loss"] == pytest.approx(float(instance_term), rel=1e-6)
    assert logs["class_loss"] == pytest.approx(float(class_term), rel=1e-6)
    with torch.no_grad():
        expected = model.encode_text([INSTANCE] * 3 + [CLASS] * 3)
    torch.testing.assert_close(seen["context"], expected)
    # A class example's timestep (and noise) is its own draw, not a copy of its paired instance example's.
    assert not torch.equal(seen["t"][:3], seen["t"][3:])


class Keyed(torch.utils.data.Dataset):
    """A part that names the key it was asked for."""

    def __init__(self, name: str, size: int):
        self.name, self.size = name, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: int) -> dict:
        return {"caption": f"{self.name} {key}", "image": torch.full((3, 2, 2), float(key))}


def test_each_pair_holds_the_instance_and_class_items_of_its_key():
    pairs = PriorPairs(Keyed("instance", 4), Keyed("class", 6), length=6)
    assert len(pairs) == 6
    for key in (0, 5, 17):
        item = pairs[key]
        assert (item["caption"], item["class_caption"]) == (f"instance {key}", f"class {key}")
        assert torch.equal(item["class_image"], torch.full((3, 2, 2), float(key)))
    alone = PriorPairs(Keyed("instance", 4), None, length=8)[3]
    assert set(alone) == {"caption", "image"}


def test_lora_and_full_fine_tune_write_their_files(trained, base_file, pictures, tmp_path):
    assert (trained["out"] / "model.safetensors").is_file() and not (trained["out"] / "lora.safetensors").exists()
    step = trained["out"] / "checkpoints" / "step_00000016"
    assert "unet.safetensors" in {p.name for p in step.iterdir()}
    config = config_file(tmp_path, pictures, trained["classes"], lora={"rank": 2, "conv": True})
    out = stage2(config, base_file, tmp_path / "lora", "train.max_steps=4", "train.checkpoint_every=4")
    assert (out / "lora.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert {p.name for p in (out / "checkpoints/step_00000004").glob("*.safetensors")} == {"unet_lora.safetensors"}
    assert read_metadata(out / "lora.safetensors")["ldm_lora"]["steps"] == 4
    assert all(k.startswith("lora_unet_") for k in load_weights(out / "lora.safetensors"))


def cli_error(argv: list, capsys) -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["prog", *map(str, argv)])
        with pytest.raises(SystemExit) as exit_info:
            run(train_stage2.main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


def bad_folder(tmp_path: Path, kind: str) -> Path:
    folder = tmp_path / kind
    if kind == "missing":
        return folder
    if kind == "two":
        return write_pictures(folder, count=2)
    if kind == "twenty-one":
        return write_pictures(folder, count=21)
    write_pictures(folder, count=3)
    if kind == "small":
        Image.new("RGB", (20, 12), "white").save(folder / "small.png")
    if kind == "unreadable":
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


@pytest.mark.parametrize("folder, override, message", [
    ("missing", None, "dreambooth.instance_dir {folder} does not exist"),
    ("two", None, "holds 2 images"),
    ("twenty-one", None, "holds 21 images (.jpg"),
    ("small", None, "small.png is 20x12, smaller than data.size 16"),
    ("unreadable", None, "broken.png is not a readable image"),
    ("ok", "dreambooth.instance_prompt=' '", "dreambooth: instance_prompt has no text"),
    ("ok", "dreambooth.class_prompt=''", "dreambooth: class_prompt has no text"),
    ("ok", f"dreambooth.class_prompt='{INSTANCE}'", "class_prompt is the instance prompt"),
    ("ok", "dreambooth.prior_loss_weight=-1", "prior_loss_weight must be a finite number >= 0"),
    ("ok", "dreambooth.class_sampler=ddmi", "class_sampler must be one of"),
    ("ok", "dreambooth.instance_dri=x", "unknown config key 'dreambooth.instance_dri'"),
    ("ok", "train.batch_size=64", "raise dreambooth.instance_repeats to at least 22"),
])
def test_bad_input_is_a_one_line_error(base_file, tmp_path, capsys, folder, override, message):
    pictures = bad_folder(tmp_path, folder)
    config = config_file(tmp_path / "cfg", pictures, tmp_path / "classes", num_class_images=4)
    err = cli_error(["--config", config, "--init-from", base_file, f"train.output_dir={tmp_path / 'run'}",
                     *([override] if override else [])], capsys)
    assert message.format(folder=pictures) in err, err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "classes").exists()


def test_dreambooth_needs_a_model_and_the_command_says_so(base_file, pictures, tmp_path):
    """Through the real command, as a user runs it: a subprocess, one line on stderr, exit 2."""
    config = config_file(tmp_path, pictures, tmp_path / "classes")
    result = subprocess.run([sys.executable, str(ROOT / "train_stage2.py"), "--config", str(config), "--first-stage",
                             str(base_file), f"train.output_dir={tmp_path / 'run'}"], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("INFO")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "dreambooth: a subject is taught to an existing model" in lines[0]


def test_the_shipped_config_reads():
    cfg = from_dict(train_stage2.Stage2Config, yaml.safe_load((ROOT / "configs/ldm/dreambooth-default.yaml").read_text()))
    assert cfg.dreambooth.prior and cfg.lora is not None and cfg.latent_cache and cfg.data.size == 64
