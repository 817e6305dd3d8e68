"""Tests for the latent-diffusion U-Net (ldm/unet.py, ldm/blocks.py, ldm/attention.py)."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from layers import Conv2d, GroupNorm32, Linear, attention_backend, get_attention_backend, set_attention_backend
from ldm.attention import AttentionBlock
from ldm.blocks import timestep_embedding
from ldm.unet import UNetModel
from conftest import load_script

SD1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
           num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
           transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
SD2 = dict(SD1, num_heads=-1, num_head_channels=64, context_dim=1024, use_linear_in_transformer=True, use_fp16=True)
# Tiny text-conditioned configs: SD 1.x style (conv projections) and SD 2.x style (linear, head width).
TINY = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True,
            transformer_depth=1, context_dim=24, legacy=False)
TINY_SD2 = dict(TINY, num_heads=-1, num_head_channels=8, use_linear_in_transformer=True, transformer_depth=2)
# Class-conditional LDM style: AttentionBlock (qkv/proj_out), scale-shift norm, ResBlock resampling.
TINY_CLASS = dict(image_size=8, in_channels=3, out_channels=3, model_channels=32, attention_resolutions=[2],
                  num_res_blocks=1, channel_mult=[1, 2], num_heads=4, num_classes=10, use_scale_shift_norm=True,
                  resblock_updown=True)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give zero-initialised layers random weights so that every path reaches the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def tiny_model(config: dict = TINY, seed: int = 0) -> UNetModel:
    torch.manual_seed(seed)
    return randomized(UNetModel(**config).eval(), seed)


def tiny_inputs(config: dict = TINY, batch: int = 2, size: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], size, size, generator=generator)
    t = torch.tensor([3, 917])[:batch]
    context = torch.randn(batch, 5, config["context_dim"], generator=generator) if config.get("context_dim") else None
    return x, t, context


# ----------------------------------------------------------------------------- layout / names


def test_sd1_parameter_count_on_meta_device():
    with torch.device("meta"):
        model = UNetModel(**SD1)
    assert sum(p.numel() for p in model.parameters()) == 859_520_964


def test_sd1_parameter_names_and_shapes():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in UNetModel(**SD1).state_dict().items()}
    expected = {
        "time_embed.0.weight": (1280, 320),
        "time_embed.2.weight": (1280, 1280),
        "input_blocks.0.0.weight": (320, 4, 3, 3),
        "input_blocks.1.0.in_layers.0.weight": (320,),
        "input_blocks.1.0.in_layers.2.weight": (320, 320, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (320, 1280),
        "input_blocks.1.0.out_layers.3.weight": (320, 320, 3, 3),
        "input_blocks.1.1.norm.weight": (320,),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.bias": (320,),
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight": (320, 1280),
        "input_blocks.1.1.transformer_blocks.0.norm3.weight": (320,),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "middle_block.0.in_layers.2.weight": (1280, 1280, 3, 3),
        "middle_block.1.proj_in.weight": (1280, 1280, 1, 1),
        "middle_block.1.proj_out.weight": (1280, 1280, 1, 1),
        "output_blocks.0.0.skip_connection.weight": (1280, 2560, 1, 1),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "output_blocks.11.1.transformer_blocks.0.attn1.to_v.weight": (320, 320),
        "out.0.weight": (320,),
        "out.2.weight": (4, 320, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert len(shapes) == 686
    assert not any(k.startswith(("input_blocks.10.1", "input_blocks.3.1", "output_blocks.0.1", "label_emb"))
                   for k in shapes)
    assert "output_blocks.2.2.conv.weight" not in shapes and "input_blocks.12.0.op.weight" not in shapes


def test_sd2_config_linear_projections_and_head_width():
    with torch.device("meta"):
        model = UNetModel(**SD2)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["input_blocks.1.1.proj_in.weight"] == (320, 320)
    assert shapes["middle_block.1.proj_out.weight"] == (1280, 1280)
    assert shapes["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"] == (320, 1024)
    heads = [(m.heads, m.dim_head) for name, m in model.named_modules() if name.endswith("attn1")]
    assert heads[0] == (5, 64) and heads[-1] == (5, 64) and (20, 64) in heads
    assert sum(p.numel() for p in model.parameters()) == 865_910_724


@pytest.mark.parametrize("legacy, expected", [(True, (1, 96)), (False, (1, 64))])
def test_head_rule_when_channels_are_not_a_multiple_of_head_channels(legacy, expected):
    # 96 channels, num_head_channels 64: one head; `legacy` makes it 96 wide, otherwise 64 wide.
    config = dict(TINY, model_channels=96, channel_mult=[1], attention_resolutions=[1], num_heads=-1,
                  num_head_channels=64, legacy=legacy)
    model = UNetModel(**config)
    attn = model.input_blocks[1][1].transformer_blocks[0].attn1
    assert (attn.heads, attn.dim_head) == expected
    assert model(*tiny_inputs(config)).shape == (2, 4, 8, 8)


def test_attention_block_heads_legacy_rule():
    # AttentionBlock: legacy passes num_head_channels through, so the head count comes from num_heads;
    # upsampling blocks use num_heads_upsample.
    model = UNetModel(**dict(TINY_CLASS, legacy=True, num_heads=2, num_heads_upsample=4))
    blocks = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert [b.num_heads for b in blocks] == [2, 2, 4, 4]
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["input_blocks.3.1.qkv.weight"] == (192, 64, 1)
    assert shapes["input_blocks.3.1.proj_out.weight"] == (64, 64, 1)
    assert shapes["label_emb.weight"] == (10, 128)
    assert shapes["input_blocks.1.0.emb_layers.1.weight"] == (64, 128)  # scale and shift
    assert "input_blocks.2.0.in_layers.2.weight" in shapes  # ResBlock downsampler, no `op`
    non_legacy = UNetModel(**dict(TINY_CLASS, legacy=False, num_heads=2, num_heads_upsample=4))
    assert [m.num_heads for m in non_legacy.modules() if isinstance(m, AttentionBlock)] == [2, 2, 2, 2]


@pytest.mark.parametrize("bad, message", [
    (dict(dims=3), "dims"),
    (dict(n_embed=16), "n_embed"),
    (dict(context_dim=None), "context_dim"),
    (dict(num_heads=-1), "num_heads"),
    (dict(num_res_blocks=[1, 1, 1]), "num_res_blocks"),
    (dict(num_attention_blocks=[2, 1]), "num_attention_blocks"),
])
def test_bad_config_gives_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**dict(TINY, **bad))


# ----------------------------------------------------------------------------- numerics


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0.0, 10.0, 999.5])
    emb = timestep_embedding(t, 6)
    freqs = torch.tensor([10000 ** (-i / 3) for i in range(3)])
    expected = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    torch.testing.assert_close(emb, expected)
    assert timestep_embedding(t, 7).shape == (3, 7) and (timestep_embedding(t, 7)[:, -1] == 0).all()


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_group_norm_runs_in_float32_and_returns_input_dtype(grad):
    norm = GroupNorm32(4, 8)
    with torch.no_grad():
        norm.weight.normal_(1, 0.5), norm.bias.normal_(0, 0.5)
    x = (torch.randn(2, 8, 5, 5) * 100 + 1000).bfloat16()  # statistics in bf16 would lose the variance
    with torch.set_grad_enabled(grad):
        out = norm(x.requires_grad_(grad))
    assert out.dtype == torch.bfloat16
    exact = x.detach().double().requires_grad_()
    expected = F.group_norm(exact, 4, norm.weight.double(), norm.bias.double(), eps=1e-5)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=1e-2)
    if grad:  # the gradients in float32 too, against float64's
        upstream = torch.randn(out.shape)
        out.backward(upstream.bfloat16())
        expected.backward(upstream.double())
        torch.testing.assert_close(x.grad.double(), exact.grad, atol=5e-4, rtol=1e-2)
        assert norm.weight.grad.dtype == torch.float32


def test_output_shape_dtype_and_layout():
    model = tiny_model()
    x, t, context = tiny_inputs(batch=2, size=16)
    with torch.no_grad():
        out = model(x, t, context)
        scalar_t = model(x, torch.tensor(3.0), context)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()  # NCHW in, NCHW out
    assert torch.isfinite(out).all()
    with torch.no_grad():
        torch.testing.assert_close(scalar_t, model(x, torch.tensor([3.0, 3.0]), context))
    torch.testing.assert_close(out[0], scalar_t[0])  # t = [3, 917]: only the second sample changes
    assert not torch.allclose(out[1], scalar_t[1])


def test_fresh_model_predicts_zero():
    model = UNetModel(**TINY)  # `out.2` is zero-initialised
    x, t, context = tiny_inputs()
    with torch.no_grad():
        assert (model(x, t, context) == 0).all()


def test_deterministic_under_seed():
    x, t, context = tiny_inputs()
    with torch.no_grad():
        a = tiny_model(seed=3)(x, t, context)
        b = tiny_model(seed=3)(x, t, context)
        c = tiny_model(seed=4)(x, t, context)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("config", [TINY, TINY_SD2], ids=["sd1-style", "sd2-style"])
def test_attention_backends_agree(config):
    model = tiny_model(config)
    x, t, context = tiny_inputs(config)
    before = get_attention_backend()
    with torch.no_grad():
        with attention_backend("sdpa"):
            sdpa = model(x, t, context)
        with attention_backend("reference"):
            reference = model(x, t, context)
    assert get_attention_backend() == before
    torch.testing.assert_close(sdpa, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("flash3")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ValueError, match="not installed"):
            set_attention_backend("xformers")


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_block_matches_original_qkv_layout(new_order):
    # The original computes qkv with a Conv1d over [B, C, T] and splits heads from channels:
    # legacy order reshapes to [B*H, 3*ch, T] (per head q|k|v), the new order chunks q|k|v first.
    torch.manual_seed(0)
    block = randomized(AttentionBlock(64, num_heads=4, use_new_attention_order=new_order))
    x = torch.randn(2, 64, 3, 5)
    b, c, heads, ch = 2, 64, 4, 16
    qkv = F.conv1d(block.norm(x).reshape(b, c, -1), block.qkv.weight, block.qkv.bias)
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, -1) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    h = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, -1)
    expected = x + F.conv1d(h, block.proj_out.weight, block.proj_out.bias).reshape(x.shape)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def test_class_conditional_model_needs_labels():
    model = tiny_model(TINY_CLASS)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 500])
    with torch.no_grad():
        out_a = model(x, t, y=torch.tensor([0, 1]))
        out_b = model(x, t, y=torch.tensor([0, 7]))
    assert out_a.shape == x.shape
    torch.testing.assert_close(out_a[0], out_b[0])
    assert not torch.allclose(out_a[1], out_b[1])
    with pytest.raises(ValueError, match="class labels"):
        model(x, t)


def control_residuals(model: UNetModel, x, t, context, scale: float) -> list[torch.Tensor]:
    """Random ControlNet-style residuals: one per input block output, then one for the middle block."""
    shapes = []
    blocks = [*model.input_blocks, model.middle_block]
    hooks = [b.register_forward_hook(lambda module, args, out: shapes.append(out.shape)) for b in blocks]
    with torch.no_grad():
        model(x, t, context)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(shape, generator=generator) * scale for shape in shapes]


def test_control_residuals():
    model = tiny_model()
    x, t, context = tiny_inputs()
    zeros = control_residuals(model, x, t, context, 0.0)
    ones = control_residuals(model, x, t, context, 1.0)
    assert len(zeros) == len(model.input_blocks) + 1
    with torch.no_grad():
        plain = model(x, t, context)
        torch.testing.assert_close(model(x, t, context, control=zeros), plain)
        controlled = model(x, t, context, control=ones)
        mid_only = model(x, t, context, control=ones, only_mid_control=True)
        mid_only_other_skips = model(x, t, context, control=zeros[:-1] + ones[-1:], only_mid_control=True)
    assert len(ones) == len(model.input_blocks) + 1  # the caller's list is left alone
    assert not torch.allclose(controlled, plain, atol=1e-3)
    assert not torch.allclose(mid_only, plain, atol=1e-3)
    assert not torch.allclose(mid_only, controlled, atol=1e-3)
    torch.testing.assert_close(mid_only, mid_only_other_skips)
    with pytest.raises(ValueError, match="control needs"):
        model(x, t, context, control=ones[1:])


def test_gradient_checkpointing_gives_same_gradients():
    x, t, context = tiny_inputs()
    grads = []
    for use_checkpoint in (False, True):
        model = tiny_model(dict(TINY, use_checkpoint=use_checkpoint)).train()
        model(x, t, context).square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], atol=1e-6, rtol=1e-5, msg=key)
    assert grads[0]["input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].abs().sum() > 0


def test_channels_last_input_gives_the_same_output():
    model = tiny_model(TINY_SD2)
    x, t, context = tiny_inputs(TINY_SD2)
    with torch.no_grad():
        nchw = model(x, t, context)
        channels_last = model(x.contiguous(memory_format=torch.channels_last), t, context)
    torch.testing.assert_close(channels_last, nchw, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [TINY_SD2, TINY_CLASS], ids=["sd2-style", "class-conditional"])
def test_fused_inference_path_matches_autograd_path(config):
    # Without autograd the layers run fused oneDNN kernels; with it, plain differentiable ops.
    model = tiny_model(config)
    x, t, context = tiny_inputs(config)
    y = torch.tensor([2, 9]) if config.get("num_classes") else None
    with torch.no_grad():
        fused = model(x, t, context, y=y)
    plain = model(x, t, context, y=y)
    assert plain.requires_grad and not fused.requires_grad
    torch.testing.assert_close(fused, plain.detach(), atol=1e-5, rtol=1e-5)


def test_onednn_layers_match_plain_ops():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 24, generator=generator)
    dense = Linear(24, 40)
    image = torch.randn(2, 8, 6, 6, generator=generator).contiguous(memory_format=torch.channels_last)
    conv = Conv2d(8, 16, 3, stride=2, padding=1)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), F.linear(x, dense.weight, dense.bias))
        out = conv(image)
        torch.testing.assert_close(out, F.conv2d(image, conv.weight, conv.bias, 2, 1), atol=1e-5, rtol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)


def test_low_precision_stays_close_to_float32():
    model = tiny_model(TINY_SD2)
    x, t, context = tiny_inputs(TINY_SD2)
    with torch.no_grad():
        reference = model(x, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = model(x, t, context)
        half = tiny_model(TINY_SD2).half()(x, t, context)
    scale = reference.abs().max()
    assert autocast.dtype == half.dtype == torch.float32  # returned in the input's dtype
    assert (autocast - reference).abs().max() < 0.05 * scale
    assert (half - reference).abs().max() < 0.01 * scale


def test_strict_state_dict_round_trip():
    source, target = tiny_model(TINY_SD2, seed=0), tiny_model(TINY_SD2, seed=1)
    target.load_state_dict(source.state_dict(), strict=True)
    x, t, context = tiny_inputs(TINY_SD2)
    with torch.no_grad():
        assert torch.equal(source(x, t, context), target(x, t, context))


# ----------------------------------------------------------------------------- diffusers oracle


@pytest.mark.parametrize("config", [TINY, TINY_SD2], ids=["sd1-style", "sd2-style"])
def test_matches_diffusers_with_the_same_weights(config):
    pytest.importorskip("diffusers")
    model = tiny_model(config)
    twin = load_script("bench/unet_speed.py").diffusers_twin(model, config)
    x, t, context = tiny_inputs(config, size=16)
    with torch.no_grad():
        ours = model(x, t, context)
        theirs = twin(x, t, context).sample
    assert ours.abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
