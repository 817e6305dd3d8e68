"""PatchGAN discriminator (pix2pix `NLayerDiscriminator`, as used by taming and LDM).

Layer indices inside `main` match the original (`main.0` first conv, `main.{2,5,8}` strided or
final feature convs, `main.{3,6,9}` norms, last index the 1-channel output conv), so original
`loss.discriminator.*` weights load.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(min(32, channels), channels)


class NLayerDiscriminator(nn.Module):
    """Image [B, input_nc, H, W] -> real/fake logits per overlapping patch [B, 1, H', W'].

    With n_layers=3 and a 256x256 input the output is 30x30 and each logit sees a 70x70 patch.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3, norm: Literal["batch", "group"] = "batch"):
        super().__init__()
        if norm not in ("batch", "group"):
            raise ValueError(f"discriminator norm must be 'batch' or 'group', got {norm!r}")
        if n_layers < 1:
            raise ValueError(f"discriminator n_layers must be >= 1, got {n_layers}")
        # A conv followed by BatchNorm needs no bias (the original's rule); GroupNorm keeps it.
        bias = norm != "batch"
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1  # the last feature conv keeps the resolution
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride=stride, padding=1, bias=bias),
                _norm(norm, ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DCGAN initialisation: conv weights N(0, 0.02), norm scales N(1, 0.02), norm shifts 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)
