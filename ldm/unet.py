"""The conditional U-Net of latent diffusion (LDM / Stable Diffusion 1.x and 2.x).

`UNetModel` takes the `params` of the original YAML configs (`unet_config.params`) as keyword
arguments and names its parameters like the original, so `model.diffusion_model.*` weights of
those checkpoints load with `strict=True`.

Layout (SD 1.x numbers): `input_blocks.0` conv_in; then per level `num_res_blocks` x
[ResBlock (+ SpatialTransformer at attention resolutions)] and a Downsample between levels;
`middle_block` = ResBlock, attention, ResBlock; `output_blocks` mirror the input side, each
starting with a ResBlock on [h, skip] concatenated, with an Upsample closing every level but
the last; `out` = GroupNorm, SiLU, zero-initialised conv.
"""
from __future__ import annotations

import torch
from torch import nn

from ldm.attention import AttentionBlock, SpatialTransformer
from ldm.blocks import Downsample, ResBlock, Upsample, normalization, timestep_embedding, zero_module

class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """Timestep- (and optionally class- / text-) conditioned U-Net predicting noise or v.

    Constructor arguments are those of the original `openaimodel.UNetModel`; see the module
    docstring. Unsupported originals: `dims` other than 2 and `n_embed` (codebook prediction).
    `use_fp16` is accepted for config compatibility only: precision follows the parameters'
    dtype (`model.half()`) or a `torch.autocast` context, as the original scripts used.
    """

    def __init__(
        self,
        image_size: int | None,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | list[int],
        attention_resolutions: list[int],
        dropout: float = 0.0,
        channel_mult: list[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int = 1,
        context_dim: int | list[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: list[bool] | None = None,
        num_attention_blocks: list[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
    ):
        super().__init__()
        channel_mult = list(channel_mult)
        levels = len(channel_mult)
        if dims != 2:
            raise ValueError(f"UNetModel supports only dims=2 (images), got dims={dims}")
        if n_embed is not None:
            raise ValueError("UNetModel: n_embed (predicting VQ codebook ids) is not supported; set it to None")
        if use_spatial_transformer and context_dim is None:
            raise ValueError("UNetModel: use_spatial_transformer needs context_dim (the text embedding width)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("UNetModel: context_dim is set but use_spatial_transformer is False")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels")
        if not isinstance(transformer_depth, int):
            raise ValueError(f"UNetModel: transformer_depth must be an int, got {transformer_depth!r}")
        res_blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(res_blocks) != levels:
            raise ValueError(f"UNetModel: num_res_blocks has {len(res_blocks)} entries for {levels} levels")
        if disable_self_attentions is not None and len(disable_self_attentions) != levels:
            raise ValueError(f"UNetModel: disable_self_attentions needs {levels} entries (one per level)")
        if num_attention_blocks is not None and (
                len(num_attention_blocks) != levels or any(a > r for a, r in zip(num_attention_blocks, res_blocks))):
            raise ValueError("UNetModel: num_attention_blocks needs one entry per level, each <= num_res_blocks")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = res_blocks
        self.attention_resolutions = list(attention_resolutions)
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.context_dim = context_dim

        def attention_layer(ch: int, level: int, upsampling: bool = False, middle: bool = False) -> nn.Module:
            # Head count / width exactly as the original computes them (including `legacy`).
            if num_head_channels == -1:
                heads, dim_head = num_heads, ch // num_heads
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if not use_spatial_transformer:
                return AttentionBlock(ch, num_heads_upsample if upsampling else heads, dim_head,
                                      use_checkpoint, use_new_attention_order)
            if middle:
                disabled_sa = disable_middle_self_attn
            else:
                disabled_sa = bool(disable_self_attentions[level]) if disable_self_attentions else False
            return SpatialTransformer(ch, heads, dim_head, transformer_depth, context_dim=context_dim,
                                      disable_self_attn=disabled_sa, use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint)

        def wants_attention(ds: int, level: int, index: int) -> bool:
            return ds in self.attention_resolutions and (
                num_attention_blocks is None or index < num_attention_blocks[level])

        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim))
        if isinstance(num_classes, int):
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        elif num_classes == "continuous":
            self.label_emb = nn.Linear(1, time_embed_dim)
        elif num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError("UNetModel: num_classes='sequential' needs adm_in_channels")
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(adm_in_channels, time_embed_dim), nn.SiLU(), nn.Linear(time_embed_dim, time_embed_dim)))
        elif num_classes is not None:
            raise ValueError(f"UNetModel: num_classes must be an int, 'continuous', 'sequential' or None, "
                             f"got {num_classes!r}")

        def res_block(ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
            return ResBlock(ch_in, time_embed_dim, dropout, ch_out, dims=dims, use_checkpoint=use_checkpoint,
                            use_scale_shift_norm=use_scale_shift_norm, **updown)

        # Encoder. `skip_channels` records the width of every block output the decoder will consume.
        conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for index in range(res_blocks[level]):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if wants_attention(ds, level, index):
                    layers.append(attention_layer(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention_layer(ch, levels - 1, middle=True), res_block(ch, ch))

        # Decoder: one more block per level than the encoder, so it also consumes the downsamplers' outputs.
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(res_blocks[level] + 1):
                layers = [res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if wants_attention(ds, level, index):
                    layers.append(attention_layer(ch, level, upsampling=True))
                if level and index == res_blocks[level]:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None,
                only_mid_control: bool = False) -> torch.Tensor:
        """Predict the model output for noisy latents.

        x: [B, in_channels, H, W] with H, W divisible by 2^(levels-1); timesteps: [B] (or a
        scalar), int or float; context: [B, L, context_dim] for text-conditioned models;
        y: [B] class labels (or [B, adm_in_channels] / [B, 1]) when `num_classes` is set;
        control: ControlNet residuals shaped like the input blocks' outputs, then one for the
        middle block (the list is not modified); only_mid_control adds only the middle one.
        Returns [B, out_channels, H, W] in x's dtype. Every layer keeps x's memory format; on CPU
        keep it NCHW (oneDNN's channels_last convs measured no faster here, and 1.5x slower at
        the 8x8 level where conv weights outweigh the activations).
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("UNetModel: pass y (class labels) if and only if the model was built with num_classes")
        dtype = self.time_embed[0].weight.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y).to(dtype)
        if isinstance(context, torch.Tensor):
            context = context.to(dtype)
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"UNetModel: control needs {len(self.input_blocks) + 1} residuals "
                             f"(input blocks, then middle block), got {len(control)}")
        h = x.to(dtype)

        skips = []
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        control = list(control) if control is not None else []
        if control:
            h = h + control.pop()
        for block in self.output_blocks:
            skip = skips.pop()
            if control and not only_mid_control:
                skip = skip + control.pop()
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h).to(x.dtype)
