"""Convolutional building blocks of the diffusion U-Net: timestep embedding, ResBlock, downsampling.

Module and parameter names follow the original LDM/Stable Diffusion `openaimodel.py`
(`in_layers.0`, `emb_layers.1`, `out_layers.3`, `op`, `conv`, `skip_connection`), so their
checkpoints load with `strict=True`. Every layer is a module that runs: convs and linears are the
oneDNN-backed `layers.Conv2d` / `layers.Linear`, and inference (no autograd) applies SiLU and the
adds in place on fresh temporaries instead of allocating new tensors.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from layers import Conv2d, GroupNorm32, Linear, SiLU, Upsample, add, zero_module


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


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The U-Net's normalisation layer: GroupNorm with 32 groups, in float32."""
    return GroupNorm32(32, channels, eps=eps)


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 conv (`op`) or 2x2 average pooling.

    x: [B, channels, H, W] -> [B, out_channels, H/2, W/2].
    """

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.op = Conv2d(channels, self.out_channels, 3, stride=2, padding=padding)
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

    x: [B, channels, H, W], emb: [B or 1, emb_channels] (one row when the batch shares its timestep)
    -> [B, out_channels, H', W'].
    """

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint

        self.in_layers = nn.Sequential(
            normalization(channels), SiLU(), Conv2d(channels, self.out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        # Not the in-place SiLU: every ResBlock reads the same embedding.
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), SiLU(), nn.Dropout(p=dropout),
            zero_module(Conv2d(self.out_channels, self.out_channels, 3, padding=1)))
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and self.training and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        in_norm, in_act, in_conv = self.in_layers
        h = in_act(in_norm(x))
        if self.updown:
            h, x = self.h_upd(h), self.x_upd(x)
        h = in_conv(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        out_norm, out_act, out_dropout, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, out_norm(h), 1 + scale)
        else:
            h = out_norm(add(h, emb_out))
        return add(out_conv(out_dropout(out_act(h))), self.skip_connection(x))
