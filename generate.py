"""Generate images with a trained latent diffusion model: text-to-image, img2img and inpainting.

    python generate.py "a red apple" --checkpoint runs/ldm/model.safetensors --n 4
    python generate.py "a red apple" --checkpoint model.safetensors --init-image in.png --strength 0.6
    python generate.py "a red apple" --checkpoint model.safetensors --init-image in.png --mask mask.png
    python generate.py "a red apple" --checkpoint model.safetensors --controlnet controlnet.safetensors \
        --control canny --control-image photo.png [--control-scale 1.0]   # repeat the three for more ControlNets
    python generate.py "a red apple" --checkpoint model.safetensors --lora style.safetensors:0.8 [--lora b.safetensors]
    python generate.py --from-png outputs/00003-a-red-apple-seed3.png --checkpoint model.safetensors [--steps 50]

Writes one PNG per image, named by a counter, the prompt and the seed (00000-a-red-apple-seed0.png; the
counter goes on from the highest number already in --out, as A1111 does), and a grid of them, one row
per prompt (grid-00000-a-red-apple.png): a run never replaces a file. --overwrite writes the fixed
names 000-seed0.png (prompt line, seed) and grid.png instead, replacing an earlier run's.

Each PNG holds its generation parameters in an A1111-style `parameters` text chunk (prompt, then
"Negative prompt: ...", then "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 3, ..."),
which A1111's PNG Info and civitai-style readers show, and all of them as JSON in an `ldm-generation`
chunk. --from-png reads either back (ours exactly, A1111's as far as its fields go); flags given
besides override what it read. LoRAs (--lora PATH[:SCALE], repeatable, stacked; `ldm.pipeline_lora`)
are recorded in both, and --from-png finds them again by file name in --lora-dir (default: the current
folder, then the checkpoint's).

The same command gives byte-identical files; image k of a prompt uses seed --seed + k whatever the batch
size. Bad input is one line on stderr and exit code 2, found before any model is loaded or anything is
written: every number is checked against its range, the model files against what they hold (from their
metadata, or the key prefixes of original files) and the image size against the model's configs; a
LoRA that does not fit the model is found once it loads, still before anything is written. A run
that fails later (out of memory, NaN images, a failed write) is one line and exit code 1, and each PNG
is written whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from common.cli import ArgumentParser, RunFailed, check_output_folder, run
from common.weights import atomic_write
from ldm.denoiser import SIGMA_SPACINGS
from ldm.generation import SAMPLERS, read_prompt_lines
from ldm.pipeline import Pipeline
from ldm.pipeline_lora import find_recorded_loras, parse_lora_arg
from ldm.png_metadata import A1111_SIZE, PngRecord, image_text, read_png_record, save_image
from ldm.precision import AUTO_DTYPE, DTYPE_NAMES
from ldm.request import (CANNY_DEFAULTS, CANNY_RANGE, CONTROL_KINDS, DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS,
                         ModelFiles, Request)
from ldm.samplers import get_sampler

# The flag of each setting (`ldm.request.Request`'s fields, the sampling options' names), so that an error
# about a setting names what the user typed.
FLAGS = {"sampler": "--sampler", "steps": "--steps", "guidance": "--cfg", "guidance_rescale": "--guidance-rescale",
         "eta": "--eta", "spacing": "--spacing", "seed": "--seed", "height": "--size", "width": "--size",
         "negative": "--negative", "strength": "--strength", "repaint_jump": "--repaint-jump",
         "repaint_resamples": "--repaint-resamples", "num_images": "--n", "batch_size": "--batch-size",
         "size": "--size", "init_image": "--init-image", "mask": "--mask", "checkpoint": "--checkpoint",
         "device": "--device", "controlnet": "--controlnet", "controlnets": "--controlnet", "control_image": "--control-image",
         "control": "--control", "control_scale": "--control-scale", "guess_mode": "--guess-mode",
         "canny_low": "--canny-low", "canny_high": "--canny-high", "loras": "--lora",
         "lora_allow_partial": "--lora-allow-partial", "dtype": "--dtype", "vae_tiling": "--vae-tiling"}


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
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="LoRA file (kohya / A1111 or diffusers / PEFT) for the U-Net and text encoder at "
                             "SCALE (default 1); repeatable, the LoRAs stack")
    parser.add_argument("--lora-merge", action="store_true",
                        help="merge the LoRAs into the weights at load (no cost per step) instead of applying "
                             "them as forward hooks; the images agree to float rounding")
    parser.add_argument("--lora-allow-partial", action="store_true",
                        help="LoRA keys that match no layer of the model are a warning with their count, not an error")
    parser.add_argument("--lora-dir", action="append", default=[],
                        help="where --from-png looks for the LoRAs its PNG names (repeatable; default: the "
                             "current folder, then the checkpoint's)")
    parser.add_argument("--out", default="outputs", help="output directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="write the fixed names NNN-seedS.png (NNN: the prompt's line) and grid.png, replacing "
                             "an earlier run's files (default: new numbered names; nothing is replaced)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES,
                        help="what the U-Net and ControlNets run in, cast once at load (the sampler's state, text "
                             "encoder and autoencoder stay fp32); auto: the device's default, "
                             f"{', '.join(f'{k} {v}' for k, v in AUTO_DTYPE.items())} (ldm/precision.py)")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode images larger than 512 pixels in overlapping 512-pixel tiles, so that large "
                             "images fit in memory (the pixels differ near the tiles' edges)")
    parser.set_defaults(from_record=None, record_loras=[])  # what --from-png read (`parse_args`)
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



def save_png(image: Image.Image, path: Path, text: dict[str, str], replace: bool = False) -> None:
    """Write an image with these text chunks as a PNG, whole or not at all (a failed write leaves what was
    there). A file already at `path` is replaced only with `replace`: names are planned free
    (`OutputNames`), so one there now was written meanwhile, e.g. by another run into the same folder. A
    refused write, a full disk or such a file is a one-line RunFailed naming the folder."""
    if not replace and path.exists():
        raise RunFailed(f"--out {path.parent}: {path.name} appeared during this run (another run writing into "
                        "the same folder?); not replaced")
    try:
        atomic_write(path, lambda tmp: save_image(image, tmp, text))
    except OSError as e:
        raise RunFailed(f"--out {path.parent}: cannot write {path.name} ({e.strerror or e})") from None


def grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Images [H, W, 3] arranged one list per row (short rows padded black) -> [rows H, cols W, 3]."""
    columns = max(len(r) for r in rows)
    blank = np.zeros_like(rows[0][0])
    return np.concatenate([np.concatenate(r + [blank] * (columns - len(r)), axis=1) for r in rows], axis=0)


def request_of(args: argparse.Namespace, prompts: list[str]) -> Request:
    """The pipeline's request the flags make."""
    return Request(tuple(prompts), negative_prompt=args.negative, sampler=args.sampler, steps=args.steps,
                   guidance=args.cfg, guidance_rescale=args.guidance_rescale, eta=args.eta, spacing=args.spacing,
                   seed=args.seed, num_images=args.n, batch_size=args.batch_size, size=args.size,
                   init_image=args.init_image or None, strength=args.strength, mask=args.mask or None,
                   repaint_resamples=args.repaint_resamples, repaint_jump=args.repaint_jump,
                   control_images=tuple(args.control_image), control=tuple(args.control),
                   control_scales=tuple(args.control_scale), guess_mode=args.guess_mode, canny_low=args.canny_low,
                   canny_high=args.canny_high)


def generate(args: argparse.Namespace) -> None:
    """Draw the images `args` describes (see `build_parser`) and write them, their grid and their
    parameters into --out. Everything is checked before the weights are loaded."""
    prompts = read_prompts(args)
    loras = [parse_lora_arg(text) for text in args.lora] or args.record_loras
    files = ModelFiles.read(args.checkpoint, args.config, ema=args.ema, controlnets=args.controlnet,
                            device=args.device, loras=loras, lora_allow_partial=args.lora_allow_partial,
                            lora_merge=args.lora_merge, dtype=args.dtype,
                            vae_tiling=args.vae_tiling, names=FLAGS)
    check_output_folder(args.out, "--out")
    plan = files.plan(request_of(args, prompts), names=FLAGS)

    pipe = Pipeline(files, names=FLAGS)
    warn_if_other_model(args.from_record, args.checkpoint, pipe.checkpoint_sha)
    settings = pipe.settings(plan)
    out = Path(args.out)
    names = OutputNames.plan(out, fixed=args.overwrite)
    rows = [[] for _ in prompts]
    with tqdm(total=plan.total_steps, unit="step", leave=False, dynamic_ncols=True) as bar:
        for drawn in pipe.draw(plan, callback=lambda step, total: bar.update(), names=FLAGS):
            for seed, image in zip(drawn.seeds, drawn.images):
                save_png(image, names.image(drawn.line, prompts[drawn.line], seed), image_text(image),
                         replace=args.overwrite)
                rows[drawn.line].append(np.asarray(image))
    grid_path = names.grid(prompts)
    save_png(Image.fromarray(grid(rows)), grid_path,
             {"prompts": json.dumps(prompts), **{k: str(v) for k, v in settings.items()}}, replace=args.overwrite)
    print(f"wrote {plural(len(prompts) * args.n, 'image')} and {grid_path.name} to {out}")


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


# -- --from-png: a PNG's settings as flags --------------------------------------------------------------

# Record fields that set a flag as they are (field -> argparse dest).
RECORD_FLAGS = {"prompt": "prompt", "negative": "negative", "sampler": "sampler", "steps": "steps",
                "guidance": "cfg", "guidance_rescale": "guidance_rescale", "eta": "eta", "seed": "seed",
                "repaint_jump": "repaint_jump", "repaint_resamples": "repaint_resamples",
                "guess_mode": "guess_mode", "canny_low": "canny_low", "canny_high": "canny_high",
                "lora_merge": "lora_merge", "dtype": "dtype", "vae_tiling": "vae_tiling"}


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
    flag would add to a default list), the strength (it applies only with an --init-image) and the LoRAs
    (files found by name in --lora-dir, default the current folder and the checkpoint's)."""
    fields = record.fields
    if args.controlnet and not args.control and fields.get("control"):
        args.control = list(fields["control"])
    if args.controlnet and not args.control_scale and fields.get("control_scales"):
        args.control_scale = list(fields["control_scales"])
    if args.init_image and args.strength is None and fields.get("strength") is not None:
        args.strength = fields["strength"]
    if not args.lora and fields.get("loras"):  # --lora given replaces the record's LoRAs
        folders = args.lora_dir or [".", str(Path(args.checkpoint).parent)]
        args.record_loras, notes = find_recorded_loras(fields, folders, f"--from-png {record.path} was drawn")
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)


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

def main(argv: list[str] | None = None) -> None:
    run(lambda: generate(parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
