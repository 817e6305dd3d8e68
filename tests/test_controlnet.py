"""ControlNet: layout and names, zero start, locked training, Multi-ControlNet, files, diffusers oracle, CLIs."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import generate
import train_controlnet
from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from conditioning import TextEncoderConfig
from conditioning.edges import canny, main as edges_main
from data import DataConfig
from ldm import ControlNet, Pipeline
from ldm.controlnet import (
    Control,
    ControlledModel,
    control_scales,
    hint_encoder,
    load_controlnet,
    save_controlnet,
)
from ldm.generation import generate_latents
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.unet import UNetConfig
from ldm.unet import UNetModel
from common.weights import CheckpointError, load_weights, read_metadata

ROOT = Path(__file__).resolve().parents[1]
SD1_CONTROL = dict(image_size=32, in_channels=4, hint_channels=3, model_channels=320, attention_resolutions=[4, 2, 1],
                   num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                   transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)  # cldm_v15.yaml
TINY = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True, transformer_depth=1,
            context_dim=24, legacy=False)
SIZE = 16  # pixels of the tiny stage-2 model: autoencoder and U-Net halve once each


def randomize_zeros(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Give zero-initialised parameters random values so that every path reaches the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
    return module


def tiny_unet(seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return randomize_zeros(UNetModel(**TINY).eval(), seed)


def inputs(batch: int = 2, latent: int = 8, factor: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=g)
    t = torch.tensor([3, 917, 500, 20])[:batch]
    context = torch.randn(batch, 5, TINY["context_dim"], generator=g)
    hint = (torch.rand(batch, 3, latent * factor, latent * factor, generator=g) > 0.8).float()
    return x, t, context, hint


# ----------------------------------------------------------------------------- layout and names


def test_sd15_controlnet_names_shapes_and_count_on_meta_device():
    with torch.device("meta"):
        net = ControlNet(**SD1_CONTROL)
        unet = UNetModel(**{k: v for k, v in SD1_CONTROL.items() if k != "hint_channels"}, out_channels=4)
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    # diffusers' ControlNetModel at this config (cross_attention_dim 768) has the same count; it is the
    # number public write-ups quote for the SD 1.5 ControlNet (361.28 M).
    assert sum(p.numel() for p in net.parameters()) == 361_279_120
    assert len(shapes) == 340
    widths = [320] * 4 + [640] * 3 + [1280] * 5
    for i, width in enumerate(widths):
        assert shapes[f"zero_convs.{i}.0.weight"] == (width, width, 1, 1)
        assert shapes[f"zero_convs.{i}.0.bias"] == (width,)
    assert "zero_convs.12.0.weight" not in shapes
    assert shapes["middle_block_out.0.weight"] == (1280, 1280, 1, 1)
    hint = {0: (16, 3), 2: (16, 16), 4: (32, 16), 6: (32, 32), 8: (96, 32), 10: (96, 96), 12: (256, 96), 14: (320, 256)}
    for index, (c_out, c_in) in hint.items():
        assert shapes[f"input_hint_block.{index}.weight"] == (c_out, c_in, 3, 3)
    assert sorted({int(k.split(".")[1]) for k in shapes if k.startswith("input_hint_block")}) == list(hint)
    # The encoder copy has exactly the U-Net's names and shapes.
    unet_shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()
                   if k.startswith(("time_embed", "input_blocks", "middle_block"))}
    assert {k: v for k, v in shapes.items() if k.split(".")[0] in ("time_embed", "input_blocks", "middle_block")} \
        == unet_shapes
    assert net.input_hint_block[4].stride == (2, 2) and net.input_hint_block[2].stride == (1, 1)


@pytest.mark.parametrize("factor", [1, 2, 4, 8, 16])
def test_hint_encoder_downsamples_by_the_latent_factor(factor):
    encoder = randomize_zeros(hint_encoder(3, 32, factor))
    out = encoder(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 32, 32 // factor, 32 // factor)
    strides = [m.stride[0] for m in encoder if isinstance(m, torch.nn.Conv2d)]
    assert strides.count(2) == int(np.log2(factor))
    if factor <= 8:  # the original's names and shapes whatever the factor
        reference = {k: v.shape for k, v in hint_encoder(3, 32, 8).state_dict().items()}
        assert {k: v.shape for k, v in encoder.state_dict().items()} == reference
    last = hint_encoder(3, 32, factor)[-1]  # zero-initialised, bias too: a fresh ControlNet adds nothing
    assert not last.weight.any() and not last.bias.any()


def test_bad_latent_factor_is_a_clear_error():
    with pytest.raises(ValueError, match="power of two"):
        hint_encoder(3, 32, 6)


# ----------------------------------------------------------------------------- behaviour


def test_fresh_controlnet_leaves_the_unet_output_exactly_unchanged():
    unet = tiny_unet()
    net = ControlNet.from_unet(unet).eval()
    for name, value in unet.state_dict().items():
        if name.split(".")[0] in ("time_embed", "input_blocks", "middle_block"):
            assert torch.equal(net.state_dict()[name], value)
    x, t, context, hint = inputs()
    with torch.no_grad():
        residuals = net(x, hint, t, context)
        assert len(residuals) == len(unet.input_blocks) + 1 == 5
        assert all(not r.any() for r in residuals)
        plain = unet(x, t, context)
        assert torch.equal(unet(x, t, context, control=residuals), plain)
        assert torch.equal(ControlledModel(unet, [Control(net, hint, scale=3.0)], batch=2)(x, t, context), plain)


def test_fresh_hint_encoder_adds_nothing_to_the_features_not_even_a_constant():
    # The zero convs hide the encoder copy's features at the start; look through them (identity 1x1
    # convs): the features with a hint must be those without one, as in the original, whose last hint
    # conv starts at zero, bias included (a nonzero bias would shift input block 0's output by a constant).
    net = ControlNet.from_unet(tiny_unet()).eval()
    x, t, context, hint = inputs()
    with torch.no_grad():
        assert not net.input_hint_block(hint).any() and not net.input_hint_block(torch.ones_like(hint)).any()
        for conv in [block[0] for block in net.zero_convs] + [net.middle_block_out[0]]:
            conv.weight.copy_(torch.eye(conv.out_channels).view(conv.out_channels, conv.in_channels, 1, 1))
        features = net(x, hint, t, context)
        handle = net.input_hint_block.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
        without_hint = net(x, hint, t, context)
        handle.remove()
    assert len(features) == len(without_hint) == 5 and all(f.abs().max() > 0 for f in features)
    assert all(torch.equal(a, b) for a, b in zip(features, without_hint))


def trained_pair(seed: int = 0) -> tuple[UNetModel, ControlNet]:
    """A U-Net and a ControlNet whose zero convs and hint encoder look trained (non-zero)."""
    unet = tiny_unet(seed)
    return unet, randomize_zeros(ControlNet.from_unet(unet).eval(), seed + 1, std=0.05)


def test_several_controlnets_add_up_linearly_in_their_scales():
    unet, net_a = trained_pair(0)
    _, net_b = trained_pair(5)
    x, t, context, hint = inputs()
    hint_b = hint.flip(-1)
    with torch.no_grad():
        ra, rb = net_a(x, hint, t, context), net_b(x, hint_b, t, context)
        both = ControlledModel(unet, [Control(net_a, hint, scale=0.7), Control(net_b, hint_b, scale=-1.3)], batch=2)
        summed = both.residuals(x, t, context)
        for s, a, b in zip(summed, ra, rb):
            torch.testing.assert_close(s, 0.7 * a - 1.3 * b, rtol=1e-5, atol=1e-6)
        expected = unet(x, t, context, control=[0.7 * a - 1.3 * b for a, b in zip(ra, rb)])
        torch.testing.assert_close(both(x, t, context), expected, rtol=1e-5, atol=1e-5)
        zero = ControlledModel(unet, [Control(net_a, hint, scale=0.0), Control(net_b, hint_b, scale=0.0)], batch=2)
        assert torch.equal(zero(x, t, context), unet(x, t, context))
        assert not torch.allclose(both(x, t, context), unet(x, t, context), atol=1e-3)
        # Per-residual scales: only the middle residual, weighted 2.
        weights = [0.0] * 4 + [2.0]
        mid = ControlledModel(unet, [Control(net_a, hint, residual_scales=weights)], batch=2).residuals(x, t, context)
        assert all(not r.any() for r in mid[:-1])
        torch.testing.assert_close(mid[-1], 2 * ra[-1])


def test_only_mid_control_equals_the_unet_adding_the_middle_residual_alone():
    unet, net = trained_pair()
    x, t, context, hint = inputs()
    with torch.no_grad():
        residuals = net(x, hint, t, context)
        expected = unet(x, t, context, control=residuals, only_mid_control=True)
        mid_only = ControlledModel(unet, [Control(net, hint, only_mid_control=True)], batch=2)
        torch.testing.assert_close(mid_only(x, t, context), expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(expected, unet(x, t, context, control=residuals), atol=1e-3)


def test_guess_mode_scales_and_unconditional_half():
    assert control_scales(1.0, 13, guess_mode=True)[0] == pytest.approx(0.825**12)
    assert control_scales(2.0, 13, guess_mode=True)[-1] == 2.0
    assert control_scales(0.5, 13) == [0.5] * 13
    unet, net = trained_pair()
    x, t, context, hint = inputs(batch=1)
    x2, t2, context2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([torch.zeros_like(context), context])
    with torch.no_grad():
        guessed = ControlledModel(unet, [Control(net, hint, guess_mode=True)], batch=1).residuals(x2, t2, context2)
        alone = net(x, hint, t, context)
    decay = control_scales(1.0, len(alone), guess_mode=True)
    assert len(guessed) == len(alone) == len(decay) > 1
    for residual, single, weight in zip(guessed, alone, decay):
        assert not residual[0].any()  # the unconditional half stays uncontrolled
        torch.testing.assert_close(residual[1:], weight * single)


def test_hint_size_mismatch_is_a_clear_error():
    _, net = trained_pair()
    x, t, context, hint = inputs()
    with pytest.raises(ValueError, match=r"condition image must be \[2 or 1, 3, 64, 64\].*got \(2, 3, 32, 32\)"):
        net(x, hint[..., :32, :32], t, context)
    with pytest.raises(ValueError, match="condition image must be"):
        net(x, hint[:, :1], t, context)


def test_locked_training_step_trains_only_the_controlnet(tiny_model):
    model, cfg = tiny_model
    model = LatentDiffusion.load(model)
    controlnet = ControlNet.from_unet(model.unet, latent_factor=model.latent_factor)
    task = train_controlnet.ControlNetTask(cfg, model, controlnet)
    unet_before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    opt = torch.optim.AdamW([p for p in task.trainable.parameters() if p.requires_grad], lr=1e-2)
    batch = {"image": torch.rand(2, 3, SIZE, SIZE) * 2 - 1, "caption": ["a", "b"], "hint": torch.rand(2, 3, SIZE, SIZE)}
    torch.manual_seed(0)
    _, loss, _ = next(task.training_step(batch, 0))
    loss.backward()
    assert all(p.grad is None for p in model.parameters())  # U-Net, text encoder and autoencoder
    assert all(conv[0].weight.grad.abs().sum() > 0 for conv in controlnet.zero_convs)
    assert controlnet.middle_block_out[0].weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(v, unet_before[k]) for k, v in model.unet.state_dict().items())
    assert any(conv[0].weight.any() for conv in controlnet.zero_convs)


def test_unlocked_training_also_trains_the_unet_output_blocks(tiny_model):
    path, cfg = tiny_model
    model = LatentDiffusion.load(path)
    cfg = train_controlnet.ControlNetTrainConfig(data=cfg.data, controlnet=train_controlnet.ControlNetOptions(
        sd_locked=False))
    task = train_controlnet.ControlNetTask(cfg, model, ControlNet.from_unet(model.unet, latent_factor=2))
    batch = {"image": torch.rand(2, 3, SIZE, SIZE) * 2 - 1, "caption": ["a", ""], "hint": torch.rand(2, 3, SIZE, SIZE)}
    _, loss, _ = next(task.training_step(batch, 0))
    loss.backward()
    assert model.unet.out[2].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.unet.output_blocks.parameters())
    assert all(p.grad is None for p in [*model.unet.input_blocks.parameters(), *model.unet.middle_block.parameters()])


# ----------------------------------------------------------------------------- files


def test_checkpoint_round_trip_and_original_key_layouts(tmp_path):
    unet, net = trained_pair()
    decoder = {k: v for k, v in unet.state_dict().items() if k.startswith(("output_blocks", "out."))}
    save_controlnet(tmp_path / "c.safetensors", net, unet_decoder=decoder, metadata={"stage2_sha256": "abc"})
    loaded = load_controlnet(tmp_path / "c.safetensors")
    assert loaded.net.config == net.config and loaded.metadata["stage2_sha256"] == "abc"
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())
    assert loaded.unet_decoder.keys() == decoder.keys()
    keys = load_weights(tmp_path / "c.safetensors").keys()
    assert all(k.startswith(("control_model.", "model.diffusion_model.output_blocks", "model.diffusion_model.out."))
               for k in keys)
    # Original ControlNet 1.1 files: `control_model.*` in a .pth; stand-alone releases: bare keys.
    original = {f"control_model.{k}": v for k, v in net.state_dict().items()}
    torch.save(original, tmp_path / "control_v11p.pth")
    from_pth = load_controlnet(tmp_path / "control_v11p.pth", unet=unet)
    assert all(torch.equal(from_pth.net.state_dict()[k], v) for k, v in net.state_dict().items())
    assert from_pth.unet_decoder == {}
    torch.save(net.state_dict(), tmp_path / "bare.pth")
    assert load_controlnet(tmp_path / "bare.pth", unet=unet).net.hint_channels == 3
    with pytest.raises(CheckpointError, match="carry no config"):
        load_controlnet(tmp_path / "bare.pth")
    broken = dict(original)
    broken.pop("control_model.zero_convs.3.0.weight")
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="zero_convs.3.0.weight"):
        load_controlnet(tmp_path / "broken.pth", unet=unet)


# ----------------------------------------------------------------------------- diffusers oracle


def test_residuals_match_diffusers_controlnet_with_converted_weights():
    pytest.importorskip("diffusers")
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    _, net = trained_pair()
    config = dict(in_channels=4, conditioning_channels=3, block_out_channels=[32, 64], layers_per_block=1,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], cross_attention_dim=24,
                  attention_head_dim=4, use_linear_projection=False)
    twin = ControlNetModel(**config)
    state = convert_controlnet_checkpoint({f"control_model.{k}": v for k, v in net.state_dict().items()}, config)
    twin.load_state_dict(state, strict=True)
    twin.eval()
    x, t, context, hint = inputs()
    with torch.no_grad():
        ours = net(x, hint, t, context)
        down, mid = twin(x, t, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False)
    theirs = [*down, mid]
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert a.abs().max() > 1e-3
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny stage-2 model file (4-channel latents at half the image size) and the tiny ControlNet config."""
    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(
        z_channels=4, resolution=SIZE, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]))
    cfg = LatentDiffusionConfig(
        unet=UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[2],
                        num_head_channels=16, image_size=SIZE // 2),
        text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2))
    model = LatentDiffusion(cfg, build_autoencoder(ae_cfg), ae_cfg, scale_factor=0.5)
    randomize_zeros(model.unet, std=0.05)
    path = tmp_path_factory.mktemp("stage2") / "model.safetensors"
    model.save(path)
    raw = yaml.safe_load((ROOT / "configs/controlnet/tiny.yaml").read_text())
    return path, train_controlnet.ControlNetTrainConfig(data=DataConfig(**dict(raw["data"], size=SIZE)))


def _train(monkeypatch, stage2, out, *extra, resume=False):
    argv = ["prog", "--config", ROOT / "configs/controlnet/tiny.yaml", "--stage2", stage2,
            f"train.output_dir={out}", f"data.size={SIZE}", *extra]
    monkeypatch.setattr(sys, "argv", [str(a) for a in argv] + (["--resume"] if resume else []))
    train_controlnet.main()
    return out


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        return _train(mp, tiny_model[0], root / "straight")


def test_train_controlnet_writes_only_the_controlnet(trained, tiny_model):
    stage2 = tiny_model[0]
    file = trained / "controlnet.safetensors"
    meta = read_metadata(file)
    assert meta["format"] == "ldm-controlnet" and meta["condition"] == "shapes-edges"
    assert meta["stage2_sha256"] == hashlib.sha256(stage2.read_bytes()).hexdigest()
    assert meta["config"]["latent_factor"] == 2 and meta["sd_locked"] is True
    assert meta["steps"] == 4  # the steps trained: all of configs/controlnet/tiny.yaml's
    weights = load_weights(file)
    assert all(k.startswith("control_model.") for k in weights)
    assert file.stat().st_size < stage2.stat().st_size
    net = load_controlnet(file).net
    assert any(conv[0].weight.any() for conv in net.zero_convs)  # it trained
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]


def test_a_run_stopped_by_its_clock_records_the_steps_it_trained(tiny_model, tmp_path, monkeypatch):
    out = _train(monkeypatch, tiny_model[0], tmp_path / "clock", "train.max_minutes=1e-9", "train.max_steps=4")
    assert read_metadata(out / "controlnet.safetensors")["steps"] == 1  # not max_steps


def test_train_controlnet_leaves_the_locked_unet_bit_identical(tiny_model, tmp_path, monkeypatch):
    # Through the real loop and optimizer: the stage-2 model in memory after training is the file's.
    loaded = []
    real_load = train_controlnet.load_model
    monkeypatch.setattr(train_controlnet, "load_model", lambda *a: loaded.append(real_load(*a)) or loaded[-1])
    out = _train(monkeypatch, tiny_model[0], tmp_path / "locked", "train.max_steps=2")
    before = LatentDiffusion.load(tiny_model[0]).state_dict()
    after = loaded[0].state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(conv[0].weight.any() for conv in load_controlnet(out / "controlnet.safetensors").net.zero_convs)


def test_only_mid_control_is_kept_in_the_file_and_used_by_generate(tiny_model, tmp_path, monkeypatch):
    out = _train(monkeypatch, tiny_model[0], tmp_path / "mid", "train.max_steps=1", "controlnet.only_mid_control=true")
    assert read_metadata(out / "controlnet.safetensors")["only_mid_control"] is True
    pipe = Pipeline.from_file(tiny_model[0], controlnets=[out / "controlnet.safetensors"])
    (control,) = pipe.controls([torch.rand(1, 3, SIZE, SIZE)], [1.0], guess_mode=False)
    assert control.only_mid_control and control.weights()[:-1] == [0.0] * (len(control.weights()) - 1)


def test_train_controlnet_resume_is_exact(trained, tiny_model, tmp_path, monkeypatch):
    _train(monkeypatch, tiny_model[0], tmp_path / "b", "train.max_steps=2")
    _train(monkeypatch, tiny_model[0], tmp_path / "b", resume=True)
    a = load_weights(trained / "checkpoints/step_00000004/controlnet.safetensors")
    b = load_weights(tmp_path / "b/checkpoints/step_00000004/controlnet.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_controlnet_unlocked_saves_unet_output_blocks(tiny_model, tmp_path, monkeypatch):
    out = _train(monkeypatch, tiny_model[0], tmp_path / "u", "train.max_steps=1", "controlnet.sd_locked=false")
    keys = load_weights(out / "controlnet.safetensors").keys()
    assert any(k.startswith("model.diffusion_model.output_blocks.") for k in keys)
    assert not any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)


def test_train_controlnet_needs_a_condition(tiny_model, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_controlnet.run(lambda: _train(monkeypatch, tiny_model[0], tmp_path / "n", "data.condition=null"))
    assert exit_info.value.code == 2 and "data.condition must be set" in capsys.readouterr().err


def test_generate_latents_with_control(tiny_model, trained):
    model = LatentDiffusion.load(tiny_model[0])
    net = load_controlnet(trained / "controlnet.safetensors").net
    hint = torch.zeros(1, 3, SIZE, SIZE)
    hint[..., 4:12, 4:12] = 1
    run = lambda control: generate_latents(model, ["a", "b"], steps=2, height=SIZE, width=SIZE,  # noqa: E731
                                           sampler="euler", control=control)
    plain = run(None)
    assert torch.equal(run([Control(net, hint, scale=0.0)]), plain)
    assert not torch.allclose(run([Control(net, hint, scale=1.0)]), plain)
    with pytest.raises(ValueError, match=r"condition image 1 must be \[1 or 2, 3, 16, 16\]"):
        run([Control(net, torch.zeros(1, 3, 8, 8))])


def test_generate_cli_with_controlnets(tiny_model, trained, tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(tmp_path / "photo.png")
    Image.new("L", (SIZE, SIZE)).save(tmp_path / "map.png")
    Image.new("RGB", (SIZE + 2, SIZE)).save(tmp_path / "wide.png")
    controlnet = trained / "controlnet.safetensors"
    common = ["a red circle", "--checkpoint", tiny_model[0], "--steps", 2, "--sampler", "ddim"]
    generate.main([str(a) for a in [*common, "--controlnet", controlnet, "--control", "canny", "--control-image",
                                    tmp_path / "photo.png", "--controlnet", controlnet, "--control", "none",
                                    "--control-image", tmp_path / "map.png", "--control-scale", 0.5,
                                    "--control-scale", 1.5, "--out", tmp_path / "out"]])
    with Image.open(next((tmp_path / "out").glob("00000-*-seed0.png"))) as image:
        assert image.size == (SIZE, SIZE)  # the control images set the size
        params = json.loads(image.text["ldm-generation"])
    assert params["control"] == ["canny", "none"] and params["control_scales"] == [0.5, 1.5]
    assert params["controlnets"] == ["controlnet.safetensors"] * 2
    assert "warning" not in capsys.readouterr().err  # trained on this very checkpoint

    bad = [
        (["--controlnet", controlnet, "--control-image", tmp_path / "wide.png", "--size", SIZE],
         "control image"),
        (["--controlnet", controlnet, "--control-image", tmp_path / "wide.png"], "multiples of 4"),
        (["--controlnet", controlnet], "one --control-image per --controlnet"),
        (["--controlnet", controlnet, "--control-image", tmp_path / "map.png", "--control-scale", 1,
          "--control-scale", 2], "--control-scale is given 2 times for 1 ControlNets"),
        (["--controlnet", tmp_path / "missing.safetensors", "--control-image", tmp_path / "map.png"],
         "ControlNet file not found"),
    ]
    for extra, message in bad:
        with pytest.raises(SystemExit) as exit_info:
            generate.main([str(a) for a in [*common, *extra, "--out", tmp_path / "bad"]])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and message in err and "\n" not in err, (extra, err)
    assert not (tmp_path / "bad").exists()


def test_edges_command_turns_a_folder_into_condition_images(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    photo = np.zeros((24, 24, 3), np.uint8)
    photo[6:18, 6:18] = rng.integers(100, 255, size=3)
    Image.fromarray(photo).save(tmp_path / "in" / "a.jpg", quality=100)
    Image.fromarray(photo[::-1]).save(tmp_path / "in" / "sub" / "b.png")
    edges_main([str(tmp_path / "in"), str(tmp_path / "out"), "--low", "50", "--high", "150"])
    assert "wrote 2 edge maps" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "sub" / "b.png") as image:
        written = np.asarray(image)
    assert written.shape == (24, 24) and set(np.unique(written)) == {0, 255}
    assert np.array_equal(written, canny(photo[::-1].copy(), 50, 150))
    assert (tmp_path / "out" / "a.png").is_file()
    with pytest.raises(FileNotFoundError, match="input folder not found"):
        edges_main([str(tmp_path / "nowhere"), str(tmp_path / "out")])
