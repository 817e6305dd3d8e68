"""LoRA training (train_stage2.py / train_controlnet.py with a `lora:` section) on a tiny stage-2 model.

One short run is shared by most tests: it lowers the training loss with only adapters trained, leaves
the base weights bit for bit as they were, checkpoints adapters only, and writes a lora.safetensors
that ldm.lora applies (and `python -m ldm.lora merge` merges) onto the base model to give the trained
model's output. Resuming halfway gives the same bytes; bad lora sections are one-line errors.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

import train_controlnet
import train_stage2
from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from common.cli import run
from common.config import load_config
from common.weights import file_sha256, load_torch, load_weights, read_metadata
from conditioning import TextEncoderConfig
from data import DataConfig, build_dataset
from ldm.controlnet import Control, ControlledModel, load_controlnet
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.lora import apply_lora, main as lora_main, read_lora
from ldm.unet import UNetConfig
from training import NonFiniteLossError
from training.lora import LoRAAdapters, LoRAConfig

UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[1, 2], num_heads=4, use_spatial_transformer=True, legacy=False)
# Everything a LoRA can reach: attention, feed-forward, LoCon convs, the text encoder; dropout and EMA on.
CONFIG = {
    "model": {},
    "data": {"source": "shapes", "size": 16, "shapes_length": 8},
    "train": {"batch_size": 8, "max_steps": 24, "checkpoint_every": 12, "log_every": 4, "ema_decay": 0.8},
    "optim": {"lr": 1.0e-2, "warmup_steps": 1, "weight_decay": 0.0},
    "caption_dropout": 0.0,
    "lora": {"rank": 2, "alpha": 4, "dropout": 0.1, "feed_forward": True, "conv": True, "text_encoder": True},
}
PROMPTS = ["a red circle", "two blue squares"]


def base_model() -> LatentDiffusion:
    """A tiny 'trained' model: random weights everywhere, zero-initialised layers included (a zero
    proj_out would hide the attention layers, and their adapters would get no gradient)."""
    torch.manual_seed(0)
    ae = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(
        double_z=True, z_channels=4, resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]))
    cfg = LatentDiffusionConfig(unet=UNetConfig(**UNET), text=TextEncoderConfig(
        kind="transformer", n_embed=16, n_layer=1, n_head=2, max_length=24))
    model = LatentDiffusion(cfg, build_autoencoder(ae), ae, scale_factor=0.5).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.unet.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "base.safetensors"
    base_model().save(path)
    return path


def config_file(folder: Path, **sections) -> Path:
    config = {k: dict(v) if isinstance(v, dict) else v for k, v in CONFIG.items()}
    for key, value in sections.items():
        config[key] = value
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def stage2(config: Path, base: Path, out: Path, *extra, resume=False, first_stage=None):
    source = ["--first-stage", first_stage] if first_stage else ["--init-from", base]
    argv = ["prog", "--config", config, *source, f"train.output_dir={out}", *extra, *(["--resume"] if resume else [])]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", [str(a) for a in argv])
        train_stage2.main()
    return out


@torch.no_grad()
def unet_output(model: LatentDiffusion, control=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t, context = torch.tensor([20, 800]), model.encode_text(PROMPTS)
    if control is not None:
        return ControlledModel(model, [control], batch=2)(x, t, context)
    return model(x, t, context)


class Captured:
    """What the run held in memory when it wrote its LoRA: the model (PEFT-wrapped, the exported
    adapter weights loaded) and its output, then the model once the wrappers were taken off."""

    def __init__(self, monkeypatch, hint: torch.Tensor | None = None):
        self.hint, self.task = hint, None
        inject, save = LoRAAdapters.inject.__func__, LoRAAdapters.save

        def capture_inject(cls, model, cfg):
            self.model, self.modes = model, set()
            adapters = inject(cls, model, cfg)
            model.unet.register_forward_pre_hook(lambda module, args: self.modes.add(module.training))
            return adapters

        def capture_save(adapters, path, states=None, **kwargs):
            self.training_modes = set(self.modes)  # of the training steps' U-Net calls
            live = {name: {k: v.clone() for k, v in tree.state_dict().items()}
                    for name, tree in adapters.modules().items()}
            for name, tree in adapters.modules().items():  # the exported (EMA) weights, for a moment
                tree.load_state_dict(states[name])
            self.model.eval()
            control = Control(self.controlnet(states), self.hint) if self.hint is not None else None
            self.trained_output = unet_output(self.model, control)
            for name, tree in adapters.modules().items():
                tree.load_state_dict(live[name])
            return save(adapters, path, states, **kwargs)

        monkeypatch.setattr(LoRAAdapters, "inject", classmethod(capture_inject))
        monkeypatch.setattr(LoRAAdapters, "save", capture_save)

    def controlnet(self, states):
        net = self.task.controlnet
        net.load_state_dict(states["controlnet"])
        return net.eval()


@pytest.fixture(scope="module")
def trained(base_file, tmp_path_factory):
    """One 24-step LoRA run on the base model; what it held in memory at the end."""
    folder = tmp_path_factory.mktemp("lora_run")
    with pytest.MonkeyPatch.context() as mp:
        captured = Captured(mp)
        stage2(config_file(folder), base_file, folder / "run")
    captured.out = folder / "run"
    return captured


def diffusion_loss(model: LatentDiffusion) -> float:
    """The training objective on the run's 8 images at fixed timesteps and noise."""
    data = build_dataset(DataConfig(**CONFIG["data"]))
    items = [data[i] for i in range(8)]
    images = torch.stack([item["image"] for item in items])
    g = torch.Generator().manual_seed(9)
    total = 0.0
    with torch.no_grad():
        z = model.encode_images(images, sample=False)
        context = model.encode_text([item["caption"] for item in items])
        for _ in range(4):
            t = torch.randint(0, 1000, (8,), generator=g)
            noise = torch.randn(z.shape, generator=g)
            total += model.diffusion.training_losses(model, z, {"context": context}, t=t, noise=noise)["loss"].mean()
    return float(total) / 4


def test_training_only_the_adapters_lowers_the_loss(trained, base_file):
    base = LatentDiffusion.load(base_file)
    before = diffusion_loss(base)
    with apply_lora(base, read_lora(trained.out / "lora.safetensors", base)):
        after = diffusion_loss(base)
    assert after < 0.7 * before, (before, after)
    assert trained.training_modes == {True}  # in training mode, as a full fine-tune: the LoRA branches' dropout is on


def test_the_base_weights_are_bit_identical_after_training(trained, base_file):
    saved = load_weights(base_file)
    model = trained.model  # what trained, its PEFT wrappers taken off at the export
    state = {**{f"unet.{k}": v for k, v in model.unet.state_dict().items()},
             **{f"text_encoder.{k}": v for k, v in model.text_encoder.state_dict().items()},
             **{f"autoencoder.{k}": v for k, v in model.autoencoder.state_dict().items()}}
    assert state.keys() == saved.keys()
    changed = [k for k, v in saved.items() if not torch.equal(state[k], v)]
    assert not changed, changed[:5]
    assert not any(p.requires_grad for p in model.parameters())  # frozen: no gradients computed for them
    assert not list((trained.out).glob("model.safetensors"))  # the base model is never written


def test_checkpoints_hold_the_adapters_only(trained, base_file):
    step = trained.out / "checkpoints" / "step_00000024"
    assert {p.name for p in step.iterdir()} == {"unet_lora.safetensors", "text_encoder_lora.safetensors",
                                                 "ema.safetensors", "optimizers.pt", "trainer_state.pt"}
    for name in ("unet_lora", "text_encoder_lora", "ema"):
        keys = load_weights(step / f"{name}.safetensors").keys()
        assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys), name
    adapters = load_weights(step / "unet_lora.safetensors")
    untrained = [k for k, v in {**adapters, **load_weights(step / "text_encoder_lora.safetensors")}.items()
                 if k.endswith("lora_B.weight") and not v.any()]
    assert not untrained, untrained[:5]  # every adapter took part (lora_B starts at zero)
    assert adapters.keys() == {k[len("unet_lora."):] for k in load_weights(step / "ema.safetensors")
                               if k.startswith("unet_lora.")}
    # The optimizer holds AdamW moments for the adapters alone.
    optimizer = load_torch(step / "optimizers.pt")["optimizers"]["unet"]
    adapter_count = len(adapters) + len(load_weights(step / "text_encoder_lora.safetensors"))
    assert len(optimizer["state"]) == adapter_count
    base_unet = sum(v.numel() for k, v in load_weights(base_file).items() if k.startswith("unet."))
    assert sum(v.numel() for v in adapters.values()) < 0.2 * base_unet
    assert (step / "unet_lora.safetensors").stat().st_size < 0.2 * base_file.stat().st_size


def test_the_lora_file_on_the_base_model_gives_the_trained_output(trained, base_file, tmp_path, capsys):
    lora_file = trained.out / "lora.safetensors"
    base = LatentDiffusion.load(base_file)
    before = unet_output(base)
    lora = read_lora(lora_file, base)
    assert any(layer.down.ndim == 4 and layer.down.shape[2:] == (3, 3) for layer in lora.layers.values())  # LoCon
    assert any(name.startswith("text_encoder.") for name in lora.layers)
    with apply_lora(base, lora):
        applied = unet_output(base)
    assert (trained.trained_output - before).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(applied, trained.trained_output, atol=1e-5, rtol=0)
    # ... and merged into a model file by the command line
    merged_file = tmp_path / "merged.safetensors"
    with pytest.raises(SystemExit) as exit_info:
        run(lambda: (lora_main(["merge", str(base_file), str(lora_file), "--out", str(merged_file)]), sys.exit(0)))
    assert exit_info.value.code == 0, capsys.readouterr().err
    torch.testing.assert_close(unet_output(LatentDiffusion.load(merged_file)), trained.trained_output,
                               atol=1e-5, rtol=1e-5)


def test_the_lora_file_records_its_base_and_settings(trained, base_file):
    meta = read_metadata(trained.out / "lora.safetensors")["ldm_lora"]
    lora = CONFIG["lora"]
    assert meta["base_sha256"] == file_sha256(base_file) and meta["base"] == "base.safetensors"
    assert (meta["rank"], meta["alpha"], meta["dropout"]) == (lora["rank"], lora["alpha"], lora["dropout"])
    assert meta["targets"] == ["to_q", "to_k", "to_v", "to_out"]
    assert meta["feed_forward"] and meta["conv"] and meta["text_encoder"] and meta["format"] == "kohya"
    assert meta["steps"] == 24 and meta["layers"] == len(read_lora(trained.out / "lora.safetensors",
                                                                    LatentDiffusion.load(base_file)).layers)
    keys = load_weights(trained.out / "lora.safetensors").keys()
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
    # The file holds the EMA of the adapters (train.ema_decay is set), not the last step's weights.
    lora = read_lora(trained.out / "lora.safetensors", LatentDiffusion.load(base_file))
    ema = load_weights(trained.out / "checkpoints/step_00000024/ema.safetensors")
    live = load_weights(trained.out / "checkpoints/step_00000024/unet_lora.safetensors")
    name = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    assert torch.equal(lora.layers[f"unet.{name}"].up, ema[f"unet_lora.{name}.lora_B.weight"])
    assert not torch.equal(lora.layers[f"unet.{name}"].up, live[f"{name}.lora_B.weight"])


def test_resume_is_exact(trained, base_file, tmp_path):
    config = config_file(tmp_path)
    stage2(config, base_file, tmp_path / "run", "train.max_steps=12")
    stage2(config, base_file, tmp_path / "run", resume=True)
    for name in ("checkpoints/step_00000024/unet_lora.safetensors", "checkpoints/step_00000024/ema.safetensors",
                 "checkpoints/step_00000024/text_encoder_lora.safetensors", "lora.safetensors"):
        assert (tmp_path / "run" / name).read_bytes() == (trained.out / name).read_bytes(), name


def test_max_minutes_and_the_nan_guard_hold_for_lora_runs(base_file, tmp_path):
    out = stage2(config_file(tmp_path), base_file, tmp_path / "timed", "train.max_steps=1000", "train.max_minutes=1e-9")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000001"]
    assert read_metadata(out / "lora.safetensors")["ldm_lora"]["steps"] == 1
    broken = LatentDiffusion.load(base_file)
    with torch.no_grad():
        broken.unet.out[2].weight[0, 0, 0, 0] = float("nan")
    broken.save(tmp_path / "broken.safetensors")
    with pytest.raises(NonFiniteLossError, match="loss 'unet' is nan at step 0"):
        stage2(config_file(tmp_path), tmp_path / "broken.safetensors", tmp_path / "nan")
    assert not (tmp_path / "nan" / "lora.safetensors").exists()


def test_peft_format_file_gives_the_same_output(base_file, tmp_path):
    model = LatentDiffusion.load(base_file)
    adapters = LoRAAdapters.inject(model, LoRAConfig(rank=3, alpha=1.5, dropout=0.5, feed_forward=True,
                                                     format="peft"))
    # Only the adapters train; the base, its trainable text transformer included, is frozen.
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for tree in adapters.modules().values() for p in tree.parameters()}
    with torch.no_grad():
        for tree in adapters.modules().values():
            for p in tree.parameters():
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(p.numel()))
    model.train()
    assert not torch.equal(unet_output(model), unet_output(model))  # dropout on the LoRA branches
    model.eval()
    wrapped = unet_output(model)
    adapters.save(tmp_path / "lora.safetensors", base_sha256="0" * 64)
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_weights(tmp_path / "lora.safetensors"))
    base = LatentDiffusion.load(base_file)
    with apply_lora(base, read_lora(tmp_path / "lora.safetensors", base)):
        torch.testing.assert_close(unet_output(base), wrapped, atol=1e-5, rtol=0)
    assert (unet_output(base) - wrapped).abs().max() > 1e-3


def test_controlnet_training_with_a_unet_lora(base_file, tmp_path):
    config = {"data": {"source": "shapes", "size": 16, "shapes_length": 4, "condition": "shapes-edges"},
              "train": {"batch_size": 4, "max_steps": 3, "checkpoint_every": 3, "log_every": 1},
              "optim": {"lr": 1.0e-3, "warmup_steps": 1}, "samples": {"count": 1, "steps": 1},
              "lora": {"rank": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    hint = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with pytest.MonkeyPatch.context() as mp:
        captured = Captured(mp, hint)
        task_class = train_controlnet.ControlNetTask

        class Recorded(task_class):
            def __init__(self, *args):
                super().__init__(*args)
                captured.task = self
        mp.setattr(train_controlnet, "ControlNetTask", Recorded)
        mp.setattr(sys, "argv", ["prog", "--config", str(tmp_path / "c.yaml"), "--stage2", str(base_file),
                                 f"train.output_dir={tmp_path / 'run'}"])
        train_controlnet.main()
    out = tmp_path / "run"
    step = out / "checkpoints" / "step_00000003"
    assert {p.stem for p in step.glob("*.safetensors")} == {"controlnet", "unet_lora"}
    assert read_metadata(out / "lora.safetensors")["ldm_lora"]["base_sha256"] == file_sha256(base_file)
    assert read_metadata(out / "controlnet.safetensors")["unet_lora"] == "lora.safetensors"
    saved = load_weights(base_file)
    assert all(torch.equal(v, saved[f"unet.{k}"]) for k, v in captured.model.unet.state_dict().items())
    # The base U-Net with the LoRA file, controlled by the ControlNet file, is the trained pair.
    base = LatentDiffusion.load(base_file)
    control = load_controlnet(out / "controlnet.safetensors").control(hint)
    with apply_lora(base, read_lora(out / "lora.safetensors", base)):
        torch.testing.assert_close(unet_output(base, control), captured.trained_output, atol=1e-5, rtol=0)


def cli_error(fn, argv: list, capsys) -> str:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["prog", *map(str, argv)])
        with pytest.raises(SystemExit) as exit_info:
            run(fn)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("override, message", [
    ("lora.rnak=4", "unknown config key 'lora.rnak'"),
    ("lora.rank=0", "lora: rank must be >= 1, got 0"),
    ("lora.targets=[to_q,to_z]", "lora.targets: 'to_z' names no linear or conv layer of the U-Net"),
    ("lora.format=ckpt", "'lora.format' must be one of ['kohya', 'peft']"),
    ("lora.dropout=1", "lora: dropout must be a finite number in [0, 1)"),
])
def test_a_bad_lora_section_is_a_one_line_error(base_file, tmp_path, capsys, override, message):
    err = cli_error(train_stage2.main, ["--config", config_file(tmp_path), "--init-from", base_file,
                                        f"train.output_dir={tmp_path / 'run'}", override], capsys)
    assert message in err, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lora_needs_a_model_to_adapt_and_a_locked_unet(base_file, tmp_path, capsys):
    err = cli_error(train_stage2.main, ["--config", config_file(tmp_path), "--first-stage", base_file,
                                        f"train.output_dir={tmp_path / 'a'}"], capsys)
    assert "pass --init-from MODEL" in err
    config = {"data": {"source": "shapes", "size": 16, "condition": "shapes-edges"},
              "controlnet": {"sd_locked": False}, "lora": {"rank": 2}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    err = cli_error(train_controlnet.main, ["--config", tmp_path / "c.yaml", "--stage2", base_file,
                                            f"train.output_dir={tmp_path / 'b'}"], capsys)
    assert "in place of controlnet.sd_locked: false" in err
    with pytest.raises(ValueError, match="nothing to adapt"):
        LoRAConfig(targets=[])


def test_the_shipped_lora_config_trains_on_the_default_model(tmp_path):
    default = Path(train_stage2.__file__).parent / "models/default/model.safetensors"
    if not Path("/usr/share/datasets/fashion-mnist").is_dir():
        pytest.skip("needs the Debian package dataset-fashion-mnist (the config's data)")
    cfg = load_config("configs/ldm/lora-default.yaml", train_stage2.Stage2Config)
    assert (cfg.lora.rank, cfg.lora.feed_forward, cfg.lora.format, cfg.data.source) == (8, True, "kohya",
                                                                                      "fashion-mnist")
    out = stage2("configs/ldm/lora-default.yaml", default, tmp_path / "run", "train.max_steps=1",
                 "train.batch_size=2", "latent_cache=false", "train.image_every=0")
    model = LatentDiffusion.load(default)
    lora = read_lora(out / "lora.safetensors", model)
    assert len(lora.layers) == read_metadata(out / "lora.safetensors")["ldm_lora"]["layers"] > 0
    # The adapters (attention, feed-forward and LoCon convs at rank 8) are a small fraction of the U-Net.
    adapter_numel = sum(t.numel() for t in load_weights(out / "lora.safetensors").values())
    assert adapter_numel < sum(p.numel() for p in model.unet.parameters()) / 10
