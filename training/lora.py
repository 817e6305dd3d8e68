"""LoRA fine-tuning: PEFT adapters on a frozen model, trained by the shared loop, written as one LoRA file.

`LoRAAdapters.inject(model, cfg)` freezes the model and lets `peft` wrap the chosen layers of its
U-Net (and, with `text_encoder: true`, of its text encoder) with LoRA branches. The adapters' own
weights are gathered into one small module per part (`unet_lora`, `text_encoder_lora`) that shares
them with the wrapped layers: the task gives the loop those modules, so the optimizer, the EMA and the
checkpoints see the adapters and nothing else, and resume, EMA, the NaN guard and `max_minutes` work as
for every run. At the end `save` takes the PEFT wrappers off again (the base weights were never
touched) and writes the adapters with `ldm.lora_files.write_lora`, in the kohya or diffusers / PEFT
format, so `ldm.lora.apply_lora` / `merge_lora`, `python -m ldm.lora merge` and other tools read it.

In an adapter module a layer's weights are `<module path>.lora_A.weight` (down) and `.lora_B.weight`
(up), the path being the layer's in our U-Net / text encoder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from common.config import ConfigError, at_least, check_range
from layers import Upsample
from ldm.blocks import Downsample, ResBlock
from ldm.lora_files import LoRA, LoRALayer, write_lora
from ldm.lora_keys import TEXT, UNET, adaptable

# The attention projections of every transformer block (self- and cross-attention): what most LoRAs train.
ATTENTION = ("to_q", "to_k", "to_v", "to_out")
FEED_FORWARD = ("ff",)  # the transformer blocks' feed-forward layers, ff.net.0.proj (GEGLU) and ff.net.2
SHOWN = 8  # layer names listed in an error


@dataclass
class LoRAConfig:
    """The `lora:` section of train_stage2.py and train_controlnet.py: train LoRA adapters instead of weights.

    train_stage2.py adapts the U-Net of the model given by --init-from (required with a lora section);
    train_controlnet.py adapts the locked U-Net of --stage2 while the ControlNet trains whole as always
    (the ControlNet starts as a copy of the U-Net's encoder and learns to read a new input: every weight
    of it must move). There the LoRA is the small, shareable form of the paper's unlocked mode and takes
    the place of `controlnet.sd_locked: false`. Either way the base model's weights are frozen and never
    written; the run writes `lora.safetensors` (and the ControlNet its `controlnet.safetensors`).

    rank, alpha: each adapted layer gains `alpha / rank * up @ down` (up [out, rank] starts at zero, so
        training starts from the base model exactly); alpha null means alpha = rank.
    dropout: dropout on each LoRA branch's input, in training only.
    targets: U-Net layers to adapt, as module-name suffixes (`to_q`, `attn2.to_k`, `proj_in`); a
        suffix naming a container adapts the linear / conv layers inside it (`to_out` is `to_out.0`,
        `ff` the feed-forward pair). Default: the attention projections of every transformer block.
    feed_forward: also the transformer blocks' feed-forward layers (`ff.net.0.proj`, `ff.net.2`).
    conv: LoCon: also every layer of the ResBlocks (3x3 and skip convs, the time-embedding projection)
        and the down- and upsampling convs, as sd-scripts' conv_dim adapts them.
    text_encoder: also the text encoder's linear layers (attention and MLP; not a pooler), written
        under `lora_te_` / `text_encoder.` keys. Captions are then encoded every step.
    format: the file's format, `kohya` (A1111 / sd-scripts `lora_unet_...` keys) or `peft` (diffusers
        `unet....lora_A.weight` keys).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(ATTENTION))
    feed_forward: bool = False
    conv: bool = False
    text_encoder: bool = False
    format: Literal["kohya", "peft"] = "kohya"

    def __post_init__(self):
        at_least("rank", self.rank, 1)
        if self.alpha is not None:
            check_range("alpha", self.alpha, low=0, low_inclusive=False)
        check_range("dropout", self.dropout, low=0, high=1, high_inclusive=False)
        for target in self.targets:
            if not isinstance(target, str) or not target.strip(".") or ".." in target or target != target.strip(". "):
                raise ValueError(f"targets must be module-name suffixes such as to_q or attn2.to_k, got {target!r}")
        if not (self.targets or self.feed_forward or self.conv or self.text_encoder):
            raise ValueError("targets is empty and feed_forward, conv and text_encoder are off: nothing to adapt")

    @property
    def scale_alpha(self) -> float:
        """alpha, with alpha = rank when it is not set."""
        return float(self.rank if self.alpha is None else self.alpha)


def _matches(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


def unet_layers(unet: nn.Module, cfg: LoRAConfig) -> list[str]:
    """The U-Net's module paths the config adapts; a target suffix naming no layer is a one-line ConfigError."""
    names = [n for n, m in unet.named_modules() if adaptable(m) and _fits(m)]
    chosen: set[str] = set()
    for target in [*cfg.targets, *(FEED_FORWARD if cfg.feed_forward else ())]:
        found = [n for n in names if any(_matches(p, target) for p in _prefixes(n))]
        if not found:
            raise ConfigError(f"lora.targets: {target!r} names no linear or conv layer of the U-Net (its "
                              f"layers end in e.g. {', '.join(_endings(names)[:SHOWN])})")
        chosen.update(found)
    if cfg.conv:
        for module in unet.modules():
            if isinstance(module, (ResBlock, Downsample, Upsample)):
                chosen.update(n for n, m in _named_in(unet, module) if adaptable(m) and _fits(m))
    return [n for n in names if n in chosen]  # in the model's order


def text_encoder_layers(text_encoder: nn.Module) -> list[str]:
    """The text encoder's linear layers a LoRA adapts: all but a pooler's and those inside
    nn.MultiheadAttention (which reads their weights directly, so a wrapper around them would not run)."""
    inside_mha = {n for n, m in text_encoder.named_modules() if isinstance(m, nn.MultiheadAttention)}
    return [n for n, m in text_encoder.named_modules()
            if isinstance(m, nn.Linear) and "pooler" not in n.split(".")
            and not any(n.startswith(p + ".") for p in inside_mha)]


def _fits(module: nn.Module) -> bool:
    return not isinstance(module, nn.Conv2d) or module.groups == 1  # a LoRA file's conv layout


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _endings(names: list[str]) -> list[str]:
    """Distinct last two path components of `names`, for an error's examples."""
    seen = dict.fromkeys(".".join(p for p in n.split(".")[-2:] if not p.isdigit()) for n in names)
    return list(seen)


def _named_in(root: nn.Module, module: nn.Module):
    """(path in root, submodule) of every submodule of `module`."""
    prefix = next(n for n, m in root.named_modules() if m is module)
    return [(f"{prefix}.{n}" if prefix else n, m) for n, m in module.named_modules()]


class LoRAAdapters:
    """LoRA adapters injected by PEFT into a model's U-Net (and text encoder); see the module docstring.

    `modules()` are the trainable adapter modules by name, for the task's `trainable`; `lora(states)`
    turns their (or an EMA's) state dicts into an `ldm.lora_files.LoRA`; `save` writes the file.
    """

    def __init__(self, parts: dict[str, nn.Module], layers: dict[str, list[str]], cfg: LoRAConfig):
        self.parts, self.layers, self.cfg = parts, layers, cfg
        self.wrappers: dict[str, dict[str, nn.Module]] = {}
        self.trees: dict[str, nn.Module] = {}
        for part, names in layers.items():
            self.wrappers[part] = {n: parts[part].get_submodule(n) for n in names}
            self.trees[part] = _adapter_tree(self.wrappers[part])

    @classmethod
    def inject(cls, model: nn.Module, cfg: LoRAConfig) -> LoRAAdapters:
        """Freeze `model` (a LatentDiffusion) and wrap the layers `cfg` chooses with fresh adapters (up = 0)."""
        import peft  # a runtime dependency, imported where it is used

        model.requires_grad_(False)
        parts = {UNET: model.unet}
        layers = {UNET: unet_layers(model.unet, cfg)}
        if cfg.text_encoder:
            names = text_encoder_layers(model.text_encoder)
            if not names:
                raise ConfigError(f"lora.text_encoder: the text encoder ({type(model.text_encoder).__name__}) "
                                  "has no linear layer a LoRA can adapt")
            parts[TEXT], layers[TEXT] = model.text_encoder, names
        for part, names in layers.items():
            config = peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.scale_alpha, lora_dropout=cfg.dropout,
                                     target_modules=names, init_lora_weights=True)
            peft.inject_adapter_in_model(config, parts[part])
        adapters = cls(parts, layers, cfg)
        for tree in adapters.trees.values():
            tree.requires_grad_(True)
        return adapters

    def modules(self) -> dict[str, nn.Module]:
        """The adapter modules by checkpoint name (`unet_lora`, `text_encoder_lora`)."""
        return {f"{part}_lora": tree for part, tree in self.trees.items()}

    def adapts(self, part: str) -> bool:
        return part in self.layers

    def train_parts(self) -> None:
        """The adapted parts in training mode (LoRA dropout on), as a full fine-tune would put them."""
        for part in self.parts.values():
            part.train()

    def lora(self, states: dict[str, dict[str, torch.Tensor]] | None = None) -> LoRA:
        """The adapters as a LoRA (layers `unet.<path>` / `text_encoder.<path>`); `states` by module name
        (as `modules()`) replaces the live weights, e.g. with the EMA's."""
        lora = LoRA(source="trained")
        for name, tree in self.modules().items():
            state = (states or {}).get(name) or tree.state_dict()
            part = name[: -len("_lora")]
            for path in self.layers[part]:
                down, up = state[f"{path}.lora_A.weight"], state[f"{path}.lora_B.weight"]
                lora.layers[f"{part}.{path}"] = LoRALayer(down.detach().float().cpu().contiguous(),
                                                          up.detach().float().cpu().contiguous(), self.cfg.scale_alpha)
        return lora

    def remove(self) -> None:
        """Put the base layers back in place of PEFT's wrappers (their weights are the base model's, untouched)."""
        for part, wrappers in self.wrappers.items():
            root = self.parts[part]
            for path, wrapper in wrappers.items():
                parent, _, child = path.rpartition(".")
                setattr(root.get_submodule(parent) if parent else root, child, wrapper.get_base_layer())
        self.wrappers = {}

    def save(self, path: str | Path, states: dict[str, dict[str, torch.Tensor]] | None = None,
             base_sha256: str = "", metadata: dict | None = None) -> LoRA:
        """Write the adapters (or `states`) as a LoRA file in the config's format, atomically, with
        `ldm_lora` metadata: base model sha256, rank, alpha, targets, layer count (and `metadata`).
        Takes the adapters off the model first (see `remove`); returns the LoRA written."""
        lora = self.lora(states)
        self.remove()
        cfg = self.cfg
        record = {"base_sha256": base_sha256, "rank": cfg.rank, "alpha": cfg.scale_alpha, "dropout": cfg.dropout,
                  "targets": list(cfg.targets), "feed_forward": cfg.feed_forward, "conv": cfg.conv,
                  "text_encoder": cfg.text_encoder, "layers": len(lora.layers), "format": cfg.format,
                  **(metadata or {})}
        write_lora(lora, path, self.parts, cfg.format, metadata={"ldm_lora": record})
        return lora


def _adapter_tree(wrappers: dict[str, nn.Module]) -> nn.Module:
    """One module holding each wrapped layer's adapter at `<path>.lora_A` / `<path>.lora_B` (the same
    nn.Linear / nn.Conv2d objects PEFT runs, so loading a state dict into it loads the live adapters)."""
    root = nn.Module()
    for path, wrapper in wrappers.items():
        node = root
        for part in path.split("."):
            child = node._modules.get(part)
            if child is None:
                child = nn.Module()
                node.add_module(part, child)
            node = child
        node.add_module("lora_A", wrapper.lora_A["default"])
        node.add_module("lora_B", wrapper.lora_B["default"])
    return root
