"""The conditional U-Net of latent diffusion (LDM / Stable Diffusion 1.x and 2.x).

`UNetModel` is built from a `UNetConfig`, or from the `params` of the original YAML configs
(`unet_config.params`) as keyword arguments, and names its parameters like the original, so
`model.diffusion_model.*` weights of those checkpoints load with `strict=True`.

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

from dataclasses import dataclass, field, fields

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


@dataclass
class UNetConfig:
    """The U-Net's settings, named as the original `openaimodel.UNetModel` arguments (YAML `params`).

    Defaults: a small text-to-image U-Net (this project's YAML `unet:` section). Where the
    original's defaults differ, `UNetConfig.from_original(**params)` applies them
    (`ORIGINAL_DEFAULTS`). Unsupported: `dims` other than 2 and `n_embed` (codebook prediction).
    `use_fp16` is kept for config compatibility only: precision follows the parameters' dtype or
    a `torch.autocast` context.
    """

    image_size: int | None = None
    in_channels: int = 4
    model_channels: int = 128
    out_channels: int = 4
    num_res_blocks: int | list[int] = 2
    attention_resolutions: list[int] = field(default_factory=lambda: [4, 2])
    dropout: float = 0.0
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | str | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = -1
    num_head_channels: int = 32
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = True
    transformer_depth: int = 1
    context_dim: int | list[int] | None = None  # None in a LatentDiffusion config: the text encoder's width
    legacy: bool = False
    disable_self_attentions: list[bool] | None = None
    num_attention_blocks: list[int] | None = None
    disable_middle_self_attn: bool = False
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    n_embed: int | None = None

    @classmethod
    def from_original(cls, **params) -> UNetConfig:
        """The config the original `UNetModel(**params)` describes (the original's defaults apply)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"UNetModel: unknown argument(s) {unknown} (known: {', '.join(sorted(known))})")
        return cls(**{**ORIGINAL_DEFAULTS, **params})

    @property
    def levels(self) -> int:
        return len(self.channel_mult)

    @property
    def res_blocks(self) -> list[int]:
        """ResBlocks per level (`num_res_blocks` given as one int or per level)."""
        n = self.num_res_blocks
        return [n] * self.levels if isinstance(n, int) else list(n)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels


# The original constructor's defaults where this project's differ.
ORIGINAL_DEFAULTS = dict(num_heads=-1, num_head_channels=-1, channel_mult=[1, 2, 4, 8], legacy=True,
                         use_spatial_transformer=False)


def check_config(c: UNetConfig, name: str) -> None:
    """Reject settings the network cannot be built from, with a message naming the argument."""
    levels = c.levels
    problems = [
        (c.dims != 2, f"supports only dims=2 (images), got dims={c.dims}"),
        (c.n_embed is not None, "n_embed (predicting VQ codebook ids) is not supported; set it to None"),
        (c.use_spatial_transformer and c.context_dim is None,
         "use_spatial_transformer needs context_dim (the text embedding width)"),
        (c.context_dim is not None and not c.use_spatial_transformer,
         "context_dim is set but use_spatial_transformer is False"),
        (c.num_heads == -1 and c.num_head_channels == -1, "set num_heads or num_head_channels"),
        (not isinstance(c.transformer_depth, int), f"transformer_depth must be an int, got {c.transformer_depth!r}"),
        (len(c.res_blocks) != levels, f"num_res_blocks has {len(c.res_blocks)} entries for {levels} levels"),
        (c.disable_self_attentions is not None and len(c.disable_self_attentions) != levels,
         f"disable_self_attentions needs {levels} entries (one per level)"),
        (c.num_attention_blocks is not None and (len(c.num_attention_blocks) != levels or any(
            a > r for a, r in zip(c.num_attention_blocks, c.res_blocks))),
         "num_attention_blocks needs one entry per level, each <= num_res_blocks"),
        (c.num_classes is not None and not isinstance(c.num_classes, int)
         and c.num_classes not in ("continuous", "sequential"),
         f"num_classes must be an int, 'continuous', 'sequential' or None, got {c.num_classes!r}"),
        (c.num_classes == "sequential" and c.adm_in_channels is None, "num_classes='sequential' needs adm_in_channels"),
    ]
    for failed, message in problems:
        if failed:
            raise ValueError(f"{name}: {message}")


def label_embedding(c: UNetConfig) -> nn.Module | None:
    """`label_emb`: class ids, a continuous value or an ADM vector -> [B, time_embed_dim]."""
    dim = c.time_embed_dim
    if isinstance(c.num_classes, int):
        return nn.Embedding(c.num_classes, dim)
    if c.num_classes == "continuous":
        return Linear(1, dim)
    if c.num_classes == "sequential":
        return nn.Sequential(nn.Sequential(Linear(c.adm_in_channels, dim), SiLU(), Linear(dim, dim)))
    return None


class UNetEncoder(nn.Module):
    """The encoder half of the U-Net: `time_embed` (+ `label_emb`), `input_blocks`, `middle_block`.

    `input_block_channels[i]` is the width of input block i's output: the skip the decoder
    consumes, and the width of ControlNet's zero conv i. Subclasses add the decoder (`UNetModel`)
    or the zero convs and hint encoder (`ControlNet`); every block of both halves is made by the
    same `_res_block` / `_attention` rules.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        check_config(config, type(self).__name__)
        self.config = config
        self.time_embed = nn.Sequential(Linear(config.model_channels, config.time_embed_dim), SiLU(),
                                        Linear(config.time_embed_dim, config.time_embed_dim))
        label_emb = label_embedding(config)
        if label_emb is not None:
            self.label_emb = label_emb
        self._build_input_blocks()
        ch = self.input_block_channels[-1]
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, ch), self._attention(ch, config.levels - 1, middle=True), self._res_block(ch, ch))

    def _build_input_blocks(self) -> None:
        c = self.config
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(Conv2d(c.in_channels, c.model_channels, 3, padding=1))])
        self.input_block_channels = [c.model_channels]
        ch, ds = c.model_channels, 1
        for level, mult in enumerate(c.channel_mult):
            for index in range(c.res_blocks[level]):
                layers = [self._res_block(ch, mult * c.model_channels)]
                ch = mult * c.model_channels
                if self._wants_attention(ds, level, index):
                    layers.append(self._attention(ch, level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.input_block_channels.append(ch)
            if level != c.levels - 1:
                down = self._res_block(ch, ch, down=True) if c.resblock_updown else Downsample(ch, c.conv_resample, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                self.input_block_channels.append(ch)
                ds *= 2

    def _res_block(self, ch_in: int, ch_out: int, **updown: bool) -> ResBlock:
        c = self.config
        return ResBlock(ch_in, c.time_embed_dim, c.dropout, ch_out, use_checkpoint=c.use_checkpoint,
                        use_scale_shift_norm=c.use_scale_shift_norm, **updown)

    def _wants_attention(self, ds: int, level: int, index: int) -> bool:
        c = self.config
        return ds in c.attention_resolutions and (c.num_attention_blocks is None or index < c.num_attention_blocks[level])

    def _attention(self, ch: int, level: int, upsampling: bool = False, middle: bool = False) -> nn.Module:
        c = self.config
        # Head count / width exactly as the original computes them (including `legacy`).
        if c.num_head_channels == -1:
            heads, dim_head = c.num_heads, ch // c.num_heads
        else:
            heads, dim_head = ch // c.num_head_channels, c.num_head_channels
        if c.legacy:
            dim_head = ch // heads if c.use_spatial_transformer else c.num_head_channels
        if not c.use_spatial_transformer:
            heads_upsample = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
            return AttentionBlock(ch, heads_upsample if upsampling else heads, dim_head, c.use_checkpoint,
                                  c.use_new_attention_order)
        if middle:
            disabled_sa = c.disable_middle_self_attn
        else:
            disabled_sa = bool(c.disable_self_attentions[level]) if c.disable_self_attentions else False
        return SpatialTransformer(ch, heads, dim_head, c.transformer_depth, context_dim=c.context_dim,
                                  disable_self_attn=disabled_sa, use_linear=c.use_linear_in_transformer,
                                  use_checkpoint=c.use_checkpoint)

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype (the time embedding's first layer stands for all)."""
        return next(self.time_embed.parameters()).dtype

    def embed(self, timesteps: torch.Tensor | int | float, batch: int, device: torch.device,
              y: torch.Tensor | None = None) -> torch.Tensor:
        """The ResBlocks' conditioning: time embedding (+ label embedding), [batch, 4 * model_channels],
        or [1, 4 * model_channels] when it is the same for every sample (a scalar timestep, or on CPU
        one timestep repeated, and no labels), which the ResBlocks broadcast over the batch.

        timesteps: [batch] or a scalar, int or float; y as in `UNetModel.forward`. The result has the
        parameters' dtype. A sampler's batch shares its timestep: its embedding layers then run on one
        row, at any batch size (a row's result does not depend on the batch; see `layers.fused`).
        """
        if (y is not None) != (self.config.num_classes is not None):
            raise ValueError(f"{type(self).__name__}: pass y (class labels) if and only if the model was built "
                             "with num_classes")
        dtype = self.dtype
        timesteps = torch.as_tensor(timesteps, device=device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(1 if y is None else batch)
        elif y is None and _one_timestep(timesteps):
            timesteps = timesteps[:1]
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.num_classes is not None:
            emb = emb + self.label_emb(y).to(dtype)
        return emb


def _one_timestep(timesteps: torch.Tensor) -> bool:
    """Whether a CPU batch of timesteps [B] (B > 1) repeats one value (not asked under torch.compile,
    which would break its graph, nor on CUDA, which would wait for the device)."""
    return (timesteps.shape[0] > 1 and timesteps.device.type == "cpu" and not torch.compiler.is_compiling()
            and torch.equal(timesteps[1:], timesteps[:-1]))


class UNetModel(UNetEncoder):
    """Timestep- (and optionally class- / text-) conditioned U-Net predicting noise or v.

    `UNetModel(config)` with a `UNetConfig`, or `UNetModel(**params)` with the original
    constructor's arguments (its defaults apply); see the module docstring for the layout.
    """

    def __init__(self, config: UNetConfig | None = None, /, **params):
        if config is None:
            config = UNetConfig.from_original(**params)
        elif params:
            raise ValueError("UNetModel: pass a UNetConfig or keyword arguments, not both")
        super().__init__(config)
        self._build_output_blocks()
        mc = config.model_channels
        self.out = nn.Sequential(normalization(mc * config.channel_mult[0]), SiLU(),
                                 zero_module(Conv2d(mc, config.out_channels, 3, padding=1)))

    def _build_output_blocks(self) -> None:
        # One more block per level than the encoder, so it also consumes the downsamplers' outputs.
        c = self.config
        skip_channels = list(self.input_block_channels)
        ch, ds = skip_channels[-1], 2 ** (c.levels - 1)
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for index in range(c.res_blocks[level] + 1):
                layers = [self._res_block(ch + skip_channels.pop(), c.model_channels * mult)]
                ch = c.model_channels * mult
                if self._wants_attention(ds, level, index):
                    layers.append(self._attention(ch, level, upsampling=True))
                if level and index == c.res_blocks[level]:
                    layers.append(self._res_block(ch, ch, up=True) if c.resblock_updown
                                  else Upsample(ch, c.conv_resample, ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

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
        dtype = self.dtype
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
