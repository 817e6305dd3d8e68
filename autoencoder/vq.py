"""Vector-quantised autoencoder (LDM `VQModel`) and its codebook (`VectorQuantizer`)."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autoencoder.base import LatentAutoencoder, drop_training_params
from autoencoder.config import DDConfig, ddconfig_from
from autoencoder.modules import match_memory_format
from layers import Conv2d

# Rows of the [positions, n_embed] distance matrix computed at once: bounds memory at ~64 MB
# (a 256x256 batch of 8 against 8192 codes would otherwise need 1 GB).
_DISTANCE_ELEMENTS = 1 << 24


@dataclass
class QuantizationInfo:
    """What the quantizer reports besides the quantized latents.

    indices:    chosen codes, [B*h*w] (or [B, h, w] with sane_index_shape), remapped if `remap` is set
    perplexity: exp(entropy) of the batch's code histogram; n_embed when all codes are used evenly
    usage:      fraction of the codebook used at least once in the batch
    """

    indices: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient.

    loss = ||sg(z) - z_q||^2 + beta * ||z - sg(z_q)||^2 (codebook + commitment, both means).
    legacy=True reproduces taming/LDM's placement, beta * codebook + commitment.
    codebook_ema=True updates the codebook as an exponential moving average of the encoder outputs
    assigned to each code (decay, Laplace smoothing eps) instead of by gradient; the loss is then
    the commitment term alone and the embedding has no gradient.
    dead_code_steps=N > 0 replaces codes unused for N training steps by encoder outputs drawn from
    the current batch.
    remap (path to a .npy of used code indices) and sane_index_shape only change the reported
    indices, as in the original.
    """

    def __init__(
        self,
        n_embed: int,
        embed_dim: int,
        beta: float = 0.25,
        legacy: bool = False,
        codebook_ema: bool = False,
        ema_decay: float = 0.99,
        ema_eps: float = 1e-5,
        dead_code_steps: int = 0,
        remap: str | Path | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
    ):
        super().__init__()
        if n_embed < 1 or embed_dim < 1:
            raise ValueError(f"VectorQuantizer needs n_embed >= 1 and embed_dim >= 1, got {n_embed}, {embed_dim}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.beta = beta
        self.legacy = legacy
        self.codebook_ema = codebook_ema
        self.ema_decay = ema_decay
        self.ema_eps = ema_eps
        self.dead_code_steps = dead_code_steps
        self.sane_index_shape = sane_index_shape
        # Built from an explicit weight: nn.Embedding's own N(0, 1) init would be overwritten anyway.
        codebook = torch.empty(n_embed, embed_dim).uniform_(-1.0 / n_embed, 1.0 / n_embed)
        self.embedding = nn.Embedding(n_embed, embed_dim, _weight=codebook)
        if codebook_ema:
            self.embedding.weight.requires_grad_(False)
            # Running code counts and sums; starting at (1, current code) leaves unused codes in place.
            self.register_buffer("ema_cluster_size", torch.ones(n_embed))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        # Derived training state, not saved: resuming restarts the grace period of unused codes.
        self.register_buffer("steps_since_used", torch.zeros(n_embed, dtype=torch.long), persistent=False)
        self.remap = remap
        if remap is not None:
            self.register_buffer("used", torch.as_tensor(np.load(remap, allow_pickle=False)).long())
            self.unknown_index = unknown_index
            self.re_embed = self.used.shape[0] + (1 if unknown_index == "extra" else 0)
            if unknown_index == "extra":
                self.unknown_index = self.used.shape[0]

    # -- checkpoints -------------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        # EMA statistics are derived from the codebook: fill them in from a checkpoint trained
        # without EMA, and drop them from one trained with it, so both load strictly either way.
        ema_keys = (prefix + "ema_cluster_size", prefix + "ema_embed_sum")
        weight_key = prefix + "embedding.weight"
        if self.codebook_ema and ema_keys[0] not in state_dict and weight_key in state_dict:
            state_dict[ema_keys[0]] = torch.ones(self.n_embed)
            state_dict[ema_keys[1]] = state_dict[weight_key].detach().clone()
        if not self.codebook_ema:
            for key in ema_keys:
                state_dict.pop(key, None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    # -- quantisation ------------------------------------------------------------------------
    @torch.no_grad()
    def nearest_codes(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code (Euclidean) for each row of flat [N, embed_dim] -> [N]."""
        codebook = self.embedding.weight.float()
        code_norms = codebook.pow(2).sum(1)
        rows = max(1, _DISTANCE_ELEMENTS // self.n_embed)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; ||z||^2 does not change the argmin.
        return torch.cat([torch.addmm(code_norms, chunk.float(), codebook.t(), alpha=-2.0).argmin(1) for chunk in flat.split(rows)])

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizationInfo]:
        """z [B, embed_dim, h, w] -> (z_q with straight-through gradient [B, embed_dim, h, w],
        scalar quantisation loss, QuantizationInfo)."""
        b, c, h, w = z.shape
        if c != self.embed_dim:
            raise ValueError(f"VectorQuantizer expects {self.embed_dim} channels, got input of shape {tuple(z.shape)}")
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        with torch.autocast(z.device.type, enabled=False):
            indices = self.nearest_codes(flat)
            z_q = F.embedding(indices, self.embedding.weight).view(b, h, w, c).permute(0, 3, 1, 2).to(z.dtype)
            commitment = F.mse_loss(z.float(), z_q.detach().float())
            if self.codebook_ema:
                loss = self.beta * commitment
            else:
                codebook = F.mse_loss(z_q.float(), z.detach().float())
                loss = self.beta * codebook + commitment if self.legacy else codebook + self.beta * commitment
        counts = torch.bincount(indices, minlength=self.n_embed)
        if self.training and (self.codebook_ema or self.dead_code_steps > 0):
            self._update_codebook(flat.detach(), indices, counts)
        info = self._info(indices, counts, (b, h, w))
        return z + (z_q - z).detach(), loss, info

    @torch.no_grad()
    def _update_codebook(self, flat: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor) -> None:
        counts = counts.float()
        if self.codebook_ema:
            sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, flat.float())
            if _distributed():  # every process must hold the same codebook
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            self.ema_cluster_size.mul_(self.ema_decay).add_(counts, alpha=1.0 - self.ema_decay)
            self.ema_embed_sum.mul_(self.ema_decay).add_(sums, alpha=1.0 - self.ema_decay)
        elif _distributed():
            dist.all_reduce(counts)
        if self.dead_code_steps > 0:
            self._reinit_dead_codes(flat, counts)
        if self.codebook_ema:  # after any re-initialisation, so codebook and statistics always agree
            self.embedding.weight.copy_(self.codebook_from_statistics())

    @torch.no_grad()
    def codebook_from_statistics(self) -> torch.Tensor:
        """The codebook the EMA statistics give (codebook_ema only): running sums over Laplace-smoothed
        running counts [n_embed, embed_dim]; after every training step the codebook equals it."""
        total = self.ema_cluster_size.sum()
        # Laplace smoothing keeps a never-used code from dividing by zero.
        smoothed = (self.ema_cluster_size + self.ema_eps) / (total + self.n_embed * self.ema_eps) * total
        return (self.ema_embed_sum / smoothed[:, None]).to(self.embedding.weight.dtype)

    @torch.no_grad()
    def _reinit_dead_codes(self, flat: torch.Tensor, counts: torch.Tensor) -> None:
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        dead = (self.steps_since_used >= self.dead_code_steps).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Encoder outputs of this batch: new codes land where the data is.
        choice = torch.randint(flat.shape[0], (dead.numel(),), device=flat.device)
        fresh = flat[choice].to(self.embedding.weight.dtype)
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.embedding.weight[dead] = fresh
        if self.codebook_ema:  # the codebook is then recomputed from these
            self.ema_embed_sum[dead] = fresh.float()
            self.ema_cluster_size[dead] = 1.0
        self.steps_since_used[dead] = 0

    @torch.no_grad()
    def _info(self, indices: torch.Tensor, counts: torch.Tensor, shape: tuple[int, int, int]) -> QuantizationInfo:
        probs = counts.float() / max(indices.numel(), 1)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        usage = (counts > 0).float().mean()
        reported = self._remap_to_used(indices) if self.remap is not None else indices
        if self.sane_index_shape:
            reported = reported.view(shape)
        return QuantizationInfo(indices=reported, perplexity=perplexity, usage=usage)

    # -- indices <-> latents ------------------------------------------------------------------
    def _remap_to_used(self, indices: torch.Tensor) -> torch.Tensor:
        match = indices[:, None] == self.used[None, :]
        new = match.long().argmax(1)
        unknown = ~match.any(1)
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, (int(unknown.sum()),), device=new.device)
        else:
            new[unknown] = int(self.unknown_index)
        return new

    def _unmap_to_all(self, indices: torch.Tensor) -> torch.Tensor:
        indices = indices.clone()
        indices[indices >= self.used.shape[0]] = 0  # the "extra" unknown code
        return self.used[indices]

    def embed_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] (as reported, i.e. remapped if `remap` is set) -> latents [B, embed_dim, h, w]."""
        if indices.dim() != 3:
            raise ValueError(f"embed_indices expects indices of shape [B, h, w], got {tuple(indices.shape)}")
        if self.remap is not None:
            indices = self._unmap_to_all(indices.reshape(-1)).view(indices.shape)
        return self.embedding(indices).permute(0, 3, 1, 2)


# VectorQuantizer's keyword options, which VQModel passes through.
QUANTIZER_OPTIONS = frozenset(list(inspect.signature(VectorQuantizer).parameters)[2:])


class VQModel(LatentAutoencoder):
    """Image [B, 3, H, W] in [-1, 1] <-> quantised latent [B, embed_dim, H/f, W/f].

    The constructor takes the `params` of an original LDM VQModel config. Training-side entries
    (lossconfig, image_key, monitor, batch_resize_range, scheduler_config, lr_g_factor, use_ema =
    weight EMA, which the training loop provides) are accepted and ignored; the rest (`remap`,
    `sane_index_shape` and this project's codebook options: beta, legacy, codebook_ema, ...) are
    `VectorQuantizer`'s. `ckpt_path` loads original weights.
    """

    TRAINING_PARAMS = frozenset({"lossconfig", "image_key", "monitor", "batch_resize_range", "scheduler_config",
                                 "lr_g_factor", "use_ema"})

    def __init__(self, ddconfig: DDConfig | dict, n_embed: int, embed_dim: int, *,
                 ckpt_path: str | Path | None = None, ignore_keys: Iterable[str] = (),
                 colorize_nlabels: int | None = None, **params: Any):
        quantizer_args = {k: v for k, v in params.items() if k in QUANTIZER_OPTIONS}
        drop_training_params("VQModel", {k: v for k, v in params.items() if k not in quantizer_args},
                             self.TRAINING_PARAMS)
        cfg = ddconfig_from(ddconfig)
        if cfg.double_z:
            raise ValueError("VQModel needs ddconfig.double_z: false (the encoder emits one latent)")
        super().__init__(cfg, embed_dim)
        self.quantize = VectorQuantizer(n_embed, embed_dim, **quantizer_args)
        self.quant_conv = Conv2d(cfg.z_channels, embed_dim, 1)
        self.post_quant_conv = Conv2d(embed_dim, cfg.z_channels, 1)
        self.finish(colorize_nlabels, ckpt_path, ignore_keys)

    def encode_latents(self, x: torch.Tensor, sample: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pre-quantisation latents [B, embed_dim, h, w], what LDM's diffusion runs on for VQ models.
        (`sample` and `generator` exist for interface parity with AutoencoderKL; VQ is deterministic.)"""
        return self.quant_conv(self.encoder(match_memory_format(x, self.encoder.conv_in.weight)))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizationInfo]:
        """x [B, in_channels, H, W] -> (quantised latents [B, embed_dim, h, w], q_loss, info)."""
        return self.quantize(self.encode_latents(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latents [B, embed_dim, h, w] -> image [B, out_ch, h*f, w*f]."""
        return self.decoder(self.post_quant_conv(match_memory_format(quant, self.decoder.conv_in.weight)))

    def decode_latents(self, h: torch.Tensor) -> torch.Tensor:
        """Quantise then decode pre-quantisation latents (e.g. a diffusion model's output)."""
        quant, _, _ = self.quantize(h)
        return self.decode(quant)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices [B, h, w] -> image [B, out_ch, h*f, w*f]."""
        return self.decode(self.quantize.embed_indices(indices))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, QuantizationInfo]:
        """Reconstruction [B, out_ch, H, W], q_loss and the quantizer's info."""
        quant, q_loss, info = self.encode(x)
        return self.decode(quant), q_loss, info

