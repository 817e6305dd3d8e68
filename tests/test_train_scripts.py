"""train_stage1.py and train_stage2.py end to end on tiny configs: outputs, resume, cache, errors."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_stage1
import train_stage2
from autoencoder.model_file import load_autoencoder
from ldm.latent_cache import fingerprint
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.unet import UNetConfig
from conditioning import TextEncoderConfig
from data import DataConfig, build_dataset
from common.weights import load_weights
from common.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _run(module, argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["prog", *map(str, argv)])
    module.main()


def _stage1(tmp_path: Path, config: str, monkeypatch) -> Path:
    _run(train_stage1, ["--config", ROOT / "configs/autoencoder" / config, f"train.output_dir={tmp_path}"], monkeypatch)
    return tmp_path / "autoencoder.safetensors"


@pytest.fixture(scope="module")
def stage1_file(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        return _stage1(tmp_path_factory.mktemp("s1"), "tiny-kl.yaml", mp)


def test_stage1_trains_a_vq_model(tmp_path, monkeypatch):
    model, cfg, scale = load_autoencoder(_stage1(tmp_path, "tiny-vq.yaml", monkeypatch))
    assert cfg.kind == "vq" and 0.01 < scale < 100
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.decode_latents(model.encode_latents(x)).shape == x.shape


def test_stage1_writes_autoencoder_with_scale_factor(stage1_file):
    model, cfg, scale = load_autoencoder(stage1_file)
    assert cfg.kind == "kl" and cfg.embed_dim == 4
    assert 0.01 < scale < 100
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode_latents(x, sample=False)
    assert z.shape == (2, 4, 16, 16)
    assert model.decode_latents(z).shape == x.shape


def test_stage1_cosine_decay_ends_at_zero_and_resumes_exactly(tmp_path, monkeypatch):
    argv = ["--config", ROOT / "configs/autoencoder/tiny-kl.yaml", "train.max_steps=4", "train.checkpoint_every=2",
            "optim.decay=cosine", "optim.warmup_steps=2"]
    _run(train_stage1, [*argv, f"train.output_dir={tmp_path / 'a'}"], monkeypatch)
    # lr 1e-3 x min(1, 3 / 2) x 0.5 (1 + cos(pi 2 / 4)) after two steps; 0 after four; both optimizers
    for step, lr in ((2, 5e-4), (4, 0.0)):
        states = torch.load(tmp_path / f"a/checkpoints/step_{step:08d}/optimizers.pt", weights_only=True)
        for name in ("autoencoder", "discriminator"):
            assert states["optimizers"][name]["param_groups"][0]["lr"] == pytest.approx(lr, abs=1e-12)
    shutil.copytree(tmp_path / "a/checkpoints/step_00000002", tmp_path / "b/checkpoints/step_00000002")
    _run(train_stage1, [*argv, f"train.output_dir={tmp_path / 'b'}", "--resume"], monkeypatch)
    a = load_weights(tmp_path / "a/checkpoints/step_00000004/autoencoder.safetensors")
    b = load_weights(tmp_path / "b/checkpoints/step_00000004/autoencoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _stage2(tmp_path, stage1_file, monkeypatch, out, *extra, resume=False):
    argv = ["--config", ROOT / "configs/ldm/tiny.yaml", "--first-stage", stage1_file,
            f"train.output_dir={tmp_path / out}", "train.max_steps=4", "train.checkpoint_every=2",
            "train.ema_decay=0.9", "data.shapes_length=16", "train.batch_size=4",
            "latent_cache=true", f"latent_cache_dir={tmp_path / 'cache'}", *extra]
    if resume:
        argv.append("--resume")
    _run(train_stage2, argv, monkeypatch)
    return tmp_path / out


@pytest.mark.parametrize("decay, lr_at_2", [
    ("optim.decay=cosine", 1e-3 * 0.5),  # tiny.yaml's lr x 0.5 (1 + cos(pi s / 4))
    ("optim.decay=cooldown", 1e-3 * 2 / 3),  # x (4 - s) / (0.75 x 4): the last three steps cool down
])
def test_stage2_lr_decay_reaches_zero_at_max_steps(tmp_path, stage1_file, monkeypatch, decay, lr_at_2):
    out = _stage2(tmp_path, stage1_file, monkeypatch, "a", decay, "optim.cooldown_fraction=0.75",
                  "optim.warmup_steps=1")
    lrs = [torch.load(out / f"checkpoints/step_{step:08d}/optimizers.pt", weights_only=True)
           ["optimizers"]["unet"]["param_groups"][0]["lr"] for step in (2, 4)]
    assert lrs == pytest.approx([lr_at_2, 0.0], abs=1e-12)


def test_stage2_resume_is_exact_and_exports_ema(tmp_path, stage1_file, monkeypatch):
    straight = _stage2(tmp_path, stage1_file, monkeypatch, "a")
    _stage2(tmp_path, stage1_file, monkeypatch, "b", "train.max_steps=2")
    resumed = _stage2(tmp_path, stage1_file, monkeypatch, "b", resume=True)
    a = load_weights(straight / "checkpoints/step_00000004/unet.safetensors")
    b = load_weights(resumed / "checkpoints/step_00000004/unet.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The exported model samples with the EMA weights.
    ema = load_weights(straight / "checkpoints/step_00000004/ema.safetensors")
    model = LatentDiffusion.load(straight / "model.safetensors")
    exported = model.unet.state_dict()
    assert all(torch.equal(exported[k], ema[f"unet.{k}"]) for k in exported)
    assert not all(torch.equal(exported[k], a[k]) for k in exported)
    # The model file carries its (frozen) autoencoder: readable as one, e.g. by autoencoder.evaluate.
    inside, _, scale = load_autoencoder(straight / "model.safetensors")
    trained, _, _ = load_autoencoder(stage1_file)
    assert scale == model.scale_factor
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in inside.state_dict().items())


def test_a_finished_run_is_not_trained_over_without_resume(tmp_path, stage1_file, monkeypatch):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = _stage2(tmp_path, stage1_file, monkeypatch, "a", "train.max_steps=2", "latent_cache_dir=null")
    assert (out / "latent_cache").is_dir() and not (tmp_path / "cache").exists()  # in its own folder by default
    assert not any(elsewhere.iterdir())  # nothing written outside train.output_dir
    before = (out / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run's checkpoints: pass --resume"):
        _stage2(tmp_path, stage1_file, monkeypatch, "a", "train.max_steps=1")
    assert (out / "model.safetensors").read_bytes() == before


def test_latent_cache_follows_stage1_file(tmp_path, stage1_file):
    data = DataConfig(source="shapes", size=32, shapes_length=16)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(stage1_file.read_bytes())
    assert fingerprint(copy, data) == fingerprint(stage1_file, data)
    copy.write_bytes(stage1_file.read_bytes() + b" ")
    assert fingerprint(copy, data) != fingerprint(stage1_file, data)
    assert fingerprint(stage1_file, data) != fingerprint(stage1_file, DataConfig(source="shapes", size=32, seed=1))


def test_latent_cache_follows_the_images_of_a_folder(tmp_path, stage1_file):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (32, 32), (255, 0, 0)).save(folder / "a.png")
    data = DataConfig(source="folder", path=str(folder), size=32)
    before = fingerprint(stage1_file, data, build_dataset(data))
    assert fingerprint(stage1_file, data, build_dataset(data)) == before
    Image.new("RGB", (32, 32), (0, 0, 255)).save(folder / "b.png")  # an image added
    added = fingerprint(stage1_file, data, build_dataset(data))
    (folder / "b.txt").write_text("a blue square")  # a caption added
    assert len({before, added, fingerprint(stage1_file, data, build_dataset(data))}) == 3


def _tiny_model(stage1_file: Path) -> LatentDiffusion:
    ae, ae_cfg, scale = load_autoencoder(stage1_file)
    cfg = LatentDiffusionConfig(
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[2], num_head_channels=16),
        text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2))
    return LatentDiffusion(cfg, ae, ae_cfg, scale)


def test_text_conditioned_model_overfits_a_few_latents(stage1_file):
    torch.manual_seed(0)
    model = _tiny_model(stage1_file).train()
    latents = torch.randn(4, 4, 8, 8)
    captions = ["red circle", "blue square", "green triangle", "red circle"]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=2e-3)
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (64, 4), generator=g)
    noise = torch.randn(64, *latents.shape, generator=g)

    def loss_at(i):
        terms = model.diffusion.training_losses(model, latents, {"context": model.encode_text(captions)},
                                                t=t[i % 64], noise=noise[i % 64])
        return terms["loss"].mean()

    with torch.no_grad():
        before = sum(loss_at(i).item() for i in range(64)) / 64
    for i in range(150):
        opt.zero_grad()
        loss_at(i).backward()
        opt.step()
    with torch.no_grad():
        after = sum(loss_at(i).item() for i in range(64)) / 64
    assert after < 0.5 * before, (before, after)


def test_frozen_text_encoder_contexts_are_computed_once_per_caption(stage1_file):
    model = _tiny_model(stage1_file).eval()
    assert not train_stage2.LatentDiffusionTask(train_stage2.Stage2Config(model=model.cfg, data=DataConfig()),
                                                model).text_contexts.frozen  # a trainable encoder runs every step
    model.text_encoder.requires_grad_(False)
    cache = train_stage2.LatentDiffusionTask(train_stage2.Stage2Config(model=model.cfg, data=DataConfig()),
                                             model).text_contexts
    encoded = []
    cache.encode = lambda prompts: encoded.append(list(prompts)) or model.encode_text(prompts)

    first = cache(["a", "b", "a", ""])
    second = cache(["b", "", "c"])
    assert [set(chunk) for chunk in encoded] == [{"", "a", "b"}, {"c"}]  # each distinct caption once
    assert all(len(chunk) == cache.chunk for chunk in encoded)
    torch.testing.assert_close(first, model.encode_text(["a", "b", "a", ""]))
    torch.testing.assert_close(second, model.encode_text(["b", "", "c"]))


def test_latent_sample_false_trains_on_the_means_scaled_by_their_std(stage1_file):
    model = _tiny_model(stage1_file).eval()
    mean, std = torch.randn(2, 4, 8, 8), torch.full((2, 4, 8, 8), 1e3)  # a posterior whose noise dwarfs the means
    batch = {"latent_mean": mean, "latent_std": std}
    cfg = train_stage2.Stage2Config(model=model.cfg, data=DataConfig(source="shapes", size=32), latent_sample=False)
    task = train_stage2.LatentDiffusionTask(cfg, model)
    assert task.latents(batch).abs().mean() > 100 * model.scale_factor  # the model's flag decides, not the config
    model.latent_sample = False  # what main() sets from latent_sample: false
    assert torch.equal(task.latents(batch), mean * model.scale_factor)
    # The means' scale: 1 / std of the posterior means over the first batches, measured independently here.
    cfg.train.batch_size = 4
    data = build_dataset(cfg.data)
    with torch.no_grad():
        means = model.autoencoder.encode(torch.stack([data[k]["image"] for k in range(8)])).mean
    assert train_stage2._means_scale_factor(model.autoencoder, cfg, batches=2) == pytest.approx(
        1 / means.double().std().item(), rel=1e-5)


@pytest.mark.parametrize("override,message", [
    ("train.max_stepz=3", "unknown config key 'train.max_stepz'"),
    ("model.unet.channel_mult=7", "'model.unet.channel_mult' must be a list"),
])
def test_cli_config_errors_are_one_line(tmp_path, stage1_file, override, message):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_stage2.py"), "--config", str(ROOT / "configs/ldm/tiny.yaml"),
         "--first-stage", str(stage1_file), override],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_cli_missing_first_stage(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "train_stage2.py"), "--config", str(ROOT / "configs/ldm/tiny.yaml"),
         "--first-stage", str(tmp_path / "none.safetensors")],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: checkpoint not found: {tmp_path / 'none.safetensors'}"


def test_stage2_fine_tunes_an_original_format_checkpoint(tmp_path, stage1_file, monkeypatch):
    from ldm.original_format import export_original

    first = _stage2(tmp_path, stage1_file, monkeypatch, "first", "train.max_steps=1", "train.ema_decay=null")
    model = LatentDiffusion.load(first / "model.safetensors")
    original = tmp_path / "original.safetensors"
    yaml_path = export_original(model, original)
    argv = ["--config", ROOT / "configs/ldm/tiny.yaml", "--init-from", original, "--original-config", yaml_path,
            f"train.output_dir={tmp_path / 'tuned'}", "train.max_steps=2", "data.shapes_length=16",
            "train.batch_size=4", "latent_cache=false"]
    _run(train_stage2, argv, monkeypatch)
    tuned = LatentDiffusion.load(tmp_path / "tuned" / "model.safetensors")
    start, end = model.unet.state_dict(), tuned.unet.state_dict()
    assert start.keys() == end.keys()
    assert any(not torch.equal(start[k], end[k]) for k in start)  # it trained from those weights


def test_a_means_trained_model_is_fine_tuned_on_the_means(tmp_path, stage1_file, monkeypatch):
    first = _stage2(tmp_path, stage1_file, monkeypatch, "means", "train.max_steps=1", "train.ema_decay=null",
                    "latent_sample=false")
    model = LatentDiffusion.load(first / "model.safetensors")
    assert model.latent_sample is False and model.scale_factor != load_autoencoder(stage1_file)[2]
    argv = ["--config", ROOT / "configs/ldm/tiny.yaml", "--init-from", first / "model.safetensors",
            f"train.output_dir={tmp_path / 'tuned'}", "train.max_steps=1", "data.shapes_length=16",
            "train.batch_size=4", "latent_cache=false"]
    _run(train_stage2, argv, monkeypatch)  # the config leaves latent_sample unset: the file's flag holds
    tuned = LatentDiffusion.load(tmp_path / "tuned" / "model.safetensors")
    assert tuned.latent_sample is False and tuned.scale_factor == model.scale_factor
