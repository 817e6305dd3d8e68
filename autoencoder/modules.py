"""Convolutional encoder and decoder shared by the KL and VQ autoencoders.

Parameter names follow the original latent-diffusion `Encoder`/`Decoder`, so their checkpoints
load unchanged: `down.{i}.block.{j}`, `down.{i}.downsample.conv`, `mid.{block_1,attn_1,block_2}`,
`up.{i}.block.{j}`, `up.{i}.upsample.conv`, `norm_out`, `conv_out`. `up` is indexed by resolution
level (`up.0` is the full-resolution level, run last), not in execution order.

Every layer works on NCHW and channels_last tensors alike: `model.to(memory_format=torch.channels_last)`
is honoured end to end. Convolutions are the oneDNN-backed `layers.Conv2d`, and without autograd
SiLU and the residual adds run in place on fresh temporaries.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from autoencoder.config import DDConfig
from layers import Conv2d, GroupNorm32, Upsample, add, attention, from_tokens, memory_format_of, silu, to_tokens


def normalize(channels: int, groups: int = 32) -> GroupNorm32:
    """The autoencoder's normalisation: GroupNorm with eps 1e-6 (LDM's `Normalize`, 32 groups)."""
    return GroupNorm32(groups, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    """norm -> SiLU -> 3x3 conv, twice, plus a (1x1-projected when channels change) skip.

    x: [B, in_channels, H, W] -> [B, out_channels, H, W]. No timestep input: an autoencoder has none.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = normalize(in_channels, groups)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(silu(self.norm1(x)))
        h = silu(self.norm2(h))  # conv1's output is let go here, not held through conv2 (a map less at the peak)
        return add(self.conv2(self.dropout(h)), self.nin_shortcut(x))


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with a residual connection.

    q, k, v and proj_out are 1x1 convolutions (the original parameter layout).
    x: [B, C, H, W] -> [B, C, H, W].
    """

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = normalize(channels, groups)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        # One head over all positions: tokens [B, H*W, 1, C].
        q, k, v = (to_tokens(conv(h)).unsqueeze(2) for conv in (self.q, self.k, self.v))
        out = from_tokens(attention(q, k, v).squeeze(2), like=x)
        return add(self.proj_out(out), x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (the original's
    asymmetric padding, which checkpoints depend on). [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def match_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`x` in channels_last when `weight` (a model's first conv) was put in channels_last.

    Converting once at the model's entry is cheaper than letting every convolution convert.
    """
    if memory_format_of(weight) == torch.channels_last:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def _inference_layout(x: torch.Tensor) -> torch.memory_format:
    """channels_last for CPU inference (oneDNN runs the decoder's wide-image, narrow-channel
    convolutions faster in it: bench/RESULTS.md), else x's own layout."""
    if memory_format_of(x) == torch.channels_last or (x.device.type == "cpu" and not torch.is_grad_enabled()):
        return torch.channels_last
    return torch.contiguous_format


def _attention(cfg: DDConfig, channels: int) -> nn.Module:
    return nn.Identity() if cfg.attn_type == "none" else AttnBlock(channels, cfg.norm_num_groups)


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (`mid.*`)."""

    def __init__(self, cfg: DDConfig, channels: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.dropout, cfg.norm_num_groups)
        self.attn_1 = _attention(cfg, channels)
        self.block_2 = ResnetBlock(channels, channels, cfg.dropout, cfg.norm_num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResnetBlocks, each followed by attention when `use_attn`, then an
    optional `downsample` (encoder) or `upsample` (decoder)."""

    def __init__(
        self, cfg: DDConfig, in_channels: int, out_channels: int, num_blocks: int, use_attn: bool,
        downsample: bool = False, upsample: bool = False,
    ):
        super().__init__()
        self.block = nn.ModuleList()
        self.attn = nn.ModuleList()
        for _ in range(num_blocks):
            self.block.append(ResnetBlock(in_channels, out_channels, cfg.dropout, cfg.norm_num_groups))
            if use_attn:
                self.attn.append(_attention(cfg, out_channels))
            in_channels = out_channels
        self.downsample = Downsample(out_channels) if downsample else None
        self.upsample = Upsample(out_channels) if upsample else None

    def stages(self) -> list[nn.Module]:
        """The modules this level runs, in order. The encoder and decoder run them themselves, so that a
        level's input is let go after its first block: called as a module, the level would hold it
        to the end (a 512 px SD decode held a 256 MiB map through two more blocks)."""
        stages: list[nn.Module] = []
        for i, block in enumerate(self.block):
            stages += [block, self.attn[i]] if len(self.attn) else [block]
        return stages + [module for module in (self.downsample, self.upsample) if module is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages():
            x = stage(x)
        return x


def check_ddconfig(cfg: DDConfig) -> None:
    """Reject ddconfigs the network cannot be built from, with a message naming the field."""
    if not cfg.ch_mult:
        raise ValueError("ddconfig.ch_mult must list at least one channel multiplier")
    for mult in cfg.ch_mult:
        if mult < 1 or (cfg.ch * mult) % cfg.norm_num_groups:
            raise ValueError(
                f"ddconfig: ch * ch_mult must be multiples of norm_num_groups={cfg.norm_num_groups}, "
                f"got ch={cfg.ch}, ch_mult={cfg.ch_mult}"
            )
    if cfg.num_res_blocks < 1:
        raise ValueError(f"ddconfig.num_res_blocks must be >= 1, got {cfg.num_res_blocks}")


class Encoder(nn.Module):
    """Image [B, in_channels, H, W] -> features [B, z_channels * (2 if double_z else 1), H/f, W/f]
    with f = 2 ** (len(ch_mult) - 1)."""

    def __init__(self, cfg: DDConfig):
        super().__init__()
        check_ddconfig(cfg)
        self.conv_in = Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        channels, resolution = cfg.ch, cfg.resolution
        for i, mult in enumerate(cfg.ch_mult):
            last = i == len(cfg.ch_mult) - 1
            self.down.append(
                Level(cfg, channels, cfg.ch * mult, cfg.num_res_blocks, resolution in cfg.attn_resolutions, downsample=not last)
            )
            channels = cfg.ch * mult
            resolution = resolution if last else resolution // 2
        self.mid = MidBlock(cfg, channels)
        self.norm_out = normalize(channels, cfg.norm_num_groups)
        self.conv_out = Conv2d(channels, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in [stage for level in self.down for stage in level.stages()]:
            h = stage(h)
        h = self.mid(h)
        return self.conv_out(silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [B, z_channels, h, w] -> image [B, out_ch, h*f, w*f]."""

    def __init__(self, cfg: DDConfig):
        super().__init__()
        check_ddconfig(cfg)
        channels = cfg.ch * cfg.ch_mult[-1]
        resolution = cfg.resolution // 2 ** (len(cfg.ch_mult) - 1)
        self.conv_in = Conv2d(cfg.z_channels, channels, 3, padding=1)
        self.mid = MidBlock(cfg, channels)
        levels = []
        for i in reversed(range(len(cfg.ch_mult))):
            levels.insert(0, Level(
                cfg, channels, cfg.ch * cfg.ch_mult[i], cfg.num_res_blocks + 1, resolution in cfg.attn_resolutions, upsample=i != 0
            ))
            channels = cfg.ch * cfg.ch_mult[i]
            resolution = resolution * 2 if i != 0 else resolution
        self.up = nn.ModuleList(levels)
        self.norm_out = normalize(channels, cfg.norm_num_groups)
        self.conv_out = Conv2d(channels, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z.contiguous(memory_format=_inference_layout(z))
        for stage in [self.conv_in, self.mid, *(stage for level in reversed(self.up) for stage in level.stages())]:
            h = stage(h)
        out = self.conv_out(silu(self.norm_out(h)))
        return out.contiguous(memory_format=memory_format_of(z))
