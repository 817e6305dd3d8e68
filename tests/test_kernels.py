"""Inference fast paths against the plain ops they replace: the autoencoder's oneDNN layers and
channels_last decoding, the folded upsampling conv, short-context attention, and tracing under
torch.compile (layers/, autoencoder/modules.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from autoencoder.config import DDConfig
from autoencoder.kl import AutoencoderKL
from layers import Conv2d, attention
from layers.attention import cpu_kernel
from ldm.unet import UNetModel

TINY_VAE = DDConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=16, norm_num_groups=8)
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                 num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True,
                 transformer_depth=1, context_dim=24, legacy=False)


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised layers would hide errors) and eval mode."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0))
    return model.eval()


def test_autoencoder_inference_path_matches_autograd_path():
    # No autograd: fused conv + residual, in-place SiLU, channels_last inside the decoder.
    model = randomized(AutoencoderKL(ddconfig=TINY_VAE, embed_dim=4))
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast_image, fast_moments = model.decode(z), model.encode(x).mean
    plain_image, plain_moments = model.decode(z), model.encode(x).mean
    assert plain_image.requires_grad and not fast_image.requires_grad
    assert fast_image.abs().max() > 0.1
    torch.testing.assert_close(fast_image, plain_image.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast_moments, plain_moments.detach(), atol=1e-5, rtol=1e-5)


def test_decoder_returns_its_input_layout():
    model = randomized(AutoencoderKL(ddconfig=TINY_VAE, embed_dim=4))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        nchw = model.decode(z)
        channels_last = model.decode(z.contiguous(memory_format=torch.channels_last))
    assert nchw.is_contiguous()
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    torch.testing.assert_close(channels_last, nchw)


def test_unet_traces_plain_ops_under_torch_compile():
    # Dynamo must trace plain ops, not the oneDNN calls (inductor cannot lower them). A recording
    # backend runs the traced graph without compiling C++, so this takes seconds.
    torch.manual_seed(0)
    model = randomized(UNetModel(**TINY_UNET))
    generator = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 5, 24, generator=generator)
    t = torch.tensor([10, 700])
    traced_ops = []

    def recording_backend(graph_module, example_inputs):
        traced_ops.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return graph_module.forward

    compiled = torch.compile(model, backend=recording_backend, fullgraph=True)
    with torch.no_grad():
        expected = model(x, t, context)
        torch.testing.assert_close(compiled(x, t, context), expected, atol=1e-5, rtol=1e-5)
    assert any("conv2d" in op for op in traced_ops)
    assert any("scaled_dot_product_attention" in op for op in traced_ops)  # not the short-context path
    assert not any("mkldnn" in op for op in traced_ops)


def upsample_then_conv(x, weight, bias):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


def upsample_conv2d(x, weight, bias=None):
    """The folded path of a `layers.Conv2d` holding `weight` and `bias`."""
    conv = Conv2d(weight.shape[1], weight.shape[0], 3, padding=1, bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv.upsampled(x)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_folded_upsample_conv_matches_upsampling_then_conv(layout, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=generator).contiguous(memory_format=layout)  # odd, non-square
    weight = torch.randn(10, 6, 3, 3, generator=generator)
    bias = torch.randn(10, generator=generator) if with_bias else None
    with torch.no_grad():
        out = upsample_conv2d(x, weight, bias)
    assert out.shape == (2, 10, 10, 14)
    assert out.is_contiguous(memory_format=layout)
    torch.testing.assert_close(out, upsample_then_conv(x, weight, bias), atol=1e-5, rtol=1e-5)


def test_folded_upsample_conv_in_bfloat16_stays_close_to_float32():
    generator = torch.Generator().manual_seed(3)
    x, weight = torch.randn(1, 8, 4, 4, generator=generator), torch.randn(8, 8, 3, 3, generator=generator) * 0.1
    with torch.no_grad():
        half = upsample_conv2d(x.bfloat16(), weight.bfloat16())
    reference = upsample_then_conv(x, weight, None)
    assert half.dtype == torch.bfloat16
    assert (half.float() - reference).abs().max() < 0.02 * reference.abs().max()


def test_folded_upsample_conv_follows_weight_updates_and_keeps_gradients():
    generator = torch.Generator().manual_seed(1)
    conv = Conv2d(4, 4, 3, padding=1)
    x = torch.randn(1, 4, 6, 6, generator=generator)
    with torch.no_grad():
        first = conv.upsampled(x)
        conv.weight.mul_(-2.0)  # an in-place update, as an optimizer or EMA makes
        second = conv.upsampled(x)
        torch.testing.assert_close(second, upsample_then_conv(x, conv.weight, conv.bias), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(first, second)
    with torch.inference_mode():  # weights made in inference mode have no version counter
        fresh = Conv2d(4, 4, 3, padding=1, bias=False)
        torch.testing.assert_close(fresh.upsampled(x), upsample_then_conv(x, fresh.weight, None), atol=1e-5, rtol=1e-5)
    out = conv.upsampled(x.requires_grad_())  # training: folded through autograd's ops
    out.square().sum().backward()
    assert conv.weight.grad is not None and x.grad.shape == x.shape


class ConvShapes(TorchFunctionMode):
    """Records the weight shape of every F.conv2d call."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.conv2d:
            self.shapes.append(tuple(args[1].shape))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_folded_upsample_conv_in_training_matches_upsampling_then_conv_in_value_and_gradients(precision):
    """Training runs the fold (one 2x2 conv with 4x the output channels) through autograd: the output and
    the gradients of input, weight and bias are those of upsampling then convolving in float32 (bf16
    autocast: to 2% of each tensor's largest value)."""
    generator = torch.Generator().manual_seed(4)
    conv = Conv2d(6, 10, 3, padding=1)
    x = torch.randn(2, 6, 5, 7, generator=generator)
    grad_out = torch.randn(2, 10, 10, 14, generator=generator)
    results = []
    for fold in (True, False):
        conv.zero_grad()
        leaf = x.clone().requires_grad_()
        autocast = fold and precision == "bf16"  # the reference: float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), ConvShapes() as convs:
            out = conv.upsampled(leaf) if fold else conv(F.interpolate(leaf, scale_factor=2.0, mode="nearest"))
        assert convs.shapes == [(40, 6, 2, 2) if fold else (10, 6, 3, 3)]
        out.float().backward(grad_out)
        results.append([out.float(), leaf.grad, conv.weight.grad.clone(), conv.bias.grad.clone()])
    for folded, plain in zip(*results):
        if precision == "fp32":
            torch.testing.assert_close(folded, plain, atol=2e-5, rtol=1e-5)
        else:
            assert (folded - plain).abs().max() <= 0.02 * plain.abs().max()


def test_short_context_attention_matches_sdpa():
    generator = torch.Generator().manual_seed(2)
    q = torch.randn(2, 12, 3, 8, generator=generator)  # [B, L, H, D]
    k, v = (torch.randn(2, 5, 3, 8, generator=generator) for _ in range(2))
    with torch.no_grad():
        assert cpu_kernel(q, k) == "written-out"
        sdpa = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
        torch.testing.assert_close(attention(q, k, v), sdpa, atol=1e-6, rtol=1e-5)
        long_k = torch.randn(2, 200, 3, 8, generator=generator)
        assert cpu_kernel(q, long_k) == "sdpa"
        assert cpu_kernel(q.bfloat16(), k.bfloat16()) == "sdpa"  # bf16 inference: torch's kernel


def _sdpa_reference(q, k, v):
    return F.scaled_dot_product_attention(*(t.double().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)


@pytest.mark.parametrize("queries, keys, kernel", [
    (12, 5, {"fp32": "written-out", "bf16": "written-out"}),  # a text context
    (12, 200, {"fp32": "sdpa", "bf16": "written-out"}),  # a small feature map's self-attention
    (12 * 1024, 200, {"fp32": "sdpa", "bf16": "sdpa-float32"}),  # a large one
])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_attention_matches_sdpa_in_value_and_gradient(queries, keys, kernel, precision):
    """Each of training's kernels (written out, SDPA, SDPA in float32 for bf16) gives attention and its
    input gradients: against float64 SDPA."""
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(1, queries, 3, 8, generator=generator)
    k, v = (torch.randn(1, keys, 3, 8, generator=generator) for _ in range(2))
    grad_out = torch.randn(q.shape, generator=generator)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    assert cpu_kernel(*(t.to(dtype) for t in leaves[:2])) == kernel[precision]
    out = attention(*(t.to(dtype) for t in leaves))
    assert out.dtype == dtype
    out.float().backward(grad_out)
    exact = [t.double().requires_grad_() for t in (q, k, v)]
    reference = _sdpa_reference(*exact)
    reference.backward(grad_out.double())
    tolerance = dict(atol=3e-2, rtol=3e-2) if precision == "bf16" else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.double(), reference, **tolerance)
    for leaf, exact_leaf in zip(leaves, exact):
        torch.testing.assert_close(leaf.grad.double(), exact_leaf.grad, **tolerance)
