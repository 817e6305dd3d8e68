"""Generate images with a trained latent diffusion model: text-to-image, img2img and inpainting.

    python generate.py "a red apple" --checkpoint runs/ldm/model.safetensors --n 4
    python generate.py "a red apple" --checkpoint model.safetensors --init-image in.png --strength 0.6
    python generate.py "a red apple" --checkpoint model.safetensors --init-image in.png --mask mask.png
    python generate.py "a red apple" --checkpoint model.safetensors --controlnet controlnet.safetensors \
        --control canny --control-image photo.png [--control-scale 1.0]   # repeat the three for more ControlNets

Writes one PNG per image, with every generation parameter in its PNG text chunks, and grid.png
(one row per prompt). The same command gives byte-identical files; image k of a prompt uses seed
--seed + k whatever the batch size. Bad input is one line on stderr and exit code 2, found before any
model is loaded or anything is written: every number is checked against its range, the model files
against what they hold (from their metadata, or the key prefixes of original files) and the image size
against the model's configs. A run that fails later (out of memory, NaN images, a failed write) is one
line and exit code 1, and each PNG is written whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from autoencoder import AutoencoderConfig
from conditioning.edges import canny_hint
from ldm.controlnet import ENCODER_PARTS, Control, load_controlnet
from ldm.denoiser import SIGMA_SPACINGS, NoiseLevels
from ldm.diffusion import Diffusion
from ldm.generation import SAMPLERS, SizeLimits, generate_latents, read_prompt_lines
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.original_format import load_model, model_file_kind, read_model_configs
from ldm.sampling_options import MAX_SEED, OptionError, SamplingOptions
from common.cli import ArgumentParser, RunFailed, check_output_folder, run
from common.weights import atomic_write, file_sha256, load_state_dict_strict


CONTROL_KINDS = ("canny", "none", "map")
# The flag of each sampling setting, so that an error about a setting names what the user typed.
FLAGS = {"sampler": "--sampler", "steps": "--steps", "guidance": "--cfg", "guidance_rescale": "--guidance-rescale",
         "eta": "--eta", "spacing": "--spacing", "seed": "--seed", "height": "--size", "width": "--size",
         "negative": "--negative", "strength": "--strength", "repaint_jump": "--repaint-jump",
         "repaint_resamples": "--repaint-resamples"}
# ControlNet's canny annotator offers thresholds 1..255 and its canny model was trained in that range
# (cv2.Canny itself takes L1 gradients up to 8 x 255).
CANNY_RANGE = (0, 255)
CANNY_DEFAULTS = (100, 200)
# ControlNet front ends offer weights up to 2; far above, the residuals swamp the U-Net (and overflow).
MAX_CONTROL_SCALE = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    parser.add_argument("--checkpoint", required=True,
                        help="model file written by train_stage2.py, or an original SD/LDM .ckpt/.safetensors")
    parser.add_argument("--config", help="original inference YAML of an original checkpoint (e.g. "
                        "configs/sd/v1-inference.yaml); default: the .yaml beside the checkpoint")
    parser.add_argument("--ema", action="store_true", help="original checkpoints: use the model_ema.* U-Net weights")
    parser.add_argument("--prompts-file", help="text file with one prompt per line")
    parser.add_argument("--negative", default="", help="negative prompt, used in place of the empty prompt")
    parser.add_argument("--sampler", default="dpmpp-2m", help=f"one of {', '.join(SAMPLERS)} (default dpmpp-2m)")
    parser.add_argument("--steps", type=int, default=25,
                        help="sampling steps (ddim/plms with LDM's uniform spacing run one more when the "
                             "step count does not divide the schedule's 1000; the PNG records both)")
    parser.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (1 = none)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="phi of guidance rescale (0.7 in the paper), applied to the v prediction as in the "
                             "paper (Lin et al. 2024); diffusers rescales an eps or x0 model's raw output instead")
    parser.add_argument("--spacing", choices=SIGMA_SPACINGS,
                        help="noise-level spacing (default per sampler; trailing for zero-terminal-SNR models)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity (ddim only)")
    parser.add_argument("--seed", type=int, default=0, help="0 .. 2**64 - 1; image k uses --seed + k")
    parser.add_argument("--n", type=int, default=1, help="images per prompt")
    parser.add_argument("--batch-size", type=int, default=None, help="images per model batch (default --n)")
    parser.add_argument("--size", type=int, default=None,
                        help="image side in pixels, a multiple of the model's downsampling up to 8x its training "
                             "size (default: the init image's size, else the training size)")
    parser.add_argument("--init-image", help="image to start from (img2img) or to inpaint")
    parser.add_argument("--strength", type=float, default=None,
                        help="share of the schedule run on the init image (default 0.6; 1.0 with --mask)")
    parser.add_argument("--mask", help="inpainting mask, same size as --init-image: white = repaint, black = keep")
    parser.add_argument("--repaint-resamples", type=int, default=1, help="RePaint resampling passes (ddpm/ddim)")
    parser.add_argument("--repaint-jump", type=int, default=10, help="RePaint jump length in steps")
    parser.add_argument("--controlnet", action="append", default=[],
                        help="ControlNet file (train_controlnet.py output or original ControlNet weights); repeatable")
    parser.add_argument("--control-image", action="append", default=[],
                        help="condition image of each --controlnet (a photo with --control canny, else a ready map)")
    parser.add_argument("--control", action="append", default=[], choices=CONTROL_KINDS,
                        help="how to turn each --control-image into the condition: 'canny' runs the edge detector "
                             "on it, 'none' / 'map' use it as it is (default); give once for all or once per image")
    parser.add_argument("--control-scale", action="append", default=[], type=float,
                        help="weight of each ControlNet's residuals (default 1.0); once for all or once per net")
    parser.add_argument("--guess-mode", action="store_true",
                        help="ControlNet guess mode: control only the conditional prediction, residuals decaying "
                             "0.825^(12-i) from deep to shallow (works with an empty prompt)")
    parser.add_argument("--canny-low", type=int, help=f"low hysteresis threshold of --control canny, "
                        f"{CANNY_RANGE[0]}..{CANNY_RANGE[1]} (default {CANNY_DEFAULTS[0]})")
    parser.add_argument("--canny-high", type=int, help=f"high hysteresis threshold of --control canny, "
                        f"{CANNY_RANGE[0]}..{CANNY_RANGE[1]} (default {CANNY_DEFAULTS[1]})")
    parser.add_argument("--out", default="outputs", help="output directory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    if (args.prompt is None) == (args.prompts_file is None):
        raise ValueError("give either a prompt or --prompts-file (exactly one of them)")
    if args.prompt is not None:
        return [args.prompt]
    return read_prompt_lines(args.prompts_file)


def load_image(path: str, mode: str) -> torch.Tensor:
    """An image file as [1, C, H, W]: RGB in [-1, 1] (mode "RGB") or a mask in [0, 1] (mode "L")."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{'mask' if mode == 'L' else 'init image'} not found: {path}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert(mode), dtype=np.float32) / 255.0
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    tensor = torch.from_numpy(array.reshape(*array.shape[:2], -1)).permute(2, 0, 1)[None]
    return tensor * 2 - 1 if mode == "RGB" else tensor


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images [B, 3, H, W] in about [-1, 1] -> [B, H, W, 3] uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_png(array: np.ndarray, path: Path, text: dict[str, str]) -> None:
    """Write a PNG whole or not at all (a failed write leaves what was there); a refused write or a full
    disk is a one-line RunFailed naming the folder."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    try:
        atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", pnginfo=info))
    except OSError as e:
        raise RunFailed(f"--out {path.parent}: cannot write {path.name} ({e.strerror or e})") from None


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Images [H, W, 3] arranged one list per row (short rows padded black) -> [rows H, cols W, 3]."""
    columns = max(len(r) for r in rows)
    blank = np.zeros_like(rows[0][0])
    return np.concatenate([np.concatenate(r + [blank] * (columns - len(r)), axis=1) for r in rows], axis=0)


def per_control(values: list, count: int, default) -> list:
    """A flag given once applies to every ControlNet; not at all, the default does."""
    if len(values) == 1:
        return values * count
    return list(values) or [default] * count


def load_condition(path: str, kind: str, thresholds: tuple[int, int]) -> torch.Tensor:
    """A control image as a condition [1, 3, H, W] in [0, 1]: its Canny edges (kind "canny") or itself."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"control image not found: {path}")
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except OSError as e:
        raise ValueError(f"cannot read control image {path}: {e}") from None
    if kind == "canny":
        return canny_hint(rgb, *thresholds)[None]
    return torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def canny_thresholds(args: argparse.Namespace) -> tuple[int, int]:
    """(low, high) of --canny-low / --canny-high, or their defaults."""
    low, high = args.canny_low, args.canny_high
    return (CANNY_DEFAULTS[0] if low is None else low), (CANNY_DEFAULTS[1] if high is None else high)


def load_controls(args: argparse.Namespace, model: LatentDiffusion, hints: list[torch.Tensor],
                  scales: list[float], checkpoint_sha: str) -> list[Control]:
    """The --controlnet files as Controls; a file trained with an unlocked U-Net also sets its output blocks.
    `checkpoint_sha`: the --checkpoint file's sha256, to warn about a ControlNet trained on another model."""
    controls, decoder_from = [], None
    for path, hint, scale in zip(args.controlnet, hints, scales):
        loaded = load_controlnet(path, unet=model.unet, latent_factor=model.latent_factor, device=args.device)
        trained_on = loaded.metadata.get("stage2_sha256")
        if trained_on and trained_on != checkpoint_sha:
            print(f"warning: {path} was trained on another stage-2 model than {args.checkpoint}", file=sys.stderr)
        if loaded.unet_decoder:
            if decoder_from is not None:
                raise ValueError(f"{decoder_from} and {path} both carry U-Net output blocks (trained with "
                                 "sd_locked: false); use at most one of them")
            decoder_from = path
            load_state_dict_strict(model.unet, loaded.unet_decoder, path, what=f"the U-Net of {args.checkpoint}",
                                   allow_missing=tuple(part + "." for part in ENCODER_PARTS),
                                   hint="its output blocks were trained on another stage-2 model")
        net = loaded.net
        if net.hint_channels == 1:
            hint = hint.mean(dim=1, keepdim=True)
        elif net.hint_channels != hint.shape[1]:
            raise ValueError(f"{path} takes {net.hint_channels}-channel conditions; control images give 3 channels")
        controls.append(loaded.control(hint, scale=scale, guess_mode=args.guess_mode))
    return controls


def check_args(args: argparse.Namespace) -> None:
    """What can be checked of the flags and files without the model (the sampling settings are checked
    by `sampling_options`, the model files by `check_model_files`)."""
    for flag, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--size", args.size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image (the image to inpaint)")
    if args.strength is not None and not args.init_image:
        raise ValueError("--strength applies to an --init-image")
    if args.repaint_resamples > 1 and not args.mask:
        raise ValueError("--repaint-resamples (RePaint) applies to inpainting, with --mask")
    if not Path(args.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device available")
    check_control_args(args)
    check_output_folder(args.out, "--out")


def check_control_args(args: argparse.Namespace) -> None:
    """The ControlNet flags: one image per net, the per-net flags given once or once per net, scales and
    Canny thresholds in range and only where they apply."""
    count = len(args.controlnet)
    if len(args.control_image) != count:
        raise ValueError(f"give one --control-image per --controlnet (got {len(args.control_image)} images for "
                         f"{count} ControlNets)")
    for flag, values in (("--control", args.control), ("--control-scale", args.control_scale)):
        if len(values) not in (0, 1, count) or (values and not count):
            raise ValueError(f"{flag} is given {len(values)} times for {count} ControlNets (give it once for all, "
                             "or once per --controlnet)")
    if args.guess_mode and not count:
        raise ValueError("--guess-mode needs a --controlnet")
    for scale in args.control_scale:
        if not (math.isfinite(scale) and 0 <= scale <= MAX_CONTROL_SCALE):
            raise ValueError(f"--control-scale must be a number in [0, {MAX_CONTROL_SCALE:g}], got {scale}")
    if (args.canny_low is not None or args.canny_high is not None) and "canny" not in args.control:
        raise ValueError("--canny-low / --canny-high apply to --control canny")
    low, high = canny_thresholds(args)
    for flag, value in (("--canny-low", low), ("--canny-high", high)):
        if not CANNY_RANGE[0] <= value <= CANNY_RANGE[1]:
            raise ValueError(f"{flag} must be in {CANNY_RANGE[0]}..{CANNY_RANGE[1]}, got {value}")
    if low > high:
        raise ValueError(f"--canny-low {low} is above --canny-high {high}")
    for path in args.controlnet:
        if not Path(path).is_file():
            raise FileNotFoundError(f"ControlNet file not found: {path}")


def check_model_files(args: argparse.Namespace) -> None:
    """--checkpoint must hold a whole model and each --controlnet a ControlNet: a file passed to the other
    flag, or an autoencoder, is named for what it is (read from its metadata or keys, not its weights)."""
    kind = model_file_kind(args.checkpoint)
    if not kind.model:
        remedy = ("pass it with --controlnet (and the model it controls as --checkpoint)" if kind.controlnet else
                  "generate needs a stage-2 model file (train_stage2.py's model.safetensors) or an original SD "
                  "checkpoint")
        raise ValueError(f"{args.checkpoint} is {kind.description}; {remedy}")
    for path in args.controlnet:
        kind = model_file_kind(path)
        if not kind.controlnet:
            takes = "--controlnet takes a ControlNet file (train_controlnet.py's controlnet.safetensors or original " \
                    "ControlNet weights)"
            remedy = f"pass it with --checkpoint ({takes})" if kind.model else takes
            raise ValueError(f"{path} is {kind.description}; {remedy}")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    """The sampling settings of the command line, validated (a bad one is a one-line error naming its flag).
    The size is --size here; `sized_options` sets it from the images or the model when that is not given."""
    try:
        options = SamplingOptions(sampler=args.sampler, steps=args.steps, guidance=args.cfg,
                                  guidance_rescale=args.guidance_rescale, eta=args.eta, spacing=args.spacing,
                                  seed=args.seed, height=args.size, width=args.size, negative=args.negative,
                                  strength=args.strength, repaint_jump=args.repaint_jump,
                                  repaint_resamples=args.repaint_resamples)
    except OptionError as e:
        raise e.for_flags(FLAGS) from None
    if args.seed + args.n - 1 > MAX_SEED:
        raise ValueError(f"--seed {args.seed} with --n {args.n}: the last image's seed would be past 2**64 - 1")
    return options


def sized_options(args: argparse.Namespace, options: SamplingOptions, cfg: LatentDiffusionConfig,
                  autoencoder_cfg: AutoencoderConfig, image_size: tuple[int, int] | None,
                  inpainting: bool) -> SamplingOptions:
    """The options with their output size (the images', else --size, else the training size) checked against
    the model's configs, and their steps against its schedule: all before the weights are loaded."""
    limits = SizeLimits.of(cfg, autoencoder_cfg)
    if image_size is not None:
        height, width = image_size
        source = f"init image {args.init_image}" if args.init_image else f"control image {args.control_image[0]}"
        limits.check_image(height, width, source)
    else:
        if args.size is not None:
            limits.check(args.size, "--size")
        height = width = args.size or limits.training_size
    schedule = Diffusion.from_config(cfg.diffusion).schedule
    try:
        return replace(options, height=height, width=width).resolve(schedule, inpainting=inpainting)
    except OptionError as e:
        raise e.for_flags(FLAGS) from None


def check_size(args: argparse.Namespace, what: str, image: torch.Tensor) -> tuple[int, int]:
    """(height, width) of an image [1, C, H, W] that sets the output size; --size, if given, must agree."""
    height, width = image.shape[2:]
    if args.size is not None and (args.size, args.size) != (height, width):
        raise ValueError(f"--size {args.size} differs from the {what}'s {width}x{height}; "
                         "leave it out or resize the image")
    return height, width


def read_images(args: argparse.Namespace, kinds: list[str]) -> tuple:
    """(init image, mask, condition images, output size or None): the size is set by the init image or,
    without one, by the condition images (pixel-aligned with the output)."""
    init_image = load_image(args.init_image, "RGB") if args.init_image else None
    mask = load_image(args.mask, "L") if args.mask else None
    size = None
    if init_image is not None:
        size = height, width = check_size(args, "init image", init_image)
        if mask is not None and mask.shape[2:] != init_image.shape[2:]:
            raise ValueError(f"mask is {mask.shape[3]}x{mask.shape[2]} but the init image is {width}x{height}")
    hints = [load_condition(path, kind, canny_thresholds(args)) for path, kind in zip(args.control_image, kinds)]
    if hints and init_image is None:
        size = check_size(args, "control image", hints[0])
    for path, hint in zip(args.control_image, hints):
        if hint.shape[2:] != size:
            raise ValueError(f"control image {path} is {hint.shape[3]}x{hint.shape[2]} but the output is "
                             f"{size[1]}x{size[0]}; resize it to the output size")
    return init_image, mask, hints, size


def image_settings(args: argparse.Namespace, options: SamplingOptions, model: LatentDiffusion, checkpoint_sha: str,
                   kinds: list[str], scales: list[float]) -> dict:
    """What every PNG records besides its prompt and seed: the (resolved) sampling options, the model
    and the inputs."""
    settings = {**options.metadata(), "checkpoint": Path(args.checkpoint).name,
                "checkpoint_sha256": checkpoint_sha[:12]}
    run = options.steps_run(NoiseLevels(model.diffusion.schedule))
    if run != options.steps:  # LDM's "uniform" spacing may run more steps than asked
        settings["steps_run"] = run
    if args.init_image:
        settings.update(init_image=Path(args.init_image).name, strength=options.strength)
    if args.mask:
        settings.update(mask=Path(args.mask).name, repaint_resamples=options.repaint_resamples,
                        repaint_jump=options.repaint_jump)
    if args.controlnet:
        settings.update(controlnets=[Path(p).name for p in args.controlnet],
                        controlnet_sha256=[file_sha256(p)[:12] for p in args.controlnet],
                        control=kinds, control_images=[Path(p).name for p in args.control_image],
                        control_scales=scales, guess_mode=args.guess_mode)
        if "canny" in kinds:
            settings.update(zip(("canny_low", "canny_high"), canny_thresholds(args)))
    return settings


def generate(args: argparse.Namespace) -> None:
    prompts = read_prompts(args)
    check_args(args)
    options = sampling_options(args)
    kinds = per_control(args.control, len(args.controlnet), "none")
    scales = per_control(args.control_scale, len(args.controlnet), 1.0)
    check_model_files(args)
    cfg, autoencoder_cfg = read_model_configs(args.checkpoint, args.config, use_ema=args.ema)
    init_image, mask, hints, size = read_images(args, kinds)
    options = sized_options(args, options, cfg, autoencoder_cfg, size, inpainting=mask is not None)

    model = load_model(args.checkpoint, args.config, use_ema=args.ema, device=args.device)
    checkpoint_sha = file_sha256(args.checkpoint)
    controls = load_controls(args, model, hints, scales, checkpoint_sha)
    settings = image_settings(args, options, model, checkpoint_sha, kinds, scales)
    out = Path(args.out)
    rows = []
    for p, prompt in enumerate(prompts):
        row = []
        for first, images in sample_prompt(args, model, prompt, options, init_image, mask, controls):
            for k, image in enumerate(images):
                seed = options.seed + first + k
                params = {"prompt": prompt, "seed": seed, **settings}
                text = {key: str(value) for key, value in params.items()}
                text["parameters"] = json.dumps(params, sort_keys=True)
                save_png(image, out / f"{p:03d}-seed{seed}.png", text)
                row.append(image)
        rows.append(row)
    save_png(grid(rows), out / "grid.png", {"prompts": json.dumps(prompts), **{k: str(v) for k, v in settings.items()}})
    print(f"wrote {len(prompts) * args.n} images and grid.png to {out}")


def sample_prompt(args: argparse.Namespace, model: LatentDiffusion, prompt: str, options: SamplingOptions,
                  init_image: torch.Tensor | None, mask: torch.Tensor | None, controls: list[Control]):
    """Yield (index of the first image, uint8 images [B, H, W, 3]) batch by batch for one prompt.

    Running out of memory, or images that came out NaN or infinite, is a one-line RunFailed: the
    batch's images are not written (the earlier batches' are)."""
    batch_size = args.batch_size or args.n
    for first in range(0, args.n, batch_size):
        count = min(batch_size, args.n - first)
        try:
            # generate_latents validates everything before sampling: errors arrive before any write.
            latents = generate_latents(model, [prompt] * count, options, seed=options.seed + first,
                                       init_image=init_image, mask=mask, progress=True, control=controls)
            images = model.decode_latents(latents)
        except RuntimeError as e:
            if not out_of_memory(e):
                raise
            raise RunFailed(f"out of memory drawing {count} images of {options.size} pixels: lower --batch-size "
                            f"(now {batch_size}) or --size") from None
        if not torch.isfinite(images).all():
            raise RunFailed(f"the images of seeds {options.seed + first}..{options.seed + first + count - 1} came "
                            "out NaN or infinite; they were not written")
        yield first, to_uint8(images)


def out_of_memory(e: RuntimeError) -> bool:
    """torch's CUDA OutOfMemoryError, or the CPU allocator's failure (a plain RuntimeError)."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)


def main(argv: list[str] | None = None) -> None:
    run(lambda: generate(parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
