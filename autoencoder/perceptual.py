"""LPIPS perceptual distance, with its ImageNet backbone loaded from a local file.

The `lpips` package ships only its calibrated linear heads; the VGG/AlexNet/SqueezeNet trunk comes
from torchvision, which downloads it on first use. Offline, that download fails, and a trunk with
random weights would quietly turn the "perceptual" loss into noise. So the trunk is always built
empty and filled from a torchvision weights file that must exist, with a clear error otherwise.
"""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from common.weights import load_state_dict_strict, load_torch

log = logging.getLogger(__name__)

# torchvision's file names for the trunks lpips uses (the hash suffix is part of the name).
BACKBONE_FILES = {
    "vgg": "vgg16-397923af.pth",
    "alex": "alexnet-owt-7be5be79.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
}
DOWNLOAD_URL = "https://download.pytorch.org/models/"


def default_backbone_path(net: str) -> Path:
    """Where torchvision keeps the trunk's weights: $TORCH_HOME/hub/checkpoints/<file>."""
    return Path(torch.hub.get_dir()) / "checkpoints" / BACKBONE_FILES[net]


def _backbone_path(net: str, path: str | Path | None) -> Path:
    resolved = Path(os.path.expanduser(str(path))) if path else default_backbone_path(net)
    if not resolved.is_file():
        name = BACKBONE_FILES[net]
        raise FileNotFoundError(
            f"LPIPS needs the ImageNet {net} weights '{name}' and none were found at {resolved}. "
            f"Place the file (from {DOWNLOAD_URL}{name}) in $TORCH_HOME/hub/checkpoints/, or give its path "
            f"as loss.lpips_path, or set loss.perceptual_weight: 0 to train without the perceptual loss."
        )
    return resolved


class LPIPS(nn.Module):
    """LPIPS distance between images in [-1, 1]: x, y [B, 3, H, W] -> [B, 1, 1, 1].

    Frozen and always in eval mode (the original let the heads' dropout run during training).
    The network is kept out of `parameters()` and `state_dict()`: it is fixed data, not something
    to optimise or to copy into every checkpoint. `.to()` / `.half()` still move it.

    random_backbone=True builds an untrained trunk (for tests only; logs a warning).
    """

    def __init__(self, net: str = "vgg", backbone_path: str | Path | None = None, random_backbone: bool = False):
        super().__init__()
        if net not in BACKBONE_FILES:
            raise ValueError(f"lpips net must be one of {sorted(BACKBONE_FILES)}, got {net!r}")
        path = None if random_backbone else _backbone_path(net, backbone_path)
        import lpips  # imports torchvision; only needed when the perceptual loss is on

        with warnings.catch_warnings():  # torchvision's deprecation notice for lpips' `pretrained=`
            warnings.simplefilter("ignore", UserWarning)
            model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)
        if path is None:
            log.warning("LPIPS with a RANDOM %s backbone: the perceptual loss is meaningless (tests only)", net)
        else:
            _load_backbone(model.net, path)
        model.eval().requires_grad_(False)
        # In a list, so nn.Module does not register it: no parameters, no state_dict entries, and
        # `.train()` never reaches it.
        self._held = [model]

    @property
    def model(self) -> nn.Module:
        return self._held[0]

    def _apply(self, fn, recurse=True):
        self.model._apply(fn)
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(), y.contiguous())


def _load_backbone(trunk: nn.Module, path: Path) -> None:
    """Copy torchvision `features.<i>.*` weights into lpips' `slice<k>.<i>.*` modules.

    lpips splits torchvision's `features` Sequential into slices but keeps each layer's index as
    its name inside the slice, which gives the mapping.
    """
    source = load_torch(path)
    if isinstance(source, dict) and isinstance(source.get("state_dict"), dict):
        source = source["state_dict"]
    target = {}
    for name in trunk.state_dict():
        key = _torchvision_key(name)
        if key not in source:
            raise ValueError(f"{path}: not a torchvision backbone file for LPIPS (missing '{key}')")
        target[name] = source[key]
    load_state_dict_strict(trunk, target, path, what="the LPIPS backbone", file_key=_torchvision_key)


def _torchvision_key(name: str) -> str:
    """lpips' `slice<k>.<i>.<rest>` -> torchvision's `features.<i>.<rest>`."""
    _, index, rest = name.split(".", 2)
    return f"features.{index}.{rest}"
