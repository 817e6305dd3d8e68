"""Inference fast paths against the plain autograd path: the autoencoder's fused oneDNN kernels and
channels_last decoding, and tracing under torch.compile (ldm/kernels.py, autoencoder/modules.py)."""
from __future__ import annotations

import torch

from autoencoder.config import DDConfig
from autoencoder.kl import AutoencoderKL
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
    assert not any("mkldnn" in op for op in traced_ops)
