"""Text-to-image, img2img (SDEdit) and inpainting with a `LatentDiffusion` model, in latent space.

`generate_latents` is what train_stage2.py (sample grids) and generate.py (the CLI) call; it encodes
prompts and images and hands a guided `Denoiser` to `sample_latents`, which is model-agnostic. Both
take one validated `SamplingOptions` (or its fields as keyword arguments).

Reproducibility: image i of a batch draws all its noise (initial and per-step) from its own CPU
generator seeded seed + i, so it gets the noise seed + i gives alone, on any device and batch size.
On CPU (float32, 1 or 2 threads) it is then the same image to the bit at any batch size, with or
without guidance (which doubles the network's batch): every layer computes a sample the same way
whatever shares its batch (`layers`; tests/test_batch_invariance.py). With 3 or more threads torch
splits elementwise ops (SiLU, GELU) across threads at batch-dependent points, and GPU kernels follow
the batch size too: there an image can differ from the one drawn alone by float rounding (before the
CPU path was made exact: 1/255 in one or two of a 64x64 image's 12,288 values).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from autoencoder import AutoencoderConfig
from autoencoder.config import ddconfig_from
from common.randomness import randn, randn_like
from .controlnet import Control, ControlledModel
from .denoiser import Denoiser
from .guidance import ClassifierFreeGuidance
from .latent_diffusion import LatentDiffusionConfig
from .samplers import SAMPLERS, Callback, repaint_path
from .sampling_options import MAX_SEED, OptionError, SamplingOptions

__all__ = ["SAMPLERS", "Control", "SamplingOptions", "SizeLimits", "generate_latents", "latent_mask",
           "read_prompt_lines", "sample_latents"]

# Command lines refuse image sides above this many times the training size (see `SizeLimits`).
MAX_SIZE_FACTOR = 8


def sample_latents(
    denoiser: Denoiser,
    shape: Sequence[int],
    options: SamplingOptions | None = None,
    *,
    generators: list[torch.Generator],
    init_latents: Tensor | None = None,
    mask: Tensor | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    callback: Callback | None = None,
    **fields,
) -> Tensor:
    """Run a sampler from noise (or from noised `init_latents`) and return latents [B, C, h, w].

    - text-to-image: init_latents None; starts from pure noise.
    - img2img (SDEdit): init_latents [B, C, h, w] are noised to the level of step
      steps - int(steps * strength) and denoised from there, so int(steps * strength) steps run
      (counting the levels the spacing gives in place of steps: LDM's "uniform" may give more);
      strength 0 returns init_latents unchanged, 1 starts from pure noise.
    - inpainting: mask [B, 1, h, w] (1 = repaint, 0 = keep) with init_latents; before every step the
      kept region is replaced by init_latents noised to the current level, and at the end by
      init_latents themselves. repaint_resamples > 1 adds RePaint's resampling (samplers that support
      it): every `repaint_jump` steps, counted from the clean end, go back up that many levels and
      denoise again.
    options (or its `fields` as keywords): sampler, steps, spacing, eta, strength, repaint_*; unset
    defaults are filled by `SamplingOptions.resolve` for the denoiser's schedule. generators: one per
    image, drawing all its noise. callback(i, x, x0): after every sampler step (`ldm.samplers`).
    """
    options = SamplingOptions.build(options, **fields)
    options = options.resolve(denoiser.diffusion.schedule, inpainting=mask is not None)
    _check_latent_inputs(options, shape, generators, init_latents, mask)
    space = options.spec.state_space
    levels = space.levels(denoiser.levels, options.steps, options.spacing)
    scales = space.state_scales(denoiser.levels, levels)  # one per level: more than steps with LDM "uniform"
    noise = randn(shape, generators, device)

    start = len(scales) - int(len(scales) * options.strength) if init_latents is not None else 0
    if start == len(scales):
        return init_latents.clone()
    if start == 0:
        x = noise * space.pure_noise_scale(levels)
    else:
        signal, noise_scale = scales[start]
        x = signal * init_latents + noise_scale * noise
    scales = scales[start:]

    def reimpose_known(i: int, x: Tensor) -> Tensor:
        signal, noise_scale = scales[i]
        known = signal * init_latents + noise_scale * randn_like(x, generators)
        return mask * x + (1 - mask) * known

    resampling = {}
    if options.repaint_resamples > 1:
        resampling["path"] = repaint_path(len(scales), options.repaint_jump, options.repaint_resamples)
    x = options.spec.run(denoiser, x, levels[start:], eta=options.eta, generators=generators, progress=progress,
                         callback=callback, before_step=reimpose_known if mask is not None else None, **resampling)
    if mask is not None:
        x = mask * x + (1 - mask) * init_latents
    return x


def _check_latent_inputs(options: SamplingOptions, shape: Sequence[int], generators: list[torch.Generator],
                         init_latents: Tensor | None, mask: Tensor | None) -> None:
    """What `sample_latents` needs of its tensors; the options are valid by construction."""
    batch = shape[0]
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch}")
    if mask is not None and init_latents is None:
        raise ValueError("inpainting needs the image to inpaint besides the mask: a mask needs the init_image")
    if options.repaint_resamples > 1 and mask is None:
        raise ValueError("RePaint resampling (repaint_resamples) applies to inpainting, with a mask")
    for name, value, expected in (("init latents", init_latents, tuple(shape)), ("mask", mask, (batch, 1, *shape[2:]))):
        if value is not None and tuple(value.shape) != expected:
            raise ValueError(f"{name} have shape {tuple(value.shape)}, expected {expected}")


def read_prompt_lines(path: str | Path, label: str = "prompts file") -> list[str]:
    """The prompts in a text file, one per non-empty line (stripped); `label` names the file in errors.
    The file must be UTF-8 (a byte-order mark is dropped, not made part of the first prompt)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = e.object[:e.start].count(b"\n") + 1
        raise ValueError(f"{label} {path} is not UTF-8 text (byte {e.object[e.start]:#04x} on line {line}); "
                         "save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{label} {path} holds no prompts")
    return prompts


@dataclass(frozen=True)
class SizeLimits:
    """The image sides a model can draw, read from its configs alone, so a command line can check a size
    before it loads any weights.

    multiple: sides must be multiples of the autoencoder's downsampling times the U-Net's (every U-Net
        level but the last halves the latents, and the skip connections need the same sizes back up).
    training_size: the side the U-Net was trained at (its `image_size` in latent pixels), else SD's 512.
    largest: MAX_SIZE_FACTOR x training_size, rounded down to a multiple. Not a memory estimate: a bound
        that turns a typo (--size 100000 asks for tens of GB) into an error before anything runs; what
        fits below it depends on the machine.
    """

    latent_factor: int
    unet_factor: int
    training_size: int

    @classmethod
    def of(cls, cfg: LatentDiffusionConfig, autoencoder_cfg: AutoencoderConfig) -> SizeLimits:
        latent_factor = 2 ** (len(ddconfig_from(autoencoder_cfg.ddconfig).ch_mult) - 1)  # as the autoencoder's
        latent_size = cfg.unet.image_size
        return cls(latent_factor, 2 ** (len(cfg.unet.channel_mult) - 1),
                   latent_size * latent_factor if latent_size else 512)

    @property
    def multiple(self) -> int:
        return self.latent_factor * self.unet_factor

    @property
    def largest(self) -> int:
        return MAX_SIZE_FACTOR * self.training_size // self.multiple * self.multiple

    def check(self, side: int, what: str = "--size") -> None:
        """A one-line ValueError naming `what` unless `side` is a multiple in [multiple, largest]."""
        if side < 1 or side % self.multiple:
            raise ValueError(f"{what} must be a positive multiple of {self.multiple} for this model "
                             f"({self._factors}), got {side}")
        if side > self.largest:
            raise ValueError(f"{what} {side} is above this model's limit of {self.largest} ({self._training})")

    def check_image(self, height: int, width: int, what: str) -> None:
        """As `check`, for an image that sets the output size; `what` names it."""
        if height % self.multiple or width % self.multiple:
            raise ValueError(f"{what} is {width}x{height}: its sides must be multiples of {self.multiple} for this "
                             f"model ({self._factors}); resize it")
        if max(height, width) > self.largest:
            raise ValueError(f"{what} is {width}x{height}, above this model's limit of {self.largest} per side "
                             f"({self._training}); resize it")

    @property
    def _factors(self) -> str:
        return f"autoencoder factor {self.latent_factor} x the U-Net's downsampling {self.unet_factor}"

    @property
    def _training(self) -> str:
        return f"{MAX_SIZE_FACTOR}x the {self.training_size} pixels it was trained at"


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


def _batched(images: Tensor | None, batch: int, what: str, per_image: tuple[int, int, int]) -> Tensor | None:
    """Images [1 or B, *per_image] (or [*per_image]) as [B, *per_image], the batch dimension broadcast."""
    if images is None:
        return None
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[0] not in (1, batch):
        raise ValueError(f"{what} must be [1 or {batch}, C, H, W], got shape {tuple(images.shape)}")
    if tuple(images.shape[1:]) != per_image:
        raise ValueError(f"{what} must be [B, {', '.join(map(str, per_image))}], got shape {tuple(images.shape)}")
    return images.expand(batch, *images.shape[1:])


@torch.no_grad()
def generate_latents(
    model,
    prompts: list[str],
    options: SamplingOptions | None = None,
    *,
    init_image: Tensor | None = None,
    mask: Tensor | None = None,
    control: Sequence[Control] | None = None,
    progress: bool = False,
    callback: Callback | None = None,
    **fields,
) -> Tensor:
    """Sample latents [B, C, height / f, width / f] for `prompts` with a `LatentDiffusion` model.

    options (or its `fields` as keywords, e.g. seed=3, sampler="ddim", steps=4, height=64, width=64):
        see `SamplingOptions`; height and width are required, negative replaces the empty
        unconditional prompt, strength defaults to 0.6 for img2img and 1.0 (from noise) for inpainting.
    init_image: [1 or B, 3, height, width] in [-1, 1] for img2img / inpainting; encoded to the
        posterior mean (deterministic).
    mask: [1 or B, 1, height, width] in [0, 1], 1 = repaint; needs init_image.
    control: ControlNets with their condition images ([1 or B, hint_channels, height, width] in
        [0, 1]) and weights; their scaled residuals add up (see `ldm.controlnet.ControlledModel`).
    callback(i, x, x0): called after every sampler step (see `sample_latents`).
    The model should be in eval mode; decode the result with `model.decode_latents`.
    """
    options = SamplingOptions.build(options, **fields)
    prompts = list(prompts)
    batch = len(prompts)
    if batch == 0:
        raise ValueError("no prompts given")
    if options.seed + batch - 1 > MAX_SEED:
        raise OptionError("seed", f"seed {options.seed} + {batch - 1} (the batch's last image) is past 2**64 - 1")
    height, width = _output_size(model, options)
    negatives = _as_list(options.negative, batch, "negative prompts")
    init_image = _batched(init_image, batch, "init_image", (3, height, width))
    mask = _batched(mask, batch, "mask", (1, height, width))
    if mask is not None and (bool((mask < 0).any()) or bool((mask > 1).any())):
        raise ValueError("mask values must lie in [0, 1] (1 = repaint, 0 = keep)")
    controls = _checked_controls(model, control or [], batch, height, width)

    device = next(model.unet.parameters()).device
    latent_size = (height // model.latent_factor, width // model.latent_factor)
    generators = [torch.Generator().manual_seed(options.seed + i) for i in range(batch)]
    cond = encode_each(model, prompts)
    uncond = encode_each(model, negatives) if options.guidance != 1 else None
    init_latents = _encode_images(model, init_image, device)
    if mask is not None:
        mask = latent_mask(mask.to(device), latent_size)
    network = model
    if controls:
        network = ControlledModel(model, [replace(c, hint=c.hint.to(device)) for c in controls], batch)
    model_fn = ClassifierFreeGuidance(network, model.diffusion, cond, uncond, options.guidance,
                                      options.guidance_rescale)
    return sample_latents(Denoiser(model_fn, model.diffusion), (batch, model.latent_channels, *latent_size), options,
                          generators=generators, init_latents=init_latents, mask=mask, device=device,
                          progress=progress, callback=callback)


def encode_each(model, prompts: list[str]) -> Tensor:
    """Context [B, L, D] for B prompts, each distinct prompt encoded alone.

    A batched text encoder is not batch-invariant everywhere (its GEMMs are not ours: on an Intel Xeon
    with AMX at 2 threads, a prompt's context moves by 1.5e-6 once 3 or more share the batch), and the
    image of a seed must not depend on the other prompts drawn with it.
    """
    contexts = {prompt: model.encode_text([prompt]) for prompt in dict.fromkeys(prompts)}
    return torch.cat([contexts[prompt] for prompt in prompts])


def _output_size(model, options: SamplingOptions) -> tuple[int, int]:
    """(height, width) of the options, checked against what the model's latents can give."""
    height, width = options.height, options.width
    if height is None or width is None:
        raise ValueError("generate_latents needs the output size: height and width")
    limits = SizeLimits.of(model.cfg, model.autoencoder_cfg)
    if height % limits.multiple or width % limits.multiple:
        raise ValueError(f"height and width must be positive multiples of {limits.multiple} for this model "
                         f"(autoencoder factor {limits.latent_factor} times the U-Net's downsampling "
                         f"{limits.unet_factor}), got {height}x{width}")
    return height, width


def _checked_controls(model, control: Sequence[Control], batch: int, height: int, width: int) -> list[Control]:
    """The controls with condition images batched [1 or B, C, H, W] and checked against the model and size."""
    controls = []
    for i, c in enumerate(control):
        if c.net.latent_factor != model.latent_factor:
            raise ValueError(f"ControlNet {i + 1} encodes condition images {c.net.latent_factor}x the latent size, "
                             f"but this model's autoencoder downsamples {model.latent_factor}x")
        hint = c.hint[None] if c.hint.ndim == 3 else c.hint
        if hint.ndim != 4 or hint.shape[0] not in (1, batch) or tuple(hint.shape[1:]) != (c.net.hint_channels,
                                                                                         height, width):
            raise ValueError(f"condition image {i + 1} must be [1 or {batch}, {c.net.hint_channels}, {height}, "
                             f"{width}] (the output size), got shape {tuple(c.hint.shape)}")
        controls.append(replace(c, hint=hint))
    return controls


def _encode_images(model, init_image: Tensor | None, device: torch.device) -> Tensor | None:
    """Latents [B, C, h, w] of the init images [B, 3, H, W]: the posterior mean keeps img2img deterministic."""
    if init_image is None:
        return None
    batch = init_image.shape[0]
    # Encode each distinct image once (a broadcast [1] image has batch stride 0).
    unique = init_image[:1] if init_image.stride(0) == 0 else init_image
    init_latents = model.encode_images(unique.to(device), sample=False).float()
    return init_latents.expand(batch, *init_latents.shape[1:]).contiguous()
