"""A generation request checked before any weights are loaded: the `Request` (what `ldm.Pipeline` and
generate.py are asked to draw), the model files it is drawn with (`ModelFiles`: checked for what they
hold, configs read) and the `Plan` they make together (sizes and steps checked against the configs,
input images read, sampling options resolved), which `Pipeline.draw` runs.

A bad input is a one-line ValueError (FileNotFoundError for a missing file, TypeError for an image that
is neither a path nor a PIL image) naming the argument: its keyword (`API_NAMES`), or the flag in
generate.py, which passes its own `names`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from autoencoder import AutoencoderConfig
from conditioning.edges import canny_hint
from .denoiser import NoiseLevels
from .diffusion import Diffusion
from .generation import SizeLimits
from .latent_diffusion import LatentDiffusionConfig
from .original_format import model_file_kind, read_model_configs
from .pipeline_lora import LoRASpec, check_lora_files, lora_specs
from .precision import resolve_dtype
from .samplers import repaint_path
from .sampling_options import MAX_SEED, OptionError, SamplingOptions
from .schedule import NoiseSchedule

__all__ = ["API_NAMES", "CONTROL_KINDS", "ModelFiles", "Plan", "Request", "image_name", "name_of"]

# The documented defaults (README: DPM-Solver++ 2M, 25 steps, guidance 3); `python -m ldm.evaluate` uses
# the same (tests/test_evaluate.py checks), so an evaluation scores what generate.py draws.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE = "dpmpp-2m", 25, 3.0
CONTROL_KINDS = ("canny", "none", "map")
# ControlNet's canny annotator offers thresholds 1..255 and its canny model was trained in that range
# (cv2.Canny itself takes L1 gradients up to 8 x 255).
CANNY_RANGE = (0, 255)
CANNY_DEFAULTS = (100, 200)
# ControlNet front ends offer weights up to 2; far above, the residuals swamp the U-Net (and overflow).
MAX_CONTROL_SCALE = 10.0

# What an error calls each input: keys are the `Request` fields (and the sampling options' field names);
# a key not listed is its own name. generate.py passes its flags instead.
API_NAMES = {"negative": "negative_prompt", "controlnet": "ControlNet", "controlnets": "controlnets=[...]",
             "checkpoint": "the checkpoint", "loras": "loras=[...]", "lora_allow_partial": "lora_allow_partial=True"}


def name_of(names: Mapping[str, str], key: str) -> str:
    """What an error calls argument `key` (see `API_NAMES`)."""
    return names.get(key, key)


@dataclass(frozen=True)
class Request:
    """Everything one generation asks for but the model: `Pipeline.__call__`'s keywords, and generate.py's
    flags. Images (init_image, mask, control_images) are file paths or PIL images.

    num_images per prompt, image k of a prompt drawn with seed + k, batch_size of them at a time
    (default all). size (square) or height and width: the output in pixels; default the init image's,
    else the control images', else the model's training size. control, control_scales: given once for
    all control images or once for each (default "none" and 1.0)."""

    prompts: tuple[str, ...]
    negative_prompt: str = ""
    sampler: str = DEFAULT_SAMPLER
    steps: int = DEFAULT_STEPS
    guidance: float = DEFAULT_GUIDANCE
    guidance_rescale: float = 0.0
    eta: float = 0.0
    spacing: str | None = None
    seed: int = 0
    num_images: int = 1
    batch_size: int | None = None
    size: int | None = None
    height: int | None = None
    width: int | None = None
    init_image: object = None
    strength: float | None = None
    mask: object = None
    repaint_resamples: int = 1
    repaint_jump: int = 10
    control_images: tuple = ()
    control: tuple[str, ...] = ()
    control_scales: tuple[float, ...] = ()
    guess_mode: bool = False
    canny_low: int | None = None
    canny_high: int | None = None

    @property
    def canny_thresholds(self) -> tuple[int, int]:
        """(low, high) of Canny, given or default."""
        low, high = self.canny_low, self.canny_high
        return (CANNY_DEFAULTS[0] if low is None else low), (CANNY_DEFAULTS[1] if high is None else high)

    def check(self, controlnets: int, names: Mapping[str, str] = API_NAMES) -> None:
        """What can be checked without the model's configs: counts, ranges and which settings go together
        (the sampling settings are checked by `sampling_options`)."""
        n = lambda key: name_of(names, key)  # noqa: E731
        for key, value in (("num_images", self.num_images), ("batch_size", self.batch_size), ("size", self.size)):
            if value is not None and value < 1:
                raise ValueError(f"{n(key)} must be positive, got {value}")
        if self.size is not None and (self.height, self.width) != (None, None):
            raise ValueError(f"give {n('size')} or {n('height')} and {n('width')}, not both")
        if (self.height is None) != (self.width is None):
            raise ValueError(f"give both {n('height')} and {n('width')} (or {n('size')})")
        if self.mask is not None and self.init_image is None:
            raise ValueError(f"{n('mask')} needs {n('init_image')} (the image to inpaint)")
        if self.strength is not None and self.init_image is None:
            raise ValueError(f"{n('strength')} applies to an {n('init_image')}")
        if self.repaint_resamples > 1 and self.mask is None:
            raise ValueError(f"{n('repaint_resamples')} (RePaint) applies to inpainting, with {n('mask')}")
        self._check_controls(controlnets, n)

    def _check_controls(self, count: int, n: Callable[[str], str]) -> None:
        """One image per ControlNet, the per-net settings once or once per net, scales and Canny thresholds
        in range and only where they apply."""
        if len(self.control_images) != count:
            raise ValueError(f"give one {n('control_image')} per {n('controlnet')} (got {len(self.control_images)} "
                             f"images for {count} ControlNets)")
        for key, values in (("control", self.control), ("control_scale", self.control_scales)):
            if len(values) not in (0, 1, count) or (values and not count):
                raise ValueError(f"{n(key)} is given {len(values)} times for {count} ControlNets (give it once for "
                                 f"all, or once per {n('controlnet')})")
        for kind in self.control:
            if kind not in CONTROL_KINDS:
                raise ValueError(f"{n('control')} must be one of {', '.join(CONTROL_KINDS)}, got {kind!r}")
        if self.guess_mode and not count:
            raise ValueError(f"{n('guess_mode')} needs a {n('controlnet')}")
        for scale in self.control_scales:
            if not (isinstance(scale, (int, float)) and np.isfinite(scale) and 0 <= scale <= MAX_CONTROL_SCALE):
                raise ValueError(f"{n('control_scale')} must be a number in [0, {MAX_CONTROL_SCALE:g}], got {scale}")
        if (self.canny_low is not None or self.canny_high is not None) and "canny" not in self.control:
            raise ValueError(f"{n('canny_low')} / {n('canny_high')} apply to {n('control')} canny")
        low, high = self.canny_thresholds
        for key, value in (("canny_low", low), ("canny_high", high)):
            if not CANNY_RANGE[0] <= value <= CANNY_RANGE[1]:
                raise ValueError(f"{n(key)} must be in {CANNY_RANGE[0]}..{CANNY_RANGE[1]}, got {value}")
        if low > high:
            raise ValueError(f"{n('canny_low')} {low} is above {n('canny_high')} {high}")

    def sampling_options(self, names: Mapping[str, str] = API_NAMES) -> SamplingOptions:
        """The sampling settings, validated (a bad one is a one-line error naming it). The size is the
        requested one here (None if not given); `ModelFiles.plan` sets it from the images or the model."""
        if self.size is not None:  # height and width come from `size`: errors name it
            names = {**names, "height": name_of(names, "size"), "width": name_of(names, "size")}
        height, width = (self.size, self.size) if self.size is not None else (self.height, self.width)
        try:
            options = SamplingOptions(sampler=self.sampler, steps=self.steps, guidance=self.guidance,
                                      guidance_rescale=self.guidance_rescale, eta=self.eta, spacing=self.spacing,
                                      seed=self.seed, height=height, width=width, negative=self.negative_prompt,
                                      strength=self.strength, repaint_jump=self.repaint_jump,
                                      repaint_resamples=self.repaint_resamples)
        except OptionError as e:
            raise e.for_flags(names) from None
        if self.seed + self.num_images - 1 > MAX_SEED:
            raise ValueError(f"{name_of(names, 'seed')} {self.seed} with {name_of(names, 'num_images')} "
                             f"{self.num_images}: the last image's seed would be past 2**64 - 1")
        return options

    def size_text(self, names: Mapping[str, str]) -> str:
        """The requested size as an error names it ("--size 32", "height 32 / width 48")."""
        if self.size is not None:
            return f"{name_of(names, 'size')} {self.size}"
        return f"{name_of(names, 'height')} {self.height} / {name_of(names, 'width')} {self.width}"


def per_control(values: Sequence, count: int, default) -> list:
    """A setting given once applies to every ControlNet; not at all, the default does."""
    if len(values) == 1:
        return list(values) * count
    return list(values) or [default] * count


# -- images: file paths or PIL images ---------------------------------------------------------------------

def image_label(image) -> str:
    """How an error names an input image: its path, or "(PIL image)"."""
    return str(image) if isinstance(image, (str, os.PathLike)) else "(PIL image)"


def image_name(image) -> str:
    """How the PNG record names an input image: its file name (a PIL image's, if it was read from a file)."""
    path = image if isinstance(image, (str, os.PathLike)) else getattr(image, "filename", "")
    return Path(path).name if path else "(PIL image)"


def open_image(image, mode: str, what: str, unreadable: str = "image") -> Image.Image:
    """A path or PIL image as a PIL image in `mode` ("RGB", "L"). A missing file ("<what> not found"), one
    that is no image ("cannot read <unreadable> <path>") or another type is a one-line error."""
    if isinstance(image, Image.Image):
        return image.convert(mode)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(f"{what} must be a PIL image or a file path, got {type(image).__name__}")
    if not Path(image).is_file():
        raise FileNotFoundError(f"{what} not found: {image}")
    try:
        with Image.open(image) as opened:
            return opened.convert(mode)
    except OSError as e:
        raise ValueError(f"cannot read {unreadable} {image}: {e}") from None


def image_tensor(image, mode: str) -> torch.Tensor:
    """An init image (mode "RGB": [1, 3, H, W] in [-1, 1]) or a mask ("L": [1, 1, H, W] in [0, 1])."""
    array = np.asarray(open_image(image, mode, "mask" if mode == "L" else "init image"), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]
    return tensor * 2 - 1 if mode == "RGB" else tensor


def condition_tensor(image, kind: str, thresholds: tuple[int, int]) -> torch.Tensor:
    """A control image as a condition [1, 3, H, W] in [0, 1]: its Canny edges (kind "canny") or itself."""
    rgb = open_image(image, "RGB", "control image", unreadable="control image")
    if kind == "canny":
        return canny_hint(rgb, *thresholds)[None]
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


# -- the stages: files, plan, weights ---------------------------------------------------------------------

def steps_per_batch(options: SamplingOptions, schedule: NoiseSchedule, img2img: bool) -> int:
    """Sampler steps one batch runs (`callback` calls) with resolved `options`: the levels of the spacing
    (LDM's "uniform" may give more than asked), the strength's share of them on an init image, and with
    RePaint every step down its path, the repeated ones included (as `ldm.generation.sample_latents`)."""
    steps = options.steps_run(NoiseLevels(schedule))
    if img2img:
        steps = int(steps * options.strength)
    if options.repaint_resamples > 1:
        path = repaint_path(steps, options.repaint_jump, options.repaint_resamples)
        steps = sum(j > i for i, j in zip(path[:-1], path[1:]))
    return steps


@dataclass(frozen=True)
class Plan:
    """A `Request` checked against the model's configs, with its images read and its sampling options
    resolved (size, spacing, strength): what `Pipeline.draw` runs.

    init_image [1, 3, H, W] in [-1, 1], mask [1, 1, H, W] in [0, 1], hints: one condition [1, 3, H, W] in
    [0, 1] per ControlNet; kinds and scales per ControlNet."""

    request: Request
    options: SamplingOptions
    init_image: torch.Tensor | None
    mask: torch.Tensor | None
    hints: list[torch.Tensor]
    kinds: list[str]
    scales: list[float]
    steps_per_batch: int

    @property
    def batch_size(self) -> int:
        return self.request.batch_size or self.request.num_images

    @property
    def total_steps(self) -> int:
        """Sampler steps of the whole plan (every prompt and batch): the `callback`'s total."""
        batches = -(-self.request.num_images // self.batch_size)
        return self.steps_per_batch * batches * len(self.request.prompts)


@dataclass(frozen=True)
class ModelFiles:
    """A model file, its ControlNets and LoRAs, checked for what they hold and with their configs read, but
    no weights loaded (`read`); `plan` checks a request against them. lora_merge: bake the LoRAs into the
    weights at load (default: forward hooks); lora_allow_partial: LoRA keys matching no layer are a
    warning, not an error (`ldm.pipeline_lora`). dtype: what the U-Net and ControlNets run in, "fp32", "bf16"
    or "fp16" (`ldm.precision`; `read` resolves "auto" for the device). vae_tiling: decode images larger than
    `autoencoder.tiling.VAE_TILE` pixels in overlapping tiles of that size."""

    checkpoint: str
    config: str | None
    ema: bool
    controlnets: tuple[str, ...]
    device: str
    cfg: LatentDiffusionConfig = field(repr=False)
    autoencoder_cfg: AutoencoderConfig = field(repr=False)
    loras: tuple[LoRASpec, ...] = ()
    lora_allow_partial: bool = False
    lora_merge: bool = False
    dtype: str = "fp32"
    vae_tiling: bool = False

    @classmethod
    def read(cls, checkpoint: str | os.PathLike, config: str | os.PathLike | None = None, *, ema: bool = False,
             controlnets: Sequence[str | os.PathLike] = (), device: str = "cpu", loras: Sequence = (),
             lora_allow_partial: bool = False, lora_merge: bool = False, dtype: str = "auto",
             vae_tiling: bool = False, names: Mapping[str, str] = API_NAMES) -> ModelFiles:
        """Check the files (present; `checkpoint` a whole model, each of `controlnets` a ControlNet, each of
        `loras` a LoRA file, told by metadata or key names) and `device`, and read the model's configs.
        config: the original YAML of an original checkpoint (default: the .yaml beside it); ema: its
        model_ema.* U-Net weights; loras: paths, (path, scale) pairs or `LoRASpec`s. Whether a LoRA fits
        the model is known once its weights load (`Pipeline`), before any step. dtype: "auto" (the
        device's default, `ldm.precision.AUTO_DTYPE`), "fp32", "bf16" or "fp16"."""
        n = lambda key: name_of(names, key)  # noqa: E731
        checkpoint, controlnets = str(checkpoint), tuple(str(p) for p in controlnets)
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"{n('device')} cuda: no CUDA device available")
        dtype = resolve_dtype(dtype, device, n("dtype"))
        for path in controlnets:
            if not Path(path).is_file():
                raise FileNotFoundError(f"ControlNet file not found: {path}")
        kind = model_file_kind(checkpoint)
        if not kind.model:
            remedy = (f"pass it with {n('controlnets')} (and the model it controls as {n('checkpoint')})"
                      if kind.controlnet else "generate needs a stage-2 model file (train_stage2.py's "
                      "model.safetensors) or an original SD checkpoint")
            raise ValueError(f"{checkpoint} is {kind.description}; {remedy}")
        for path in controlnets:
            kind = model_file_kind(path)
            if not kind.controlnet:
                takes = (f"{n('controlnets')} takes a ControlNet file (train_controlnet.py's controlnet.safetensors "
                         "or original ControlNet weights)")
                remedy = f"pass it with {n('checkpoint')} ({takes})" if kind.model else takes
                raise ValueError(f"{path} is {kind.description}; {remedy}")
        specs = lora_specs(loras, n)
        check_lora_files(specs, n)
        cfg, autoencoder_cfg = read_model_configs(checkpoint, config, use_ema=ema)
        return cls(checkpoint, None if config is None else str(config), ema, controlnets, device, cfg,
                   autoencoder_cfg, specs, lora_allow_partial, lora_merge, dtype, bool(vae_tiling))

    @property
    def schedule(self) -> NoiseSchedule:
        return Diffusion.from_config(self.cfg.diffusion).schedule

    def plan(self, request: Request, names: Mapping[str, str] = API_NAMES) -> Plan:
        """`request` checked against these files' configs (sizes, steps) with its images read: all before
        any weights are loaded. The output size is the init image's, else the control images' (pixel-
        aligned with the output), else the requested one, else the training size."""
        request.check(len(self.controlnets), names)
        options = request.sampling_options(names)
        kinds = per_control(request.control, len(self.controlnets), "none")
        scales = per_control(request.control_scales, len(self.controlnets), 1.0)
        init_image = image_tensor(request.init_image, "RGB") if request.init_image is not None else None
        mask = image_tensor(request.mask, "L") if request.mask is not None else None
        hints = [condition_tensor(image, kind, request.canny_thresholds)
                 for image, kind in zip(request.control_images, kinds)]
        height, width = self._output_size(request, names, init_image, mask, hints)
        try:
            options = replace(options, height=height, width=width).resolve(self.schedule, inpainting=mask is not None)
        except OptionError as e:
            raise e.for_flags(names) from None
        return Plan(request, options, init_image, mask, hints, kinds, scales,
                    steps_per_batch(options, self.schedule, img2img=init_image is not None))

    def _output_size(self, request: Request, names: Mapping[str, str], init_image: torch.Tensor | None,
                     mask: torch.Tensor | None, hints: list[torch.Tensor]) -> tuple[int, int]:
        """(height, width) of the output, checked against the model's size limits and the images."""
        limits = SizeLimits.of(self.cfg, self.autoencoder_cfg)
        asked = (request.size, request.size) if request.size is not None else (request.height, request.width)
        if init_image is not None or hints:
            what, image = ("init image", init_image) if init_image is not None else ("control image", hints[0])
            height, width = image.shape[2:]
            if asked[0] is not None and asked != (height, width):
                raise ValueError(f"{request.size_text(names)} differs from the {what}'s {width}x{height}; "
                                 "leave it out or resize the image")
            source = request.init_image if init_image is not None else request.control_images[0]
            limits.check_image(height, width, f"{what} {image_label(source)}")
        elif asked[0] is not None:
            height, width = asked
            limits.check(height, name_of(names, "size" if request.size is not None else "height"))
            if request.size is None:
                limits.check(width, name_of(names, "width"))
        else:
            height = width = limits.training_size
        if mask is not None and mask.shape[2:] != (height, width):
            raise ValueError(f"mask is {mask.shape[3]}x{mask.shape[2]} but the init image is {width}x{height}")
        for image, hint in zip(request.control_images, hints):
            if hint.shape[2:] != (height, width):
                raise ValueError(f"control image {image_label(image)} is {hint.shape[3]}x{hint.shape[2]} but the "
                                 f"output is {width}x{height}; resize it to the output size")
        return height, width
