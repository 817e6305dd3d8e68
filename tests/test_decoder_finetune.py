"""Fine-tuning an autoencoder's decoder only (train_stage1.py train_part=decoder) and putting it into a stage-2
model file (ldm.replace_decoder): the latent space a U-Net was trained on stays exactly as it was."""
import sys
from pathlib import Path

import pytest
import torch

import train_stage1
from autoencoder.model_file import load_autoencoder, save_autoencoder
from common.config import ConfigError, load_config
from common.weights import CheckpointError, file_sha256, load_weights, read_metadata
from ldm import ControlNet, Pipeline
from ldm.controlnet import save_controlnet
from ldm.latent_diffusion import LatentDiffusion, same_unet_as
from ldm.replace_decoder import main as replace_main, replace_decoder
from test_generate import tiny_model

ROOT = Path(__file__).resolve().parents[1]
ENCODER_SIDE = ("encoder.", "quant_conv.", "quantize.")


def _stage1(monkeypatch, config: str, out: Path, *overrides) -> Path:
    argv = ["prog", "--config", str(ROOT / "configs/autoencoder" / config), f"train.output_dir={out}", *overrides]
    monkeypatch.setattr(sys, "argv", argv)
    train_stage1.main()
    return out / "autoencoder.safetensors"


# The VQ model recycles codes unused for a step in training mode: its codebook must stay as the encoder does.
@pytest.mark.parametrize("config, extra", [("tiny-kl.yaml", []), ("tiny-vq.yaml", ["model.dead_code_steps=1"])])
def test_decoder_fine_tune_changes_the_decoder_only(tmp_path, monkeypatch, config, extra):
    source = _stage1(monkeypatch, config, tmp_path / "source", *extra)
    tuned = _stage1(monkeypatch, config, tmp_path / "tuned", f"init_from={source}", "train_part=decoder",
                    "train.max_steps=4", "train.seed=1", *extra)
    before, after = load_weights(source), load_weights(tuned)
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)
    assert "decoder.conv_out.weight" in changed and "post_quant_conv.weight" in changed  # the GAN ran from step 0
    assert read_metadata(tuned)["scale_factor"] == read_metadata(source)["scale_factor"]


def test_decoder_fine_tune_lowers_the_reconstruction_loss(tmp_path, monkeypatch):
    source = _stage1(monkeypatch, "tiny-kl.yaml", tmp_path / "source")
    tuned = _stage1(monkeypatch, "tiny-kl.yaml", tmp_path / "tuned", f"init_from={source}", "train_part=decoder",
                    "train.max_steps=40", "loss.disc_start=100", "data.shapes_length=4")
    cfg = load_config(ROOT / "configs/autoencoder/tiny-kl.yaml", train_stage1.Stage1Config,
                      ["data.shapes_length=4"])
    data = train_stage1.build_dataset(cfg.data)
    images = torch.stack([data[i]["image"] for i in range(4)])

    def l1(path):
        model = load_autoencoder(path)[0]
        with torch.no_grad():
            return (model.decode_latents(model.encode_latents(images, sample=False)) - images).abs().mean().item()

    assert l1(tuned) < 0.8 * l1(source), (l1(tuned), l1(source))


def test_init_from_another_autoencoder_names_what_differs(tmp_path, monkeypatch):
    source = _stage1(monkeypatch, "tiny-kl.yaml", tmp_path / "source")
    with pytest.raises(ValueError, match=r"model\.ddconfig\.ch is 32 there, 64 here"):
        _stage1(monkeypatch, "tiny-kl.yaml", tmp_path / "other", f"init_from={source}", "model.ddconfig.ch=64")


def test_train_part_decoder_needs_a_trained_autoencoder():
    with pytest.raises((ConfigError, ValueError), match="train_part=decoder needs init_from"):
        load_config(ROOT / "configs/autoencoder/tiny-kl.yaml", train_stage1.Stage1Config, ["train_part=decoder"])


@pytest.fixture()
def model_file(tmp_path) -> Path:
    path = tmp_path / "model.safetensors"
    tiny_model().save(path)
    return path


def _decoder_tuned(model_file: Path, out: Path, part: str = "decoder.") -> Path:
    """The model's autoencoder with every `part` tensor moved, as a stage-1 file."""
    model = LatentDiffusion.load(model_file)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.autoencoder.named_parameters():
            if name.startswith(part):
                p.add_(0.05 * torch.randn_like(p))
    save_autoencoder(model.autoencoder, model.autoencoder_cfg, out, scale_factor=model.scale_factor)
    return out


def test_replace_decoder_keeps_the_unet_and_the_latents(model_file, tmp_path):
    tuned = _decoder_tuned(model_file, tmp_path / "tuned.safetensors")
    out = tmp_path / "replaced.safetensors"
    changed = replace_decoder(model_file, tuned, out)
    assert changed and all(k.startswith("decoder.") for k in changed)
    old, new = LatentDiffusion.load(model_file), LatentDiffusion.load(out)
    assert all(torch.equal(a, b) for a, b in zip(old.unet.state_dict().values(), new.unet.state_dict().values()))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(old.encode_images(images, sample=False), new.encode_images(images, sample=False))
        latents = torch.randn(2, 4, 8, 8)
        assert torch.equal(new.decode_latents(latents), load_autoencoder(tuned)[0].decode_latents(latents / new.scale_factor))
        assert not torch.equal(old.decode_latents(latents), new.decode_latents(latents))
    assert same_unet_as(out) == {file_sha256(out), file_sha256(model_file)}
    again = tmp_path / "again.safetensors"  # a second replacement still names the first file
    replace_decoder(out, _decoder_tuned(out, tmp_path / "tuned2.safetensors"), again)
    assert same_unet_as(again) == {file_sha256(again), file_sha256(out), file_sha256(model_file)}


@pytest.mark.parametrize("part", ["encoder.", "quant_conv."])
def test_replace_decoder_refuses_another_latent_space(model_file, tmp_path, part):
    other = _decoder_tuned(model_file, tmp_path / "other.safetensors", part=part)
    with pytest.raises(CheckpointError, match=f"its '{part}.*' differs from .*train_part=decoder"):
        replace_decoder(model_file, other, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_controlnet_on_the_original_needs_no_warning_after_replacement(model_file, tmp_path, capsys, monkeypatch):
    net = ControlNet.from_unet(LatentDiffusion.load(model_file).unet, latent_factor=2)
    save_controlnet(tmp_path / "cn.safetensors", net, metadata={"stage2_sha256": file_sha256(model_file)})
    monkeypatch.setattr(sys, "argv", ["python -m ldm.replace_decoder", str(model_file),
                                      str(_decoder_tuned(model_file, tmp_path / "tuned.safetensors")),
                                      "--out", str(tmp_path / "replaced.safetensors")])
    replace_main()
    Pipeline.from_file(tmp_path / "replaced.safetensors", controlnets=[tmp_path / "cn.safetensors"])
    assert "trained on another stage-2 model" not in capsys.readouterr().err
    unrelated = tmp_path / "unrelated.safetensors"
    model = tiny_model()
    torch.nn.init.normal_(next(model.unet.parameters()))
    model.save(unrelated)
    Pipeline.from_file(unrelated, controlnets=[tmp_path / "cn.safetensors"])
    assert "trained on another stage-2 model" in capsys.readouterr().err

