"""Text-to-image, img2img (SDEdit) and inpainting with a `LatentDiffusion` model, in latent space.

`generate_latents` is what train_stage2.py (sample grids) and generate.py (the CLI) call; it encodes
prompts and images and hands a guided `Denoiser` to `sample_latents`, which is model-agnostic.

Reproducibility: image i of a batch draws all its noise (initial and per-step) from its own CPU
generator seeded seed + i, so it equals what seed + i gives alone, on any device and batch size.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .controlnet import Control, ControlledModel
from .guidance import ClassifierFreeGuidance
from .denoiser import Denoiser, make_sigmas, make_timesteps
from .samplers import SAMPLERS, default_spacing, get_sampler, randn, randn_like, repaint_path

__all__ = ["SAMPLERS", "Control", "generate_latents", "latent_mask", "sample_latents"]


def sample_latents(
    denoiser: Denoiser,
    shape: Sequence[int],
    *,
    generators: list[torch.Generator],
    sampler: str = "ddim",
    steps: int = 50,
    spacing: str | None = None,
    eta: float = 0.0,
    init_latents: Tensor | None = None,
    strength: float = 1.0,
    mask: Tensor | None = None,
    repaint_jump: int = 10,
    repaint_resamples: int = 1,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> Tensor:
    """Run a sampler from noise (or from noised `init_latents`) and return latents [B, C, h, w].

    - text-to-image: init_latents None; starts from pure noise.
    - img2img (SDEdit): init_latents [B, C, h, w] are noised to the level of step
      steps - int(steps * strength) and denoised from there, so int(steps * strength) steps run
      (counting the levels the spacing gives in place of steps: LDM's "uniform" may give more);
      strength 0 returns init_latents unchanged, 1 starts from pure noise.
    - inpainting: mask [B, 1, h, w] (1 = repaint, 0 = keep) with init_latents; before every step the
      kept region is replaced by init_latents noised to the current level, and at the end by
      init_latents themselves. repaint_resamples > 1 adds RePaint's resampling (ddpm, ddim): every
      `repaint_jump` steps go back up that many levels and denoise again.
    spacing: level spacing (see `denoiser.make_timesteps` / `make_sigmas`); default
        `samplers.default_spacing` (per sampler; trailing on a zero-terminal-SNR schedule).
    eta: DDIM's stochasticity (ddim only).
    """
    spec = get_sampler(sampler)
    spacing = spacing or default_spacing(sampler, denoiser.diffusion.schedule)
    batch = shape[0]
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
    if eta != 0 and sampler != "ddim":
        raise ValueError(f"eta applies to the ddim sampler only, got eta={eta} with {sampler!r}")
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    if mask is not None and init_latents is None:
        raise ValueError("inpainting needs the image to inpaint (init latents) besides the mask")
    if repaint_resamples > 1 and (mask is None or not spec.resampling):
        raise ValueError("RePaint resampling applies to inpainting (a mask) with the ddpm or ddim sampler")
    for name, value in (("init latents", init_latents), ("mask", mask)):
        expected = tuple(shape) if name == "init latents" else (batch, 1, *shape[2:])
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(f"{name} have shape {tuple(value.shape)}, expected {expected}")

    levels = denoiser.levels
    if spec.space == "timestep":
        timesteps = make_timesteps(levels.num_timesteps, steps, spacing)
        alphas = [float(levels.alphas_cumprod[t]) for t in timesteps]
        scales = [(a**0.5, (1 - a) ** 0.5) for a in alphas]
        pure_noise_scale = 1.0  # DDPM/LDM start from x_T = noise
    else:
        sigmas = make_sigmas(levels, steps, spacing)
        scales = [(1.0, float(s)) for s in sigmas[:-1]]
        pure_noise_scale = float(sigmas[0])
    noise = randn(shape, generators, device)

    count = len(scales)  # = steps, except LDM's "uniform" spacing when steps does not divide T
    start = count - int(count * strength) if init_latents is not None else 0
    if start == count:
        return init_latents.clone()
    if start == 0:
        x = noise * pure_noise_scale
    else:
        signal, noise_scale = scales[start]
        x = signal * init_latents + noise_scale * noise
    scales = scales[start:]
    run_levels = timesteps[start:] if spec.space == "timestep" else sigmas[start:]

    def reimpose_known(i: int, x: Tensor) -> Tensor:
        signal, noise_scale = scales[i]
        known = signal * init_latents + noise_scale * randn_like(x, generators)
        return mask * x + (1 - mask) * known

    options = {}
    if sampler == "ddim":
        options["eta"] = eta
    if repaint_resamples > 1:
        options["path"] = repaint_path(len(scales), repaint_jump, repaint_resamples)
    x = spec.sample(denoiser, x, run_levels, generators=generators, progress=progress,
                    before_step=reimpose_known if mask is not None else None, **options)
    if mask is not None:
        x = mask * x + (1 - mask) * init_latents
    return x


def latent_mask(mask: Tensor, latent_size: tuple[int, int]) -> Tensor:
    """A pixel mask [B, 1, H, W] (1 = repaint) at latent size [B, 1, h, w].

    A latent pixel is repainted as much as the most-repainted image pixel it covers (max pooling),
    so the kept region never reaches into what should change.
    """
    return F.adaptive_max_pool2d(mask.float(), latent_size)


def _as_list(value: list[str] | str | None, batch: int, what: str) -> list[str]:
    if value is None:
        return [""] * batch
    if isinstance(value, str):
        return [value] * batch
    value = list(value)
    if len(value) != batch:
        raise ValueError(f"got {len(value)} {what} for {batch} prompts")
    return value


def _batched(images: Tensor | None, batch: int, what: str) -> Tensor | None:
    if images is None:
        return None
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] not in (1, batch):
        raise ValueError(f"{what} must be [1 or {batch}, C, H, W], got shape {tuple(images.shape)}")
    return images.expand(batch, *images.shape[1:])


@torch.no_grad()
def generate_latents(
    model,
    prompts: list[str],
    *,
    negative: list[str] | str | None = None,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    guidance: float = 5.0,
    guidance_rescale: float = 0.0,
    height: int,
    width: int,
    eta: float = 0.0,
    init_image: Tensor | None = None,
    strength: float | None = None,
    mask: Tensor | None = None,
    progress: bool = False,
    spacing: str | None = None,
    repaint_jump: int = 10,
    repaint_resamples: int = 1,
    control: Sequence[Control] | None = None,
) -> Tensor:
    """Sample latents [B, C, height / f, width / f] for `prompts` with a `LatentDiffusion` model.

    negative: prompt(s) to guide away from, replacing the empty unconditional prompt.
    guidance: classifier-free guidance scale (1 = conditional model only); guidance_rescale: phi.
    init_image: [1 or B, 3, height, width] in [-1, 1] for img2img / inpainting; encoded to the
        posterior mean (deterministic). strength: how much of the schedule to run on it; default
        0.6 for img2img and 1.0 (start from noise) for inpainting.
    mask: [1 or B, 1, height, width] in [0, 1], 1 = repaint; needs init_image.
    control: ControlNets with their condition images ([1 or B, hint_channels, height, width] in
        [0, 1]) and weights; their scaled residuals add up (see `ldm.controlnet.ControlledModel`).
    See `sample_latents` for sampler, steps, spacing, eta and the RePaint options. The model should
    be in eval mode; decode the result with `model.decode_latents`.
    """
    prompts = list(prompts)
    batch = len(prompts)
    if batch == 0:
        raise ValueError("no prompts given")
    get_sampler(sampler)
    factor = model.latent_factor * 2 ** (len(model.cfg.unet.channel_mult) - 1)
    if height <= 0 or width <= 0 or height % factor or width % factor:
        raise ValueError(f"height and width must be positive multiples of {factor} for this model "
                         f"(autoencoder factor {model.latent_factor} times the U-Net's downsampling), "
                         f"got {height}x{width}")
    negatives = _as_list(negative, batch, "negative prompts")
    init_image = _batched(init_image, batch, "init_image")
    mask = _batched(mask, batch, "mask")
    if init_image is not None and tuple(init_image.shape[1:]) != (3, height, width):
        raise ValueError(f"init_image must be [B, 3, {height}, {width}], got shape {tuple(init_image.shape)}")
    if mask is not None:
        if init_image is None:
            raise ValueError("a mask needs the init_image to inpaint")
        if tuple(mask.shape[1:]) != (1, height, width):
            raise ValueError(f"mask must be [B, 1, {height}, {width}] like the init image, got {tuple(mask.shape)}")
        if bool((mask < 0).any()) or bool((mask > 1).any()):
            raise ValueError("mask values must lie in [0, 1] (1 = repaint, 0 = keep)")
    if strength is None:
        strength = 1.0 if mask is not None else 0.6
    controls = []
    for i, c in enumerate(control or []):
        if c.net.latent_factor != model.latent_factor:
            raise ValueError(f"ControlNet {i + 1} encodes condition images {c.net.latent_factor}x the latent size, "
                             f"but this model's autoencoder downsamples {model.latent_factor}x")
        hint = c.hint[None] if c.hint.ndim == 3 else c.hint
        if hint.ndim != 4 or hint.shape[0] not in (1, batch) or tuple(hint.shape[1:]) != (c.net.hint_channels,
                                                                                         height, width):
            raise ValueError(f"condition image {i + 1} must be [1 or {batch}, {c.net.hint_channels}, {height}, "
                             f"{width}] (the output size), got shape {tuple(c.hint.shape)}")
        controls.append(replace(c, hint=hint))

    device = next(model.unet.parameters()).device
    latent_size = (height // model.latent_factor, width // model.latent_factor)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    cond = model.encode_text(prompts)
    uncond = model.encode_text(negatives) if guidance != 1 else None
    init_latents = None
    if init_image is not None:
        # Encode each distinct image once; the posterior mean keeps img2img deterministic.
        unique = init_image[:1] if init_image.stride(0) == 0 else init_image
        init_latents = model.encode_images(unique.to(device), sample=False).float()
        init_latents = init_latents.expand(batch, *init_latents.shape[1:]).contiguous()
    if mask is not None:
        mask = latent_mask(mask.to(device), latent_size)
    network = model
    if controls:
        network = ControlledModel(model, [replace(c, hint=c.hint.to(device)) for c in controls], batch)
    model_fn = ClassifierFreeGuidance(network, model.diffusion, cond, uncond, guidance, guidance_rescale)
    return sample_latents(
        Denoiser(model_fn, model.diffusion),
        (batch, model.latent_channels, *latent_size),
        generators=generators,
        sampler=sampler,
        steps=steps,
        spacing=spacing,
        eta=eta,
        init_latents=init_latents,
        strength=strength,
        mask=mask,
        repaint_jump=repaint_jump,
        repaint_resamples=repaint_resamples,
        device=device,
        progress=progress,
    )
