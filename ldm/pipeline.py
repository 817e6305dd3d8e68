"""One object that draws images from a model file, called as diffusers' pipelines are.

    from ldm import Pipeline
    pipe = Pipeline.from_file("models/default/model.safetensors")
    images = pipe("grinning face", steps=25, sampler="dpmpp-2m", guidance=3.0, seed=0, num_images=4)

It loads every file generate.py loads (train_stage2.py's model.safetensors, original SD / LDM files with
their YAML `config`, ControlNets of either kind, LoRA files: `ldm.pipeline_lora`) and takes generate.py's
settings as keywords; it returns PIL images whose `.info` holds the PNG text chunks generate.py writes
(`ldm.png_metadata`). generate.py is a command line over it, so the same settings give the same bytes
either way.

Three stages, so that a command line checks everything before it loads any weights: `ModelFiles`
(the files checked and their configs read) and `ModelFiles.plan` (a `Request` validated against those
configs, its images read: a `Plan`), both in `ldm.request`, then `Pipeline` (the weights; `draw` runs a
plan). A bad input is a one-line error raised before the first step.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from autoencoder.tiling import VAE_TILE
from common.allocator import trim_heap
from common.cli import RunFailed
from common.weights import file_sha256, load_state_dict_strict
from layers import drop_phase_caches
from .controlnet import ENCODER_PARTS, Control, ControlNetFile, load_controlnet
from .denoiser import NoiseLevels
from .generation import generate_latents
from .latent_diffusion import same_unet_as
from .original_format import load_model
from .pipeline_lora import load_loras, lora_record
from .png_metadata import png_text
from .precision import cast_for_inference, dtype_note, torch_dtype
from .request import (API_NAMES, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, ModelFiles, Plan, Request,
                      image_name, name_of)

__all__ = ["Drawn", "Pipeline", "StepCallback"]

StepCallback = Callable[[int, int], None]  # (index of the step just run, 0-based; steps in the whole call)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images [B, 3, H, W] in about [-1, 1] -> [B, H, W, 3] uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


@dataclass
class Drawn:
    """One batch `Pipeline.draw` drew: images of prompt number `line`, drawn with `seeds`."""

    line: int
    seeds: list[int]
    images: list[Image.Image]


class Pipeline:
    """A loaded model (and ControlNets) that draws images: `Pipeline.from_file(path)(prompt, ...)`.

    files: what was loaded. model: the `LatentDiffusion` (eval mode). checkpoint_sha: the model file's
    sha256 (the PNG records its first 12 hex digits). controlnets: (path, loaded file) per ControlNet.
    loras: the LoRAs applied to `model` (`ldm.pipeline_lora.LoadedLoRA`), in the order given. dtype: what
    the U-Net and ControlNets run in (`files.dtype`; the rest stays float32, `ldm.precision`)."""

    def __init__(self, files: ModelFiles, names: Mapping[str, str] = API_NAMES):
        """Load the weights of checked `files` (see `ModelFiles.read`; `from_file` does both). A ControlNet
        trained with an unlocked U-Net also sets the U-Net's output blocks (at most one may). LoRAs come
        last, so that one merged into those output blocks is not overwritten; one that does not fit the
        model is a one-line error here, before any step. The U-Net and ControlNets arrive in `files.dtype`,
        read straight in it from the files (`ldm.original_format`: no float32 copy is made), except a U-Net
        that LoRAs are merged into: it loads in float32, the LoRAs are added there and the sum is cast
        once (rounded once, as a float32 merge exported and loaded would be)."""
        self.files = files
        self.dtype = torch_dtype(files.dtype)
        merged = files.lora_merge and bool(files.loras)
        self.model = load_model(files.checkpoint, files.config, use_ema=files.ema, device=files.device,
                                unet_dtype=torch.float32 if merged else self.dtype)
        self.checkpoint_sha = file_sha256(files.checkpoint)
        self.controlnets: list[tuple[str, ControlNetFile]] = []
        self.controlnet_shas = [file_sha256(path) for path in files.controlnets]
        decoder_from = None
        for path, sha in zip(files.controlnets, self.controlnet_shas):
            loaded = load_controlnet(path, unet=self.model.unet, latent_factor=self.model.latent_factor,
                                     device=files.device, dtype=self.dtype)
            trained_on = loaded.metadata.get("stage2_sha256")
            if trained_on and trained_on not in same_unet_as(files.checkpoint, self.checkpoint_sha):
                print(f"warning: {path} was trained on another stage-2 model than {files.checkpoint}",
                      file=sys.stderr)
            if loaded.unet_decoder:
                if decoder_from is not None:
                    raise ValueError(f"{decoder_from} and {path} both carry U-Net output blocks (trained with "
                                     "sd_locked: false); use at most one of them")
                decoder_from = path
                load_state_dict_strict(self.model.unet, loaded.unet_decoder, path,
                                       what=f"the U-Net of {files.checkpoint}",
                                       allow_missing=tuple(part + "." for part in ENCODER_PARTS),
                                       hint="its output blocks were trained on another stage-2 model")
            self.controlnets.append((path, loaded))
        self.loras = load_loras(self.model, files.loras, merge=files.lora_merge,
                                allow_partial=files.lora_allow_partial, n=lambda key: name_of(names, key))
        if merged:  # otherwise the U-Net arrived in self.dtype
            cast_for_inference([self.model.unet], self.dtype)
        note = dtype_note(files.dtype, files.device)
        if note:
            print(f"note: {note}", file=sys.stderr)

    @classmethod
    def from_file(cls, checkpoint: str | os.PathLike, config: str | os.PathLike | None = None, *,
                  controlnets: Sequence[str | os.PathLike] = (), ema: bool = False, device: str = "cpu",
                  loras: Sequence = (), lora_allow_partial: bool = False, lora_merge: bool = False,
                  dtype: str | torch.dtype = "auto", vae_tiling: bool = False) -> Pipeline:
        """Check and load a model file: train_stage2.py's model.safetensors, or an original SD / LDM
        .ckpt / .safetensors with its inference YAML `config` (default: the .yaml beside it; `ema` takes
        its model_ema.* U-Net weights), with ControlNet files (ours or original) in `controlnets`.

        loras: LoRA files (kohya / A1111 or diffusers / PEFT) for the U-Net and text encoder, each a path
        (scale 1) or a (path, scale) pair, stacked in order; applied as forward hooks, or with `lora_merge`
        merged into the weights (no cost per step). Keys matching no layer are an error, or with
        `lora_allow_partial` a warning with their count. A missing file or one holding no LoRA is a
        one-line error before any weights load; a LoRA that does not fit the model, before any step.

        dtype: what the U-Net and ControlNets run in, "fp32", "bf16" or "fp16" (or the torch dtype), cast
        once at load; "auto" is the device's default (`ldm.precision.AUTO_DTYPE`). The sampler's state,
        the text encoder and the autoencoder stay float32 (`ldm.precision`). vae_tiling: decode images
        larger than `autoencoder.tiling.VAE_TILE` (512) pixels in overlapping tiles of that size, so the
        decoder's memory follows the tile; the pixels differ near the tiles' edges."""
        return cls(ModelFiles.read(checkpoint, config, ema=ema, controlnets=controlnets, device=device, loras=loras,
                                   lora_allow_partial=lora_allow_partial, lora_merge=lora_merge, dtype=dtype,
                                   vae_tiling=vae_tiling))

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str = "", *, sampler: str = DEFAULT_SAMPLER,
                 steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE, guidance_rescale: float = 0.0,
                 eta: float = 0.0, spacing: str | None = None, seed: int = 0, num_images: int = 1,
                 batch_size: int | None = None, size: int | None = None, height: int | None = None,
                 width: int | None = None, init_image=None, strength: float | None = None, mask=None,
                 repaint_resamples: int = 1, repaint_jump: int = 10, control_image=None,
                 control: str | Sequence[str] | None = None, control_scale: float | Sequence[float] | None = None,
                 guess_mode: bool = False, canny_low: int | None = None, canny_high: int | None = None,
                 callback: StepCallback | None = None) -> list[Image.Image]:
        """Draw `num_images` images per prompt; image k of a prompt uses seed + k, whatever `batch_size`.

        prompt: one or a list (images come prompt by prompt). Settings as generate.py's flags: sampler
        (`ldm.samplers.SAMPLERS`), steps, guidance (classifier-free scale, --cfg), guidance_rescale, eta
        (ddim), spacing (default per sampler), size or height and width in pixels. init_image (path or PIL
        image) with strength: img2img; with mask (white = repaint): inpainting, repaint_resamples > 1
        adding RePaint's resampling every repaint_jump steps. control_image: one per ControlNet given to
        `from_file` (a path or PIL image, or a list), control: "canny" (its edges, canny_low / canny_high
        thresholds) or "none" / "map" (as it is), control_scale: the residuals' weight, each given once for
        all nets or as a list, guess_mode. callback(step, total): after every sampler step, step counting
        0 .. total - 1 over the whole call.

        Returns PIL RGB images [H, W]; each `.info` holds the PNG text chunks generate.py writes (save them
        with `ldm.png_metadata.save_image`). A bad input is a one-line ValueError / FileNotFoundError /
        TypeError raised before anything is drawn."""
        request = Request(
            (prompt,) if isinstance(prompt, str) else tuple(prompt), negative_prompt, sampler, steps, guidance,
            guidance_rescale, eta, spacing, seed, num_images, batch_size, size, height, width, init_image, strength,
            mask, repaint_resamples, repaint_jump, _as_tuple(control_image), _as_tuple(control),
            _as_tuple(control_scale), guess_mode, canny_low, canny_high)
        if not request.prompts:
            raise ValueError("no prompts given")
        plan = self.files.plan(request)
        return [image for drawn in self.draw(plan, callback) for image in drawn.images]

    def controls(self, hints: Sequence[torch.Tensor], scales: Sequence[float], guess_mode: bool) -> list[Control]:
        """The ControlNets as `Control`s on conditions [1, 3, H, W] (averaged to one channel for a net that
        takes one), one per net, with their weights."""
        controls = []
        for (path, loaded), hint, scale in zip(self.controlnets, hints, scales):
            if loaded.net.hint_channels == 1:
                hint = hint.mean(dim=1, keepdim=True)
            elif loaded.net.hint_channels != hint.shape[1]:
                raise ValueError(f"{path} takes {loaded.net.hint_channels}-channel conditions; control images give "
                                 "3 channels")
            controls.append(loaded.control(hint, scale=scale, guess_mode=guess_mode))
        return controls

    def settings(self, plan: Plan) -> dict:
        """What every image of `plan` records besides its prompt and seed: the resolved sampling options,
        the model and the inputs (generate.py's grid records these too)."""
        request, options = plan.request, plan.options
        settings = {**options.metadata(), "checkpoint": Path(self.files.checkpoint).name,
                    "checkpoint_sha256": self.checkpoint_sha[:12], "dtype": self.files.dtype}
        run = options.steps_run(NoiseLevels(self.model.diffusion.schedule))
        if run != options.steps:  # LDM's "uniform" spacing may run more steps than asked
            settings["steps_run"] = run
        if request.init_image is not None:
            settings.update(init_image=image_name(request.init_image), strength=options.strength)
        if request.mask is not None:
            settings.update(mask=image_name(request.mask), repaint_resamples=options.repaint_resamples,
                            repaint_jump=options.repaint_jump)
        if self.controlnets:
            settings.update(controlnets=[Path(p).name for p in self.files.controlnets],
                            controlnet_sha256=[sha[:12] for sha in self.controlnet_shas],
                            control=plan.kinds, control_images=[image_name(i) for i in request.control_images],
                            control_scales=plan.scales, guess_mode=request.guess_mode)
            if "canny" in plan.kinds:
                settings.update(zip(("canny_low", "canny_high"), request.canny_thresholds))
        settings.update(lora_record(self.loras, self.files.lora_merge))
        if self.files.vae_tiling:  # only when on, so that other records stay as they were
            settings["vae_tiling"] = True
        return settings

    def draw(self, plan: Plan, callback: StepCallback | None = None,
             names: Mapping[str, str] = API_NAMES) -> Iterator[Drawn]:
        """Run `plan` batch by batch, yielding each as it is drawn (so a caller can keep the batches drawn
        before a failure). Running out of memory, or images that came out NaN or infinite, is a one-line
        `RunFailed`, and that batch is not yielded."""
        controls = self.controls(plan.hints, plan.scales, plan.request.guess_mode)
        settings = self.settings(plan)
        step_callback = None
        if callback is not None:
            done = iter(range(plan.total_steps))
            step_callback = lambda i, x, x0: callback(next(done), plan.total_steps)  # noqa: E731
        for line, prompt in enumerate(plan.request.prompts):
            for first, pixels in self._batches(plan, prompt, controls, step_callback, names):
                seeds = [plan.options.seed + first + k for k in range(len(pixels))]
                images = []
                for seed, array in zip(seeds, pixels):
                    image = Image.fromarray(array)
                    image.info.update(png_text({"prompt": prompt, "seed": seed, **settings}))
                    images.append(image)
                yield Drawn(line, seeds, images)

    def _batches(self, plan: Plan, prompt: str, controls: list[Control], step_callback,
                 names: Mapping[str, str]) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first image, uint8 images [B, H, W, 3]) batch by batch for one prompt."""
        options, batch_size, count_all = plan.options, plan.batch_size, plan.request.num_images
        for first in range(0, count_all, batch_size):
            count = min(batch_size, count_all - first)
            try:
                # generate_latents validates everything before sampling: errors arrive before any image.
                latents = generate_latents(self.model, [prompt] * count, options, seed=options.seed + first,
                                           init_image=plan.init_image, mask=plan.mask, control=controls,
                                           callback=step_callback)
                self._before_decoding()
                images = self.model.decode_latents(latents, VAE_TILE if self.files.vae_tiling else None)
            except RuntimeError as e:
                if not out_of_memory(e):
                    raise
                raise RunFailed(f"out of memory drawing {count} images of {options.size} pixels: lower "
                                f"{name_of(names, 'batch_size')} (now {batch_size}) or {name_of(names, 'size')}") from None
            if not torch.isfinite(images).all():
                raise RunFailed(f"the images of seeds {options.seed + first}..{options.seed + first + count - 1} "
                                "came out NaN or infinite; they were not written")
            yield first, to_uint8(images)

    def _before_decoding(self) -> None:
        """Let go of what sampling keeps and decoding does not use, so that the two do not add up at the
        decode's peak: the U-Net's upsampling phase weights (`layers.drop_phase_caches`, 0.22 GiB for SD 1.x
        in float32; computed again at the next batch's first step). The images are the same bytes. (The
        free heap sampling leaves, 0.37 GiB, is handed back too: `common.allocator.trim_heap`; once per batch, as
        trimming before every decoder stage made the tiny model's decode 2.9x slower.)"""
        drop_phase_caches(self.model.unet)
        if self.files.device == "cpu":
            trim_heap()


def _as_tuple(value) -> tuple:
    """A keyword given once or as a list, as a tuple (None: empty)."""
    if value is None:
        return ()
    if isinstance(value, (str, os.PathLike, Image.Image, int, float)):
        return (value,)
    return tuple(value)


def out_of_memory(e: RuntimeError) -> bool:
    """torch's CUDA OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)
