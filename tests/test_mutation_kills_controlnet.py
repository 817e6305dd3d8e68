"""ControlNet behaviour the mutation run (make mutation) found untested: SD's 13 guess-mode scales by
default, the hint encoder's default 8x and its 256-wide pairs above 8x, the stored constructor
arguments, n_embed ignored as in the original, hint_channels 1 (depth / grayscale conditions), inputs
cast to the parameters' dtype, class labels and a scalar timestep, a Python timestep on the latents'
device, from_unet's dtype and its refusal of extra encoder weights, per-image hints repeated for both
halves of a guided call, only_mid_control with residual scales, file contents and settings, and the
messages of bad inputs."""
from __future__ import annotations

import re

import pytest
import torch

from common.weights import CheckpointError, read_metadata
from ldm.controlnet import (
    Control,
    ControlledModel,
    ControlNet,
    control_scales,
    controlnet_args,
    hint_encoder,
    load_controlnet,
    save_controlnet,
)
from ldm.unet import UNetConfig, UNetModel

# Input blocks: conv_in (32), ResBlock + transformer (32), downsample (32), ResBlock (64); middle 64.
CONFIG = UNetConfig(in_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1],
                    num_head_channels=16, context_dim=8)
RESIDUALS = 5


def tiny_net(hint_channels: int = 3, seed: int = 0, config: UNetConfig = CONFIG) -> ControlNet:
    """A ControlNet whose zero-initialised weights (zero convs, last hint conv, ResBlocks' last convs)
    hold random values, as after training, so that every input reaches every residual."""
    torch.manual_seed(seed)
    net = ControlNet(config, hint_channels=hint_channels).eval()
    with torch.no_grad():
        for zero in filter(lambda p: not p.any(), net.parameters()):
            zero.normal_(0, 0.1)
    return net


def batch(n: int = 2, latent: int = 4, hints: int | None = None, seed: int = 1):
    """x [n, 4, latent, latent], t [n], context [n, 3, 8], hint [hints or n, 3, 8 latent, 8 latent]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, latent, latent, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    context = torch.randn(n, 3, 8, generator=g)
    hint = torch.rand(hints or n, 3, 8 * latent, 8 * latent, generator=g)
    return x, t, context, hint


def _convs(encoder: torch.nn.Sequential) -> list[tuple[int, int, int]]:
    return [(m.in_channels, m.out_channels, m.stride[0]) for m in encoder if isinstance(m, torch.nn.Conv2d)]


# ----------------------------------------------------------------------------- layout and arguments


def test_guess_mode_scales_default_to_sd_13_residuals():
    scales = control_scales(1.0, guess_mode=True)
    assert len(scales) == 13
    assert scales[0] == pytest.approx(0.825**12) and scales[11] == pytest.approx(0.825) and scales[12] == 1.0
    assert control_scales(0.5) == [0.5] * 13


def test_hint_encoder_defaults_to_the_original_8x_layout():
    # cldm's input_hint_block: 3->16, 16->16, 16->32 s2, 32->32, 32->96 s2, 96->96, 96->256 s2, 256->model_channels
    encoder = hint_encoder(3, 32)
    assert _convs(encoder) == [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1),
                               (96, 256, 2), (256, 32, 1)]
    assert encoder(torch.rand(1, 3, 16, 16)).shape == (1, 32, 2, 2)


def test_hint_encoder_above_8x_inserts_256_wide_pairs():
    encoder = hint_encoder(3, 32, 32)
    assert _convs(encoder) == [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1),
                               (96, 256, 2), (256, 256, 1), (256, 256, 2), (256, 256, 1), (256, 256, 2), (256, 32, 1)]
    assert encoder(torch.rand(1, 3, 32, 32)).shape == (1, 32, 1, 1)


@pytest.mark.parametrize("factor", [0, -8, 6, 0.5])
def test_a_latent_factor_that_is_no_power_of_two_is_named(factor):
    with pytest.raises(ValueError, match=rf"^ControlNet: latent_factor must be a power of two \(the autoencoder's "
                                         rf"downsampling\), got {re.escape(str(factor))}$"):
        hint_encoder(3, 32, factor)


def test_constructor_args_are_the_original_controlnets():
    args = controlnet_args(CONFIG, 1, 4)
    # cldm.ControlNet has no output head (no out_channels), and there is no codebook head to store.
    assert "out_channels" not in args and "n_embed" not in args
    assert args["hint_channels"] == 1 and args["latent_factor"] == 4
    net = ControlNet(**args)
    assert net.config == CONFIG and net.hint_channels == 1 and net.latent_factor == 4


def test_original_arguments_accept_and_ignore_n_embed():
    net = ControlNet(**controlnet_args(CONFIG, 3, 8), n_embed=16)  # as cldm.ControlNet, which has no output head
    assert net.config == CONFIG


def test_constructor_checks_and_messages():
    assert ControlNet(CONFIG, hint_channels=1).input_hint_block[0].in_channels == 1  # a depth / grayscale condition
    with pytest.raises(ValueError, match="^ControlNet: hint_channels must be positive, got 0$"):
        ControlNet(CONFIG, hint_channels=0)
    with pytest.raises(ValueError, match="^ControlNet: pass a UNetConfig or keyword arguments, not both$"):
        ControlNet(CONFIG, hint_channels=3, model_channels=32)


# ----------------------------------------------------------------------------- forward


def test_hint_message_names_height_and_width():
    net = tiny_net()
    x = torch.zeros(2, 4, 2, 3)
    with pytest.raises(ValueError, match=r"^ControlNet: the condition image must be \[2 or 1, 3, 16, 24\] "
                                         r"\(8x the 2x3 latents\), got \(2, 3, 16, 16\)$"):
        net(x, torch.zeros(2, 3, 16, 16), torch.tensor([1, 2]), torch.zeros(2, 3, 8))


def test_inputs_are_cast_to_the_parameters_dtype():
    net = tiny_net().double()
    x, t, context, hint = batch()
    with torch.no_grad():
        from_float32 = net(x, hint, t, context)
        from_float64 = net(x.double(), hint.double(), t, context.double())
    assert len(from_float32) == RESIDUALS
    assert all(a.dtype == torch.float64 and torch.equal(a, b) for a, b in zip(from_float32, from_float64))


def test_class_labels_with_a_scalar_timestep():
    config = UNetConfig(in_channels=4, model_channels=32, channel_mult=[1], num_res_blocks=1, attention_resolutions=[],
                        use_spatial_transformer=False, num_classes=3)
    net = tiny_net(config=config)
    x, _, _, hint = batch()
    y = torch.tensor([0, 2])
    with torch.no_grad():
        scalar = net(x, hint, 500, y=y)
        per_sample = net(x, hint, torch.tensor([500, 500]), y=y)
        other_labels = net(x, hint, 500, y=torch.tensor([1, 1]))
    assert len(scalar) == 3 and all(r.shape[0] == 2 for r in scalar)
    for index, (a, b, c) in enumerate(zip(scalar, per_sample, other_labels)):
        torch.testing.assert_close(a, b)
        if index > 0:  # after input block 0 (conv_in, which sees no embedding), each sample's own label counts
            assert not torch.allclose(a[0], c[0]) and not torch.allclose(a[1], c[1])


def test_a_python_timestep_goes_to_the_latents_device():
    # The meta device stands in for a GPU: a timestep made on the CPU would meet meta weights.
    net = ControlNet(CONFIG, hint_channels=3).to("meta")
    x, context = torch.zeros(2, 4, 4, 4, device="meta"), torch.zeros(2, 3, 8, device="meta")
    residuals = net(x, torch.zeros(1, 3, 32, 32, device="meta"), 7, context)
    assert [tuple(r.shape) for r in residuals] == [(2, 32, 4, 4), (2, 32, 4, 4), (2, 32, 2, 2), (2, 64, 2, 2),
                                                   (2, 64, 2, 2)]
    assert all(r.device.type == "meta" for r in residuals)


def test_from_unet_takes_the_unets_dtype():
    net = ControlNet.from_unet(UNetModel(CONFIG).double())
    assert all(p.dtype == torch.float64 for p in net.parameters())


def test_from_unet_refuses_encoder_weights_it_has_no_place_for():
    unet = UNetModel(CONFIG)
    unet.input_blocks[1].register_buffer("lora_scale", torch.ones(1))  # e.g. an adapter left attached
    with pytest.raises(CheckpointError, match=re.escape(
            "ControlNet.from_unet: the U-Net's encoder: ControlNet does not fit the weights: "
            "1 unexpected, e.g. ['input_blocks.1.lora_scale']") + "$"):
        ControlNet.from_unet(unet)


# ----------------------------------------------------------------------------- several ControlNets


def test_controlled_model_messages():
    with pytest.raises(ValueError, match="^ControlledModel needs at least one Control$"):
        ControlledModel(lambda *a, **k: None, [], batch=1)
    x, t, context, hint = batch(3)
    model = ControlledModel(lambda *a, **k: None, [Control(tiny_net(), hint[:2])], batch=2)
    with pytest.raises(ValueError, match=r"^ControlledModel: got 3 samples for 2 images \(expected B or 2B\)$"):
        model.residuals(x, t, context)


def test_guided_call_repeats_per_image_hints_for_both_halves():
    net = tiny_net()
    x, t, context, _ = batch(4)
    hint = batch(2)[3]  # one condition image per image, B = 2
    model = ControlledModel(lambda *a, **k: None, [Control(net, hint, scale=0.5)], batch=2)
    with torch.no_grad():
        guided = model.residuals(x, t, context)
        unconditional = net(x[:2], hint, t[:2], context[:2])
        conditional = net(x[2:], hint, t[2:], context[2:])
    assert len(guided) == RESIDUALS
    for r, a, b in zip(guided, unconditional, conditional):
        assert a.abs().max() > 0  # the unconditional half is controlled too (no guess mode)
        torch.testing.assert_close(r, 0.5 * torch.cat([a, b]))


def test_only_mid_control_keeps_the_middle_residuals_own_weight():
    control = Control(tiny_net(), torch.zeros(1, 3, 32, 32), scale=2.0, residual_scales=[1.0, 2.0, 3.0, 4.0, 5.0],
                      only_mid_control=True)
    assert control.weights() == [0.0, 0.0, 0.0, 0.0, 10.0]
    control.residual_scales = [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"^residual_scales needs 5 values \(one per input block, then the middle "
                                         r"block\), got 3$"):
        control.weights()


# ----------------------------------------------------------------------------- files


def test_save_writes_the_given_state_and_whether_a_decoder_is_included(tmp_path):
    net, other = tiny_net(), tiny_net(seed=5)
    save_controlnet(tmp_path / "ema.safetensors", net, state=other.state_dict())  # e.g. the EMA weights
    loaded = load_controlnet(tmp_path / "ema.safetensors").net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in other.state_dict().items())
    assert read_metadata(tmp_path / "ema.safetensors")["unet_decoder"] is False
    unet = UNetModel(CONFIG)
    decoder = {k: v for k, v in unet.state_dict().items() if k.startswith("out.")}
    save_controlnet(tmp_path / "unlocked.safetensors", net, unet_decoder=decoder)
    assert read_metadata(tmp_path / "unlocked.safetensors")["unet_decoder"] is True
    with pytest.raises(ValueError, match=r"^save_controlnet: unet_decoder holds 'input_blocks.0.0.weight', not a "
                                         r"U-Net output block / out weight$"):
        save_controlnet(tmp_path / "bad.safetensors", net, unet_decoder={"input_blocks.0.0.weight": torch.zeros(1)})


def test_file_control_defaults_and_settings(tmp_path):
    save_controlnet(tmp_path / "c.safetensors", tiny_net())
    file = load_controlnet(tmp_path / "c.safetensors")
    hint = torch.zeros(1, 3, 32, 32)
    plain = file.control(hint)  # no only_mid_control in the file's metadata: all residuals, strength 1
    assert (plain.scale, plain.guess_mode, plain.only_mid_control) == (1.0, False, False)
    assert plain.weights() == [1.0] * RESIDUALS
    chosen = file.control(hint, scale=0.5, guess_mode=True)
    assert (chosen.scale, chosen.guess_mode) == (0.5, True)


def test_original_weights_with_one_hint_channel_load_on_the_given_device(tmp_path):
    net = tiny_net(hint_channels=1)
    torch.save({f"control_model.{k}": v for k, v in net.state_dict().items()}, tmp_path / "control_depth.pth")
    unet = UNetModel(CONFIG)
    loaded = load_controlnet(tmp_path / "control_depth.pth", unet=unet)
    assert loaded.net.hint_channels == 1
    assert all(torch.equal(loaded.net.state_dict()[k], v) for k, v in net.state_dict().items())
    on_meta = load_controlnet(tmp_path / "control_depth.pth", unet=unet, device="meta")
    assert all(p.device.type == "meta" for p in on_meta.net.parameters())


def test_load_errors_name_the_file_and_the_files_keys(tmp_path):
    path = tmp_path / "unet.pth"
    torch.save({"model.diffusion_model.out.2.bias": torch.zeros(4)}, path)
    with pytest.raises(CheckpointError, match=re.escape(f"{path}: no ControlNet weights (neither control_model.* "
                                                        "nor bare input_hint_block.* keys)") + "$"):
        load_controlnet(path, unet=UNetModel(CONFIG))
    state = tiny_net().state_dict()
    del state["zero_convs.3.0.weight"]
    for name, prefix in (("control_v11p.pth", "control_model."), ("stand_alone.pth", "")):
        path = tmp_path / name
        torch.save({prefix + k: v for k, v in state.items()}, path)
        message = (f"{path}: the ControlNet its config describes does not fit the weights: "
                   f"1 missing, e.g. ['{prefix}zero_convs.3.0.weight']")
        with pytest.raises(CheckpointError, match=re.escape(message) + "$"):
            load_controlnet(path, unet=UNetModel(CONFIG))
