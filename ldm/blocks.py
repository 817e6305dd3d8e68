"""Convolutional building blocks of the diffusion U-Net: timestep embedding, ResBlock, resampling.

Module and parameter names follow the original LDM/Stable Diffusion `openaimodel.py`
(`in_layers.0`, `emb_layers.1`, `out_layers.3`, `op`, `conv`, `skip_connection`), so their
checkpoints load with `strict=True`. The forward passes are written for speed on CPU: every
op keeps the input's memory format (NCHW or channels_last, chosen by the U-Net), convs run
with fused epilogues (`ldm.kernels`), and inference (no autograd) applies SiLU and the
embedding add in place instead of allocating new tensors.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm.kernels import conv2d, upsample_conv2d


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps.

    timesteps: [B]. Returns [B, dim] float32 laid out as [cos(t f_0..f_{d/2}), sin(...)], with
    frequencies f_i = max_period^(-i / (dim/2)); an odd `dim` gets a trailing zero column.
    """
    half = dim // 2
    exponents = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm whose statistics are computed in float32 and cast back to the input dtype.

    Half-precision mean/variance over thousands of activations lose too much precision.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps)
        return out.to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The U-Net's normalisation layer: GroupNorm with 32 groups, in float32."""
    return GroupNorm32(32, channels, eps=eps)


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, in place when autograd does not need `x` (saves a full-size allocation per call)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return F.silu(x)
    return F.silu(x, inplace=True)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` (output layers start as identity maps of the residual)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _check_dims(dims: int) -> None:
    if dims != 2:
        raise ValueError(f"only 2-D U-Nets are supported (dims=2), got dims={dims}")


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (`conv`).

    x: [B, channels, H, W] -> [B, out_channels, 2H, 2W].
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        _check_dims(dims)
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the number of channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.conv.padding == (1, 1):
            return upsample_conv2d(x, self.conv.weight, self.conv.bias)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv (`op`) or 2x2 average pooling.

    x: [B, channels, H, W] -> [B, out_channels, H/2, W/2].
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1):
        super().__init__()
        _check_dims(dims)
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
        elif self.out_channels == channels:
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)
        else:
            raise ValueError("Downsample without a conv cannot change the number of channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding.

    h = conv(silu(norm(x))); h = h + proj(emb) (or norm(h) * (1 + scale) + shift with
    `use_scale_shift_norm`); h = conv(dropout(silu(norm(h)))); return skip(x) + h.
    With `up`/`down` both paths are resampled (BigGAN style, `resblock_updown`).

    x: [B, channels, H, W], emb: [B, emb_channels] -> [B, out_channels, H', W'].
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        _check_dims(dims)
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_norm, _, in_conv = self.in_layers
        out_norm, _, out_dropout, out_conv = self.out_layers
        h = silu(in_norm(x))
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = conv2d(h, in_conv.weight, in_conv.bias, padding=1)

        emb_out = self.emb_layers[1](F.silu(emb)).to(h.dtype)[:, :, None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, out_norm(h), 1 + scale)
        else:
            h = out_norm(_add(h, emb_out))
        skip = self.skip_connection
        if isinstance(skip, nn.Conv2d):
            x = conv2d(x, skip.weight, skip.bias, padding=skip.padding[0])
        return conv2d(out_dropout(silu(h)), out_conv.weight, out_conv.bias, padding=1, residual=x)


def _add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b, written into `a` when autograd does not need it (a must be a fresh temporary)."""
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return a + b
    return a.add_(b)
