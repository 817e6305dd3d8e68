"""Names of LoRA targets in the files people have, and the modules of ours they mean.

A LoRA file names each adapted layer by a module path of *some* implementation of the model:

- kohya / A1111: `lora_unet_<path with '_' for '.'>` and `lora_te_<path>`; sd-scripts writes
  diffusers `UNet2DConditionModel` paths (`lora_unet_down_blocks_0_attentions_0_..._to_q`), other
  tools the CompVis ones this project uses (`lora_unet_input_blocks_1_1_..._to_q`);
- diffusers / PEFT: `unet.<diffusers path>` and `text_encoder.<transformers CLIP path>`, or (PEFT on
  our own model) `unet.<our path>`.

Underscored names cannot be split back into paths unambiguously, so every name a module may have is
computed from the model itself and looked up. The diffusers paths follow from the U-Net's config
(levels, ResBlocks per level, where attention is), so any SD 1.x / 2.x-layout size maps.

Internally a target is named `<part>.<module path in that part>`, part `unet` or `text_encoder`
(the attribute names of `LatentDiffusion`), e.g. `unet.input_blocks.1.1.transformer_blocks.0.attn1.to_q`.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ldm.attention import SpatialTransformer
from ldm.blocks import Downsample, ResBlock
from ldm.unet import UNetModel

UNET, TEXT = "unet", "text_encoder"
KOHYA_PREFIX = {UNET: "lora_unet_", TEXT: "lora_te_"}
# The text encoder's transformers model sits at this attribute of ours (conditioning.pretrained_text_encoders).
HF_TEXT_ROOT = "transformer."

_RESBLOCK_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                   "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


def adaptable(module: nn.Module) -> bool:
    """Layers a LoRA can adapt: linear layers and convolutions (weights [out, in] / [out, in, kh, kw])."""
    return isinstance(module, (nn.Linear, nn.Conv2d))


def diffusers_unet_blocks(unet: UNetModel) -> dict[str, str]:
    """Our block paths -> diffusers `UNet2DConditionModel` module paths, for the U-Net's config.

    E.g. `input_blocks.1.0` -> `down_blocks.0.resnets.0`, `output_blocks.2.1.conv` ->
    `up_blocks.0.upsamplers.0.conv`. Blocks inside are named alike except in ResBlocks (`diffusers_unet_paths`).
    """
    c = unet.config
    if c.resblock_updown or not c.use_spatial_transformer:
        raise ValueError("diffusers paths exist for SD-layout U-Nets only (spatial transformers, conv resampling)")
    blocks = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
              "time_embed.2": "time_embedding.linear_2", "middle_block.0": "mid_block.resnets.0",
              "middle_block.1": "mid_block.attentions.0", "middle_block.2": "mid_block.resnets.1",
              "out.0": "conv_norm_out", "out.2": "conv_out"}
    n = 1
    for level in range(c.levels):
        for j in range(c.res_blocks[level]):
            _res_and_attention(blocks, unet.input_blocks[n], f"input_blocks.{n}", f"down_blocks.{level}", j)
            n += 1
        if level != c.levels - 1:
            assert isinstance(unet.input_blocks[n][0], Downsample)
            blocks[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            n += 1
    n = 0
    for i, level in enumerate(reversed(range(c.levels))):
        for j in range(c.res_blocks[level] + 1):
            block = unet.output_blocks[n]
            _res_and_attention(blocks, block, f"output_blocks.{n}", f"up_blocks.{i}", j)
            if level and j == c.res_blocks[level]:
                blocks[f"output_blocks.{n}.{len(block) - 1}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
            n += 1
    return blocks


def _res_and_attention(blocks: dict[str, str], block: nn.Module, ours: str, theirs: str, j: int) -> None:
    assert isinstance(block[0], ResBlock)
    blocks[f"{ours}.0"] = f"{theirs}.resnets.{j}"
    if len(block) > 1 and isinstance(block[1], SpatialTransformer):
        blocks[f"{ours}.1"] = f"{theirs}.attentions.{j}"


def diffusers_unet_paths(unet: UNetModel) -> dict[str, str]:
    """Every adaptable module of `unet`: our path -> diffusers `UNet2DConditionModel` path."""
    blocks = diffusers_unet_blocks(unet)
    paths = {}
    for name, module in unet.named_modules():
        if not adaptable(module):
            continue
        parts = name.split(".")
        # The longest block prefix that names a block of ours decides the rest of the path.
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in blocks:
                rest = ".".join(parts[cut:])
                if rest and blocks[prefix].split(".")[-2] in ("resnets",):
                    rest = _RESBLOCK_NAMES.get(rest, rest)
                paths[name] = blocks[prefix] + (f".{rest}" if rest else "")
                break
    return paths


@dataclass(frozen=True)
class Target:
    """One adaptable module of the model: its internal name (`unet.<path>`), the module, and the
    name it is written under in each format."""

    name: str
    module: nn.Module
    kohya: str  # e.g. lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q
    peft: str   # e.g. unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q


class TargetTable:
    """All adaptable modules of a model's parts and every name a LoRA file may give them.

    parts: `{"unet": UNetModel, "text_encoder": module}` (either may be absent).
    `lookup(name)` takes a kohya name (`lora_unet_...`, `lora_te_...`) or a dotted path with its part
    prefix (`unet.<diffusers or our path>`, `text_encoder.<path>`) and returns the Target or None.
    """

    def __init__(self, parts: dict[str, nn.Module]):
        self.targets: dict[str, Target] = {}
        self._aliases: dict[str, str] = {}
        unet = parts.get(UNET)
        if unet is not None:
            theirs = diffusers_unet_paths(unet) if isinstance(unet, UNetModel) else {}
            for path, module in unet.named_modules():
                if adaptable(module):
                    self._add(UNET, path, module, theirs.get(path, path), [path])
        text = parts.get(TEXT)
        if text is not None:
            for path, module in text.named_modules():
                if adaptable(module):
                    hf = path[len(HF_TEXT_ROOT):] if path.startswith(HF_TEXT_ROOT) else path
                    self._add(TEXT, path, module, hf, [path])

    def _add(self, part: str, path: str, module: nn.Module, written: str, others: list[str]) -> None:
        name = f"{part}.{path}"
        self.targets[name] = Target(name, module, KOHYA_PREFIX[part] + written.replace(".", "_"), f"{part}.{written}")
        for alias in {written, *others}:
            self._aliases[KOHYA_PREFIX[part] + alias.replace(".", "_")] = name
            self._aliases[f"{part}.{alias}"] = name

    def lookup(self, name: str) -> Target | None:
        found = self._aliases.get(name)
        return self.targets[found] if found else None
