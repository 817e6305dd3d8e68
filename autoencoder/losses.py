"""Stage-1 losses: L1 + LPIPS reconstruction, KL or codebook regulariser, PatchGAN adversarial term.

Semantics follow LDM's `LPIPSWithDiscriminator` (KL) and taming's `VQLPIPSWithDiscriminator` (VQ).
One module serves both; which regulariser applies is decided by what the model returned (a
posterior or a q_loss tensor). The module owns the discriminator and the learned scalar `logvar`:
put `autoencoder_parameters()` in the autoencoder's optimizer (the original forgot `logvar`) and
`discriminator_parameters()` in the discriminator's.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autoencoder.discriminator import NLayerDiscriminator
from autoencoder.kl import DiagonalGaussianDistribution
from autoencoder.perceptual import perceptual_distance


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat))): the non-saturating GAN's BCE."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Run `module` without recording gradients for its parameters (inputs still get theirs)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _scalars(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    # One device sync for all logged values instead of one `.item()` each.
    tensors = [torch.as_tensor(v, dtype=torch.float32).detach().reshape(()).cpu() for v in values.values()]
    return dict(zip(values, torch.stack(tensors).tolist()))


class AutoencoderLoss(nn.Module):
    """Generator-side and discriminator-side stage-1 losses.

    generator_loss:      rec = |x - x_hat| + perceptual_weight * LPIPS(x, x_hat)  (or the Inception distance)
                         KL: nll = sum(rec / exp(logvar) + logvar) / B;  loss = nll + kl_weight * KL
                         VQ: nll = mean(rec);                            loss = nll + codebook_weight * q_loss
                         + d_weight * disc_factor * (-mean D(x_hat)), d_weight adaptive (see `adaptive_weight`)
    discriminator_loss:  disc_factor * hinge or vanilla loss on D(x), D(x_hat)
    disc_factor is 0 before step `disc_start`.
    """

    def __init__(
        self,
        perceptual_weight: float = 1.0,
        lpips_net: str = "vgg",
        lpips_path: str | Path | None = None,
        lpips_random_backbone: bool = False,
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        codebook_weight: float = 1.0,
        disc_start: int = 50001,
        disc_weight: float = 0.5,
        disc_factor: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_ndf: int = 64,
        disc_norm: Literal["batch", "group"] = "batch",
        disc_loss: Literal["hinge", "vanilla"] = "hinge",
    ):
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        if perceptual_weight < 0:
            raise ValueError(f"perceptual_weight must be >= 0, got {perceptual_weight}")
        self.perceptual_weight = perceptual_weight
        self.kl_weight = kl_weight
        self.codebook_weight = codebook_weight
        self.disc_start = disc_start
        self.disc_weight = disc_weight
        self.disc_factor = disc_factor
        self.disc_loss_fn = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.logvar = nn.Parameter(torch.tensor(float(logvar_init)))
        self.perceptual = (
            perceptual_distance(lpips_net, lpips_path, lpips_random_backbone) if perceptual_weight > 0 else None
        )
        self.discriminator = NLayerDiscriminator(disc_in_channels, disc_ndf, disc_num_layers, disc_norm)

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        """Parameters of this module that the autoencoder's optimizer must train (the logvar)."""
        return [self.logvar]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def disc_factor_at(self, step: int) -> float:
        return self.disc_factor if step >= self.disc_start else 0.0

    def discriminator_active(self, step: int) -> bool:
        """Whether the GAN terms count at `step`; a loop may skip the discriminator update otherwise."""
        return self.disc_factor_at(step) > 0

    def adaptive_weight(self, nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None) -> torch.Tensor:
        """disc_weight * ||d nll / d W|| / (||d g / d W|| + 1e-4), clamped to [0, 1e4] and detached,
        with W the decoder's last layer: it scales the GAN gradient to the reconstruction's.

        Returns 0 where no gradient exists (no_grad evaluation, no last layer), as the original did.
        """
        if last_layer is None or not torch.is_grad_enabled() or not (nll.requires_grad and g_loss.requires_grad):
            return torch.zeros((), device=nll.device)
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].float()
        g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0].float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # The gradients of the global batch's losses (the mean of every process's), as one process has them.
            both = torch.stack([nll_grad, g_grad])
            dist.all_reduce(both)
            nll_grad, g_grad = both / dist.get_world_size()
        weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
        return weight.clamp(0.0, 1e4).detach() * self.disc_weight

    def generator_loss(
        self,
        x: torch.Tensor,
        x_hat: torch.Tensor,
        reg: DiagonalGaussianDistribution | torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the autoencoder (and logvar). x, x_hat [B, C, H, W] in [-1, 1]; reg the posterior
        (KL model) or q_loss (VQ model); last_layer = model.get_last_layer().

        Returns the scalar loss and floats to log. The discriminator is run frozen: this loss leaves
        no gradients on it.
        """
        logs: dict[str, torch.Tensor | float] = {}
        rec = (x.float() - x_hat.float()).abs()
        logs["l1"] = rec.mean()
        if self.perceptual is not None:
            p_loss = self.perceptual(x.float(), x_hat.float())  # [B, 1, 1, 1], broadcast over pixels
            rec = rec + self.perceptual_weight * p_loss
            logs["perceptual"] = p_loss.mean()

        if isinstance(reg, DiagonalGaussianDistribution):
            nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / x.shape[0]
            kl = reg.kl().float().sum() / x.shape[0]
            loss = nll + self.kl_weight * kl
            logs.update(nll=nll, kl=kl, logvar=self.logvar)
        elif isinstance(reg, torch.Tensor):
            nll = rec.mean()
            q_loss = reg.float().mean()
            loss = nll + self.codebook_weight * q_loss
            logs.update(nll=nll, q_loss=q_loss)
        else:
            raise TypeError(f"reg must be a DiagonalGaussianDistribution (KL) or a q_loss tensor (VQ), got {type(reg).__name__}")

        factor = self.disc_factor_at(step)
        if factor > 0:
            with frozen(self.discriminator):
                g_loss = -self.discriminator(x_hat).float().mean()
            d_weight = self.adaptive_weight(nll, g_loss, last_layer)
            loss = loss + d_weight * factor * g_loss
            logs.update(g_loss=g_loss, d_weight=d_weight)
        else:  # before disc_start: no discriminator pass, no autograd.grad
            logs.update(g_loss=0.0, d_weight=0.0)
        logs["disc_factor"] = factor
        logs["loss"] = loss
        return loss, _scalars(logs)

    def discriminator_loss(self, x: torch.Tensor, x_hat: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss for the discriminator on real x and reconstructed x_hat (both detached here)."""
        logits_real = self.discriminator(x.detach()).float()
        logits_fake = self.discriminator(x_hat.detach()).float()
        factor = self.disc_factor_at(step)
        loss = factor * self.disc_loss_fn(logits_real, logits_fake)
        # No "disc_factor" here: the generator's logs have it, and the loop sums a key both steps log.
        logs = {"disc_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, _scalars(logs)
