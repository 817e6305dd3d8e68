"""Tiny stage-1 models and test images shared by the autoencoder tests."""
import math

import torch

import autoencoder as ae

TINY_KL = dict(
    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
    ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)
TINY_VQ = {**TINY_KL, "double_z": False}


def tiny_kl(**kw) -> ae.AutoencoderKL:
    torch.manual_seed(0)
    return ae.AutoencoderKL(ddconfig=TINY_KL, embed_dim=4, **kw)


def tiny_vq(**kw) -> ae.VQModel:
    torch.manual_seed(0)
    return ae.VQModel(ddconfig=TINY_VQ, n_embed=64, embed_dim=4, **kw)


def pattern_images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Smooth, distinct images in [-1, 1]: coloured blobs and stripes."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    images = []
    for i in range(n):
        cx, cy = math.cos(i * 1.7) * 0.5, math.sin(i * 1.3) * 0.5
        blob = torch.exp(-((x - cx) ** 2 + (y - cy) ** 2) * 6)
        stripes = torch.sin((x * (i + 1) + y) * 3.0)
        images.append(torch.stack([blob * 2 - 1, stripes * 0.8, (blob - stripes) * 0.5]))
    return torch.stack(images).clamp(-1, 1)
