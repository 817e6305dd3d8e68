"""The conditional U-Net of latent diffusion (LDM / Stable Diffusion 1.x and 2.x).

`UNetModel` takes the `params` of the original YAML configs (`unet_config.params`) as keyword
arguments and names its parameters like the original, so `model.diffusion_model.*` weights of
those checkpoints load with `strict=True`.

Layout (SD 1.x numbers): `input_blocks.0` conv_in; then per level `num_res_blocks` x
[ResBlock (+ SpatialTransformer at attention resolutions)] and a Downsample between levels;
`middle_block` = ResBlock, attention, ResBlock; `output_blocks` mirror the input side, each
starting with a ResBlock on [h, skip] concatenated, with an Upsample closing every level but
the last; `out` = GroupNorm, SiLU, zero-initialised conv.

The encoder half (`time_embed`, `label_emb`, `input_blocks`, `middle_block`) is built by
`UNetEncoder`, which `UNetModel` and `ldm.controlnet.ControlNet` both extend: a ControlNet's
trainable copy is the same code with the same parameter names.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from layers import Conv2d, Linear, SiLU, Upsample, zero_module
from ldm.attention import AttentionBlock, SpatialTransformer
from ldm.blocks import Downsample, ResBlock, normalization, timestep_embedding


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


@dataclass(frozen=True)
class BlockFactory:
    """Makes the U-Net's ResBlocks and attention layers from the constructor arguments.

    Shared by the encoder and the decoder so that every block of both halves follows one rule
    (head counts including the original's `legacy` quirk, self-attention switches, checkpointing).
    """

    time_embed_dim: int
    dropout: float
    use_checkpoint: bool
    use_scale_shift_norm: bool
    num_heads: int
    num_head_channels: int
    num_heads_upsample: int
    legacy: bool
    use_spatial_transformer: bool
    use_new_attention_order: bool
    transformer_depth: int
    context_dim: int | list[int] | None
    use_linear_in_transformer: bool
    attention_resolutions: tuple[int, ...]
    disable_self_attentions: tuple[bool, ...] | None
    num_attention_blocks: tuple[int, ...] | None
    disable_middle_self_attn: bool

    def res_block(self, ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
        return ResBlock(ch_in, self.time_embed_dim, self.dropout, ch_out,
                        use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm, **updown)

    def wants_attention(self, ds: int, level: int, index: int) -> bool:
        return ds in self.attention_resolutions and (
            self.num_attention_blocks is None or index < self.num_attention_blocks[level])

    def attention(self, ch: int, level: int, upsampling: bool = False, middle: bool = False) -> nn.Module:
        # Head count / width exactly as the original computes them (including `legacy`).
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = ch // heads if self.use_spatial_transformer else self.num_head_channels
        if not self.use_spatial_transformer:
            return AttentionBlock(ch, self.num_heads_upsample if upsampling else heads, dim_head,
                                  self.use_checkpoint, self.use_new_attention_order)
        if middle:
            disabled_sa = self.disable_middle_self_attn
        else:
            disabled_sa = bool(self.disable_self_attentions[level]) if self.disable_self_attentions else False
        return SpatialTransformer(ch, heads, dim_head, self.transformer_depth, context_dim=self.context_dim,
                                  disable_self_attn=disabled_sa, use_linear=self.use_linear_in_transformer,
                                  use_checkpoint=self.use_checkpoint)


class UNetEncoder(nn.Module):
    """The encoder half of the U-Net: `time_embed` (+ `label_emb`), `input_blocks`, `middle_block`.

    Takes the original constructor arguments that shape this half (all of `UNetModel`'s but
    `out_channels` and `n_embed`) and keeps them in `encoder_args`, so a twin can be built from
    a trained model (`ControlNet.from_unet`). `input_block_channels[i]` is the width of input
    block i's output: the skip the decoder consumes, and the width of ControlNet's zero conv i.
    Subclasses add the decoder (`UNetModel`) or the zero convs and hint encoder (`ControlNet`).
    """

    def __init__(
        self,
        image_size: int | None,
        in_channels: int,
        model_channels: int,
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
        legacy: bool = True,
        disable_self_attentions: list[bool] | None = None,
        num_attention_blocks: list[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
    ):
        super().__init__()
        self.encoder_args = dict(
            image_size=image_size, in_channels=in_channels, model_channels=model_channels,
            num_res_blocks=num_res_blocks, attention_resolutions=list(attention_resolutions), dropout=dropout,
            channel_mult=list(channel_mult), conv_resample=conv_resample, dims=dims, num_classes=num_classes,
            use_checkpoint=use_checkpoint, use_fp16=use_fp16, num_heads=num_heads,
            num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order, use_spatial_transformer=use_spatial_transformer,
            transformer_depth=transformer_depth, context_dim=context_dim, legacy=legacy,
            disable_self_attentions=disable_self_attentions, num_attention_blocks=num_attention_blocks,
            disable_middle_self_attn=disable_middle_self_attn, use_linear_in_transformer=use_linear_in_transformer,
            adm_in_channels=adm_in_channels)
        name = type(self).__name__
        channel_mult = list(channel_mult)
        levels = len(channel_mult)
        if dims != 2:
            raise ValueError(f"{name} supports only dims=2 (images), got dims={dims}")
        if use_spatial_transformer and context_dim is None:
            raise ValueError(f"{name}: use_spatial_transformer needs context_dim (the text embedding width)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(f"{name}: context_dim is set but use_spatial_transformer is False")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError(f"{name}: set num_heads or num_head_channels")
        if not isinstance(transformer_depth, int):
            raise ValueError(f"{name}: transformer_depth must be an int, got {transformer_depth!r}")
        res_blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(res_blocks) != levels:
            raise ValueError(f"{name}: num_res_blocks has {len(res_blocks)} entries for {levels} levels")
        if disable_self_attentions is not None and len(disable_self_attentions) != levels:
            raise ValueError(f"{name}: disable_self_attentions needs {levels} entries (one per level)")
        if num_attention_blocks is not None and (
                len(num_attention_blocks) != levels or any(a > r for a, r in zip(num_attention_blocks, res_blocks))):
            raise ValueError(f"{name}: num_attention_blocks needs one entry per level, each <= num_res_blocks")

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.num_res_blocks = res_blocks
        self.attention_resolutions = list(attention_resolutions)
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.context_dim = context_dim

        time_embed_dim = model_channels * 4
        self.block_factory = BlockFactory(
            time_embed_dim=time_embed_dim, dropout=dropout, use_checkpoint=use_checkpoint,
            use_scale_shift_norm=use_scale_shift_norm, num_heads=num_heads, num_head_channels=num_head_channels,
            num_heads_upsample=num_heads if num_heads_upsample == -1 else num_heads_upsample, legacy=legacy,
            use_spatial_transformer=use_spatial_transformer, use_new_attention_order=use_new_attention_order,
            transformer_depth=transformer_depth, context_dim=context_dim,
            use_linear_in_transformer=use_linear_in_transformer, attention_resolutions=tuple(attention_resolutions),
            disable_self_attentions=tuple(disable_self_attentions) if disable_self_attentions else None,
            num_attention_blocks=tuple(num_attention_blocks) if num_attention_blocks else None,
            disable_middle_self_attn=disable_middle_self_attn)
        blocks = self.block_factory

        self.time_embed = nn.Sequential(
            Linear(model_channels, time_embed_dim), SiLU(), Linear(time_embed_dim, time_embed_dim))
        if isinstance(num_classes, int):
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)
        elif num_classes == "continuous":
            self.label_emb = Linear(1, time_embed_dim)
        elif num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError(f"{name}: num_classes='sequential' needs adm_in_channels")
            self.label_emb = nn.Sequential(nn.Sequential(
                Linear(adm_in_channels, time_embed_dim), SiLU(), Linear(time_embed_dim, time_embed_dim)))
        elif num_classes is not None:
            raise ValueError(f"{name}: num_classes must be an int, 'continuous', 'sequential' or None, "
                             f"got {num_classes!r}")

        conv_in = Conv2d(in_channels, model_channels, 3, padding=1)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_in)])
        self.input_block_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for index in range(res_blocks[level]):
                layers = [blocks.res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if blocks.wants_attention(ds, level, index):
                    layers.append(blocks.attention(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.input_block_channels.append(ch)
            if level != levels - 1:
                down = (blocks.res_block(ch, ch, down=True) if resblock_updown
                        else Downsample(ch, conv_resample, ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                self.input_block_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            blocks.res_block(ch, ch), blocks.attention(ch, levels - 1, middle=True), blocks.res_block(ch, ch))

    def embed(self, timesteps: torch.Tensor | int | float, batch: int, device: torch.device,
              y: torch.Tensor | None = None) -> torch.Tensor:
        """The ResBlocks' conditioning: time embedding (+ label embedding), [batch, 4 * model_channels].

        timesteps: [batch] or a scalar, int or float; y as in `UNetModel.forward`. The result has the
        parameters' dtype.
        """
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(f"{type(self).__name__}: pass y (class labels) if and only if the model was built "
                             "with num_classes")
        dtype = self.time_embed[0].weight.dtype
        timesteps = torch.as_tensor(timesteps, device=device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y).to(dtype)
        return emb


class UNetModel(UNetEncoder):
    """Timestep- (and optionally class- / text-) conditioned U-Net predicting noise or v.

    Constructor arguments are those of the original `openaimodel.UNetModel`; see the module
    docstring. Unsupported originals: `dims` other than 2 and `n_embed` (codebook prediction).
    `use_fp16` is accepted for config compatibility only: precision follows the parameters'
    dtype (`model.half()`) or a `torch.autocast` context, as the original scripts used.
    """

    def __init__(self, image_size: int | None, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int | list[int], attention_resolutions: list[int], *, n_embed: int | None = None,
                 **encoder_args):
        # encoder_args: the rest of the original arguments, named and defaulted as in `UNetEncoder`.
        if n_embed is not None:
            raise ValueError("UNetModel: n_embed (predicting VQ codebook ids) is not supported; set it to None")
        super().__init__(image_size, in_channels, model_channels, num_res_blocks, attention_resolutions,
                         **encoder_args)
        self.out_channels = out_channels
        blocks = self.block_factory

        # Decoder: one more block per level than the encoder, so it also consumes the downsamplers' outputs.
        skip_channels = list(self.input_block_channels)
        ch, ds = skip_channels[-1], 2 ** (len(self.channel_mult) - 1)
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for index in range(self.num_res_blocks[level] + 1):
                layers = [blocks.res_block(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if blocks.wants_attention(ds, level, index):
                    layers.append(blocks.attention(ch, level, upsampling=True))
                if level and index == self.num_res_blocks[level]:
                    args = self.encoder_args
                    up = (blocks.res_block(ch, ch, up=True) if args["resblock_updown"]
                          else Upsample(ch, args["conv_resample"], ch))
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), SiLU(), zero_module(Conv2d(model_channels, out_channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, control: list[torch.Tensor] | None = None,
                only_mid_control: bool = False) -> torch.Tensor:
        """Predict the model output for noisy latents.

        x: [B, in_channels, H, W] with H, W divisible by 2^(levels-1); timesteps: [B] (or a
        scalar), int or float; context: [B, L, context_dim] for text-conditioned models;
        y: [B] class labels (or [B, adm_in_channels] / [B, 1]) when `num_classes` is set;
        control: ControlNet residuals shaped like the input blocks' outputs, then one for the
        middle block (the list is not modified); only_mid_control adds only the middle one.
        Returns [B, out_channels, H, W] in x's dtype. Every layer keeps x's memory format (on CPU,
        NCHW measured faster: bench/RESULTS.md).
        """
        dtype = self.time_embed[0].weight.dtype
        emb = self.embed(timesteps, x.shape[0], x.device, y)
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
