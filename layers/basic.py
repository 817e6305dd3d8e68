"""Small layers both stages use: float32 GroupNorm, SiLU and residual adds that reuse fresh
temporaries when autograd does not need them, nearest 2x upsampling with an optional conv, and
zero initialisation."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layers.fused import Conv2d, memory_format_of, runs_plain


# torch's channels_last GroupNorm kernel splits feature maps of at least this many pixels across threads
# (smaller ones go one group to a thread), so how a sample's statistics are summed follows the batch size.
CHANNELS_LAST_SPLIT_PIXELS = 1024


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype, cast back to it: statistics over
    thousands of activations lose too much precision in fp16/bf16.

    In CPU inference a sample's output does not depend on the batch: a channels_last batch of large
    maps on several threads (which torch's kernel would split by batch and pixels together) is
    normalised one sample at a time.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1 and self._split_by_batch(x):
            return torch.cat([self._norm(sample) for sample in x.split(1)])
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if x.dtype == torch.bfloat16 and x.device.type == "cpu":
            # torch's CPU kernel takes bf16 maps with float32 parameters and computes in float32 inside,
            # backward too: the same numbers without two full-size casts (2-3x faster per norm at SD 1.x's
            # shapes, forward and backward).
            return F.group_norm(x, self.num_groups, weight, bias, self.eps)
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)

    @staticmethod
    def _split_by_batch(x: torch.Tensor) -> bool:
        return (x.dim() == 4 and x.shape[2] * x.shape[3] >= CHANNELS_LAST_SPLIT_PIXELS and x.device.type == "cpu"
                and torch.get_num_threads() > 1 and not torch.is_grad_enabled()
                and not torch.compiler.is_compiling() and memory_format_of(x) == torch.channels_last)


def _may_overwrite(a: torch.Tensor, b: torch.Tensor | None = None) -> bool:
    return not torch.is_grad_enabled() or not (a.requires_grad or (b is not None and b.requires_grad))


def silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU, written into `x` when autograd does not need it: only for a fresh temporary `x`."""
    return F.silu(x, inplace=_may_overwrite(x))


class SiLU(nn.SiLU):
    """nn.SiLU that overwrites its input when autograd does not need it (saves a full-size
    allocation per call). Only where its input is a fresh temporary, e.g. right after a norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu(x)


def add(fresh: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """fresh + other, written into `fresh` (a temporary nobody else holds) when autograd allows.
    `other` has fresh's shape or broadcasts to it."""
    if _may_overwrite(fresh, other):
        return fresh.add_(other)
    return fresh + other


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of `module` (output layers start as identity maps of the residual)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv (`conv`), as in the
    original LDM U-Net and autoencoder. x: [B, channels, H, W] -> [B, out_channels, 2H, 2W].

    An unwrapped, unhooked conv runs folded onto the low-resolution input (`Conv2d.upsampled`).
    """

    def __init__(self, channels: int, use_conv: bool = True, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = Conv2d(channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a conv cannot change the number of channels")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv and runs_plain(self.conv):
            return self.conv.upsampled(x)
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x
