"""Generate images with a trained latent diffusion model: text-to-image, img2img and inpainting.

    python generate.py "a red apple" --checkpoint runs/ldm/model.safetensors --n 4
    python generate.py "a red apple" --checkpoint model.safetensors --init-image in.png --strength 0.6
    python generate.py "a red apple" --checkpoint model.safetensors --init-image in.png --mask mask.png
    python generate.py "a red apple" --checkpoint model.safetensors --controlnet controlnet.safetensors \
        --control canny --control-image photo.png [--control-scale 1.0]   # repeat the three for more ControlNets
    python generate.py --from-png outputs/00003-a-red-apple-seed3.png --checkpoint model.safetensors [--steps 50]

Writes one PNG per image, named by a counter, the prompt and the seed (00000-a-red-apple-seed0.png; the
counter goes on from the highest number already in --out, as A1111 does), and a grid of them, one row
per prompt (grid-00000-a-red-apple.png): a run never replaces a file. --overwrite writes the fixed
names 000-seed0.png (prompt line, seed) and grid.png instead, replacing an earlier run's.

Each PNG holds its generation parameters in an A1111-style `parameters` text chunk (prompt, then
"Negative prompt: ...", then "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 3, ..."),
which A1111's PNG Info and civitai-style readers show, and all of them as JSON in an `ldm-generation`
chunk. --from-png reads either back (ours exactly, A1111's as far as its fields go); flags given
besides override what it read.

The same command gives byte-identical files; image k of a prompt uses seed --seed + k whatever the batch
size. Bad input is one line on stderr and exit code 2, found before any model is loaded or anything is
written: every number is checked against its range, the model files against what they hold (from their
metadata, or the key prefixes of original files) and the image size against the model's configs. A run
that fails later (out of memory, NaN images, a failed write) is one line and exit code 1, and each PNG
is written whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field, replace
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
from ldm.samplers import get_sampler
from ldm.sampling_options import MAX_SEED, OptionError, SamplingOptions
from common.cli import ArgumentParser, RunFailed, check_output_folder, run
from common.weights import atomic_write, file_sha256, load_state_dict_strict


# The documented defaults (README: DPM-Solver++ 2M, 25 steps, guidance 3); `python -m ldm.evaluate` uses
# the same (tests/test_evaluate.py checks), so an evaluation scores what generate.py draws.
DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE = "dpmpp-2m", 25, 3.0
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


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", help="the text prompt (or use --prompts-file)")
    parser.add_argument("--checkpoint", required=True,
                        help="model file written by train_stage2.py, or an original SD/LDM .ckpt/.safetensors")
    parser.add_argument("--config", help="original inference YAML of an original checkpoint (e.g. "
                        "configs/sd/v1-inference.yaml); default: the .yaml beside the checkpoint")
    parser.add_argument("--ema", action="store_true", help="original checkpoints: use the model_ema.* U-Net weights")
    parser.add_argument("--prompts-file", help="text file with one prompt per line")
    parser.add_argument("--from-png", metavar="FILE",
                        help="take the prompt and settings from a PNG's parameters (this script's, or A1111's "
                             "text); flags given override them")
    parser.add_argument("--negative", default="", help="negative prompt, used in place of the empty prompt")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER,
                        help=f"one of {', '.join(SAMPLERS)} (default {DEFAULT_SAMPLER})")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help=f"sampling steps (default {DEFAULT_STEPS}; ddim/plms with LDM's uniform spacing run one "
                             "more when the step count does not divide the schedule's 1000; the PNG records both)")
    parser.add_argument("--cfg", type=float, default=DEFAULT_GUIDANCE,
                        help=f"classifier-free guidance scale (1 = none; default {DEFAULT_GUIDANCE:g})")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="write the fixed names NNN-seedS.png (NNN: the prompt's line) and grid.png, replacing "
                             "an earlier run's files (default: new numbered names; nothing is replaced)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.set_defaults(from_record=None)  # what --from-png read (`parse_args`)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; with --from-png, the PNG's settings stand in for every flag not given.

    The PNG's scalar settings become the parser's defaults (so a flag given, even at its usual default,
    wins); its repeatable ControlNet flags, and the strength, apply only where the command line left
    them out. `args.from_record` keeps what was read (None without --from-png)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.from_png:
        record = read_png_record(args.from_png)
        defaults = flag_defaults(record)
        if args.prompts_file:
            defaults.pop("prompt", None)  # the file's prompts replace the PNG's
        parser.set_defaults(**defaults)
        args = parser.parse_args(argv)
        args.from_record = record
        apply_record_lists(args, record)
        check_record_inputs(args, record)
    return args


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


def save_png(array: np.ndarray, path: Path, text: dict[str, str], replace: bool = False) -> None:
    """Write an image [H, W, 3] uint8 with these text chunks as a PNG, whole or not at all (a failed write
    leaves what was there). A file already at `path` is replaced only with `replace`: names are planned
    free (`OutputNames`), so one there now was written meanwhile, e.g. by another run into the same
    folder. A refused write, a full disk or such a file is a one-line RunFailed naming the folder."""
    if not replace and path.exists():
        raise RunFailed(f"--out {path.parent}: {path.name} appeared during this run (another run writing into "
                        "the same folder?); not replaced")
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


# -- output file names -------------------------------------------------------------------------------

SLUG_LENGTH = 40  # characters of the prompt in a file name; whole words only


def prompt_slug(prompt: str) -> str:
    """A prompt as a short file-name part: its words (letters and digits) lower-cased and joined by '-',
    as many whole words as fit in SLUG_LENGTH ("A cat, on a MAT!" -> "a-cat-on-a-mat"); "no-prompt" if
    it has none."""
    words = re.findall(r"[^\W_]+", prompt.lower())
    if not words:
        return "no-prompt"
    slug = words[0][:SLUG_LENGTH]
    for word in words[1:]:
        if len(slug) + 1 + len(word) > SLUG_LENGTH:
            break
        slug += "-" + word
    return slug


def next_number(folder: Path, prefix: str = "") -> int:
    """One more than the highest number N of the files `<prefix>N-...` in `folder` (0 if none): A1111's
    counter, which goes on from what is there, so a later run never takes an earlier run's name."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)-")
    numbers = [int(m.group(1)) for p in folder.glob(f"{prefix}*") if (m := pattern.match(p.name))]
    return max(numbers, default=-1) + 1


@dataclass
class OutputNames:
    """The file names of one run in `folder`: numbered from `first_image` (`first_grid` for the grid) with
    the prompt's slug and the seed, or with `fixed` (--overwrite) the names of the prompt's line and the
    seed, and grid.png."""

    folder: Path
    fixed: bool
    first_image: int = 0
    first_grid: int = 0
    written: int = field(default=0, init=False)

    @classmethod
    def plan(cls, folder: Path, fixed: bool) -> OutputNames:
        """Names for a run in `folder`, numbered after the files already there."""
        if fixed or not folder.is_dir():
            return cls(folder, fixed)
        return cls(folder, fixed, next_number(folder), next_number(folder, "grid-"))

    def image(self, line: int, prompt: str, seed: int) -> Path:
        """The next image's path: image of prompt number `line` (0-based) drawn with `seed`."""
        if self.fixed:
            return self.folder / f"{line:03d}-seed{seed}.png"
        self.written += 1
        return self.folder / f"{self.first_image + self.written - 1:05d}-{prompt_slug(prompt)}-seed{seed}.png"

    def grid(self, prompts: list[str]) -> Path:
        """The grid's path; numbered grids carry the first prompt's slug."""
        if self.fixed:
            return self.folder / "grid.png"
        return self.folder / f"grid-{self.first_grid:05d}-{prompt_slug(prompts[0])}.png"


def plural(count: int, noun: str) -> str:
    """"1 image", "2 images"."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


# -- PNG parameters: A1111's text and our JSON ---------------------------------------------------------

PARAMETERS_KEY = "parameters"  # A1111's text chunk, read by its PNG Info tab, ComfyUI and civitai
RECORD_KEY = "ldm-generation"  # our JSON record, every setting (`image_settings`) with prompt and seed
# Our sampler names in A1111's words (A1111 1.9+ names the schedule apart, in "Schedule type"); ddpm has
# no counterpart there and keeps its name.
A1111_SAMPLERS = {"dpmpp-2m": "DPM++ 2M", "euler": "Euler", "heun": "Heun", "ddim": "DDIM", "plms": "PLMS"}
# Karras: EDM's rho = 7 spacing between the schedule's smallest and largest sigma, here as in A1111. Our
# other spacings have no exact counterpart there and keep their names.
A1111_SCHEDULES = {"karras": "Karras"}
# A1111's own pattern for "key: value" pairs of the last line (modules/infotext_utils.py, re_param).
A1111_PAIR = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
# Fields read back into flags (A1111 name -> (our record's field, type)).
A1111_NUMBERS = {"Steps": ("steps", int), "CFG scale": ("guidance", float), "Seed": ("seed", int),
                 "Denoising strength": ("strength", float), "Eta DDIM": ("eta", float),
                 "Guidance rescale": ("guidance_rescale", float)}
A1111_NOT_SETTINGS = ("Model", "Version")  # describe the run without changing the image


def png_text(record: dict) -> dict[str, str]:
    """The text chunks of an image with this record: A1111's `parameters` and our JSON.

    No chunk is named "prompt" or "workflow": ComfyUI reads those as its own JSON graph (and fails)
    before it looks at `parameters`."""
    return {PARAMETERS_KEY: a1111_parameters(record), RECORD_KEY: json.dumps(record, sort_keys=True)}


def a1111_number(value: float) -> str:
    """A number as A1111 writes it (7, 7.5): integers without a fraction, others exactly (repr)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def a1111_quote(value) -> str:
    """A1111's `quote`: a value holding ',', ':' or a newline becomes a JSON string."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def a1111_schedule(record: dict) -> str | None:
    """The "Schedule type" of a record: always for the sigma samplers (A1111's k-diffusion ones, whose
    schedule it names; its default for Euler and Heun is not Karras), for the timestep samplers only when
    not their default (for DDIM / PLMS LDM's uniform timesteps, which A1111's DDIM / PLMS use too)."""
    spec, spacing = get_sampler(record["sampler"]), record["spacing"]
    if spec.space == "sigma" or spacing != spec.default_spacing:
        return A1111_SCHEDULES.get(spacing, spacing)
    return None


def a1111_parameters(record: dict) -> str:
    """A1111's infotext (modules/processing.py, create_infotext) of an image record: the prompt, then
    "Negative prompt: ..." if there is one, then "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras,
    CFG scale: 3, Seed: 0, Size: 64x64, Model hash: <sha256[:10]>, Model: <file stem>" and, where they
    apply, Denoising strength, Eta DDIM and Guidance rescale. Inpainting and ControlNet settings are in
    the JSON record only."""
    strength = record.get("strength") if record.get("init_image") else None
    fields = {"Steps": record["steps"], "Sampler": A1111_SAMPLERS.get(record["sampler"], record["sampler"]),
              "Schedule type": a1111_schedule(record), "CFG scale": a1111_number(record["guidance"]),
              "Seed": record["seed"], "Size": record["size"], "Model hash": record["checkpoint_sha256"][:10],
              "Model": Path(record["checkpoint"]).stem,
              "Denoising strength": None if strength is None else a1111_number(strength),
              "Eta DDIM": a1111_number(record["eta"]) if record["eta"] else None,
              "Guidance rescale": a1111_number(record["guidance_rescale"]) if record["guidance_rescale"] else None}
    pairs = ", ".join(f"{key}: {a1111_quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {record['negative']}" if record["negative"] else ""
    return f"{record['prompt']}{negative}\n{pairs}".strip()


def parse_a1111_parameters(text: str) -> dict[str, str]:
    """A1111's infotext as {"Prompt": ..., "Negative prompt": ..., key: value} (A1111's
    parse_generation_parameters without its UI defaults): the last line holds the pairs if it has at
    least three, the lines before are the prompt up to a line starting "Negative prompt:"."""
    *lines, last = text.strip().split("\n")
    if len(A1111_PAIR.findall(last)) < 3:
        lines, last = [*lines, last], ""
    prompt, negative, in_negative = [], [], False
    for line in (line.strip() for line in lines):
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_PAIR.findall(last):
        fields[key] = a1111_unquote(value.strip())
    return fields


def a1111_unquote(value: str) -> str:
    """A1111's `unquote`: a JSON string back to its text; anything else as it is."""
    if len(value) > 1 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


@dataclass
class PngRecord:
    """Generation settings read from a PNG (`read_png_record`).

    fields: in our JSON record's names (prompt, negative, sampler, steps, guidance, seed, size, ...).
    model_hash: the sha256 prefix of the model file it names, if any (12 hex digits ours, 10 A1111's).
    unused: A1111 fields that have no counterpart here (e.g. "Clip skip: 2"), so are not reproduced."""

    path: str
    fields: dict
    model_hash: str | None = None
    unused: list[str] = field(default_factory=list)


def read_png_record(path: str) -> PngRecord:
    """The settings a PNG holds: our `ldm-generation` JSON, else its `parameters` (our JSON in PNGs of
    earlier versions, else A1111's text). A missing file or one without either is a one-line error."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--from-png: file not found: {path}")
    try:
        with Image.open(path) as image:
            text = dict(getattr(image, "text", None) or {})
    except OSError as e:
        raise ValueError(f"--from-png: cannot read image {path}: {e}") from None
    if RECORD_KEY in text:
        return json_record(path, text[RECORD_KEY])
    parameters = text.get(PARAMETERS_KEY)
    if parameters is None:
        raise ValueError(f"--from-png {path} holds no generation parameters (no '{RECORD_KEY}' or "
                         f"'{PARAMETERS_KEY}' text chunk)")
    if parameters.lstrip().startswith("{"):
        return json_record(path, parameters)
    return a1111_record(path, parameters)


def json_record(path: str, text: str) -> PngRecord:
    """Our JSON record (its fields as they are; the model named by its sha256 prefix)."""
    try:
        fields = json.loads(text)
    except ValueError as e:
        raise ValueError(f"--from-png {path}: its generation record is not JSON ({e})") from None
    return PngRecord(path, fields, fields.get("checkpoint_sha256"))


def a1111_record(path: str, text: str) -> PngRecord:
    """A1111's infotext in our record's names. Its sampler names map back to ours (also those of A1111
    before 1.9, which named the schedule in the sampler: "DPM++ 2M Karras"); an unknown one is kept, and
    the sampler check names it."""
    values = parse_a1111_parameters(text)
    fields = {"prompt": values.pop("Prompt"), "negative": values.pop("Negative prompt")}
    record = PngRecord(path, fields, values.pop("Model hash", None))
    sampler, schedule = values.pop("Sampler", None), values.pop("Schedule type", None)
    if sampler and sampler.endswith(" Karras") and sampler not in A1111_SAMPLERS.values():
        sampler, schedule = sampler[:-len(" Karras")], schedule or "Karras"
    if sampler:
        fields["sampler"] = {name: ours for ours, name in A1111_SAMPLERS.items()}.get(sampler, sampler)
    spacing = {name: ours for ours, name in A1111_SCHEDULES.items()}.get(schedule, schedule)
    if spacing in SIGMA_SPACINGS:
        fields["spacing"] = spacing
    elif schedule not in (None, "Automatic"):
        record.unused.append(f"Schedule type: {schedule}")
    for name, (key, kind) in A1111_NUMBERS.items():
        if name in values:
            fields[key] = a1111_value(path, name, values.pop(name), kind)
    if "Size" in values:
        fields["size"] = values.pop("Size")
    record.unused += [f"{key}: {value}" for key, value in values.items() if key not in A1111_NOT_SETTINGS]
    return record


def a1111_value(path: str, name: str, value: str, kind: type) -> int | float:
    """An A1111 field's text as `kind` (int or float); not a number is a one-line error naming the file."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"--from-png {path}: {name} {value!r} is not a number") from None


# Record fields that set a flag as they are (field -> argparse dest).
RECORD_FLAGS = {"prompt": "prompt", "negative": "negative", "sampler": "sampler", "steps": "steps",
                "guidance": "cfg", "guidance_rescale": "guidance_rescale", "eta": "eta", "seed": "seed",
                "repaint_jump": "repaint_jump", "repaint_resamples": "repaint_resamples",
                "guess_mode": "guess_mode", "canny_low": "canny_low", "canny_high": "canny_high"}


def flag_defaults(record: PngRecord) -> dict:
    """The flag values (argparse dests) a record sets. Its spacing only when not the sampler's default,
    so that --sampler given alone gets its own default; its size only when no init or control image
    (which set the size) was used, and only square (as --size draws)."""
    fields = record.fields
    values = {dest: fields[key] for key, dest in RECORD_FLAGS.items() if fields.get(key) is not None}
    spacing, sampler = fields.get("spacing"), fields.get("sampler")
    if spacing and not (sampler in SAMPLERS and spacing == get_sampler(sampler).default_spacing):
        values["spacing"] = spacing
    size = A1111_SIZE.match(str(fields.get("size", "")))
    if size and not fields.get("init_image") and not fields.get("control_images"):
        if size.group(1) == size.group(2):
            values["size"] = int(size.group(1))
        else:
            record.unused.append(f"Size: {fields['size']} (not square)")
    return values


def apply_record_lists(args: argparse.Namespace, record: PngRecord) -> None:
    """The record's settings that cannot be argparse defaults: the repeatable ControlNet flags (a given
    flag would add to a default list) and the strength (it applies only with an --init-image)."""
    fields = record.fields
    if args.controlnet and not args.control and fields.get("control"):
        args.control = list(fields["control"])
    if args.controlnet and not args.control_scale and fields.get("control_scales"):
        args.control_scale = list(fields["control_scales"])
    if args.init_image and args.strength is None and fields.get("strength") is not None:
        args.strength = fields["strength"]


def check_record_inputs(args: argparse.Namespace, record: PngRecord) -> None:
    """The record's input images and ControlNets must be given again (it holds their names only); what it
    cannot reproduce is a note on stderr."""
    fields, source = record.fields, f"--from-png {record.path} was drawn"
    if fields.get("init_image") and not args.init_image:
        raise ValueError(f"{source} from the init image {fields['init_image']}: give it with --init-image")
    if fields.get("mask") and not args.mask:
        raise ValueError(f"{source} with the mask {fields['mask']}: give it with --mask")
    if fields.get("controlnets") and not args.controlnet:
        raise ValueError(f"{source} with the ControlNets {', '.join(fields['controlnets'])} on "
                         f"{', '.join(fields.get('control_images', []))}: give them with --controlnet and "
                         "--control-image")
    if record.unused:
        print(f"note: {record.path}: not reproduced (no counterpart here): {'; '.join(record.unused)}",
              file=sys.stderr)


def warn_if_other_model(record: PngRecord | None, checkpoint: str, checkpoint_sha: str) -> None:
    """A PNG drawn with another model file cannot be reproduced with this one: say so (and go on)."""
    if record and record.model_hash and not checkpoint_sha.startswith(record.model_hash.lower()):
        print(f"warning: {record.path} was drawn with another model (sha256 {record.model_hash}...) than "
              f"{checkpoint}; the images will differ", file=sys.stderr)


def generate(args: argparse.Namespace) -> None:
    """Draw the images `args` describes (see `build_parser`) and write them, their grid and their
    parameters into --out."""
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
    warn_if_other_model(args.from_record, args.checkpoint, checkpoint_sha)
    controls = load_controls(args, model, hints, scales, checkpoint_sha)
    settings = image_settings(args, options, model, checkpoint_sha, kinds, scales)
    out = Path(args.out)
    names = OutputNames.plan(out, fixed=args.overwrite)
    rows = []
    for line, prompt in enumerate(prompts):
        row = []
        for first, images in sample_prompt(args, model, prompt, options, init_image, mask, controls):
            for k, image in enumerate(images):
                seed = options.seed + first + k
                record = {"prompt": prompt, "seed": seed, **settings}
                save_png(image, names.image(line, prompt, seed), png_text(record), replace=args.overwrite)
                row.append(image)
        rows.append(row)
    grid_path = names.grid(prompts)
    save_png(grid(rows), grid_path, {"prompts": json.dumps(prompts), **{k: str(v) for k, v in settings.items()}},
             replace=args.overwrite)
    print(f"wrote {plural(len(prompts) * args.n, 'image')} and {grid_path.name} to {out}")


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
