"""What the web UI computes without gradio: a PNG's settings as the UI's field values, the shipped model,
ControlNet and LoRA files, the mask drawn in the image editor, the Canny condition a ControlNet will see, output file names.

Kept apart from `ldm.app.ui` so that these are tested without a browser or a gradio import.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from conditioning.edges import canny
from ..original_format import TensorFile
from ..pipeline_lora import LORA_KEY, find_recorded_loras
from ..png_metadata import A1111_SIZE, read_png_record
from ..request import open_image
from ..samplers import SAMPLERS, get_sampler

# The fields "read settings from a PNG" fills, by the UI's names (the PNG record's names differ:
# negative -> negative_prompt, size -> width and height, loras -> lora (the file's path, "" for none) and
# lora_scale; the UI turns `lora` into its dropdown choice and path box, lora_path).
UI_FIELDS = ("prompt", "negative_prompt", "sampler", "steps", "guidance", "seed", "width", "height", "strength",
             "lora", "lora_path", "lora_scale")
RECORD_TO_UI = {"prompt": "prompt", "negative": "negative_prompt", "sampler": "sampler", "steps": "steps",
                "guidance": "guidance", "seed": "seed", "strength": "strength"}
CONTROLNET_GLOB = "controlnet*.safetensors"


@dataclass
class PngSettings:
    """A PNG's settings for the UI: `values` by field name (only those the PNG holds), and `notes`: what the
    UI cannot set from it (its input images, ControlNets, A1111 fields without a counterpart here)."""

    values: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    parameters: str = ""


def settings_from_png(path: str | Path, lora_folders: Sequence[str | Path] = ()) -> PngSettings:
    """The settings a PNG made here (our JSON record) or by A1111 (its `parameters` text) holds, as UI field
    values. The LoRA it names is looked for by file name in `lora_folders` (`lora_settings`). A file that is
    no PNG or holds no settings is a one-line ValueError / FileNotFoundError."""
    try:
        record = read_png_record(str(path))
    except (ValueError, FileNotFoundError) as e:
        # read_png_record speaks to generate.py's --from-png flag; the page has no flags.
        raise type(e)(re.sub(r"^--from-png:? ", "", str(e))) from None
    fields = record.fields
    settings = PngSettings(parameters=_parameters_text(path))
    for key, name in RECORD_TO_UI.items():
        if fields.get(key) is not None:
            settings.values[name] = fields[key]
    sampler = settings.values.get("sampler")
    if sampler is not None and sampler not in SAMPLERS:
        settings.notes.append(f"sampler {sampler!r} has no counterpart here (kept the current one)")
        del settings.values["sampler"]
    size = A1111_SIZE.match(str(fields.get("size", "")))
    if size:
        settings.values["width"], settings.values["height"] = int(size.group(1)), int(size.group(2))
    spacing = fields.get("spacing")
    if spacing and sampler in SAMPLERS and spacing != get_sampler(sampler).default_spacing:
        settings.notes.append(f"spacing {spacing} (the UI uses the sampler's default; generate.py --spacing sets it)")
    for key, what in (("init_image", "init image"), ("mask", "mask")):
        if fields.get(key):
            settings.notes.append(f"drawn from the {what} {fields[key]}: upload it again")
    if fields.get("controlnets"):
        settings.notes.append(f"drawn with the ControlNets {', '.join(fields['controlnets'])} on "
                              f"{', '.join(fields.get('control_images', []))}")
    if fields.get("checkpoint"):
        settings.notes.append(f"model {fields['checkpoint']} (sha256 {fields.get('checkpoint_sha256', '?')})")
    lora_settings(fields, lora_folders, settings)
    settings.notes += [f"not reproduced: {item}" for item in record.unused]
    return settings


def lora_settings(fields: dict, folders: Sequence[str | Path], settings: PngSettings) -> None:
    """The LoRA of a PNG record as `lora` (its file's path) and `lora_scale`: "" (no LoRA) when the record
    names none, the first one found by file name in `folders` (preferring a file of the recorded hash,
    `ldm.pipeline_lora.find_recorded_loras`) when it names some. The UI draws with one LoRA: the others,
    and one not found (the current choice kept), are notes."""
    names = fields.get("loras") or []
    if not names:
        settings.values["lora"] = ""
        return
    scales = fields.get("lora_scales") or [1.0] * len(names)
    shas = fields.get("lora_sha256") or [None] * len(names)
    hashes = fields.get("lora_hashes") or [None] * len(names)
    if len(names) > 1:
        settings.notes.append("drawn with the LoRAs " + ", ".join(f"{n} ({s:g})" for n, s in zip(names, scales))
                              + f": the page draws with one, {names[0]} (generate.py --lora stacks them)")
    try:
        specs, notes = find_recorded_loras({"loras": names[:1], "lora_scales": scales[:1], "lora_sha256": shas[:1],
                                            "lora_hashes": hashes[:1]}, folders, "drawn")
    except ValueError:
        settings.notes.append(f"LoRA {names[0]} (scale {scales[0]:g}) not found in "
                              f"{', '.join(str(f) for f in folders) or 'the models folder'}: choose its file "
                              "(the LoRA field kept its choice)")
        return
    settings.values["lora"], settings.values["lora_scale"] = specs[0].path, specs[0].scale
    settings.notes += notes
    if fields.get("lora_merge"):
        settings.notes.append("its LoRAs were merged into the weights; the page applies them unmerged (pixels "
                              "within 1/255 of it)")


def _parameters_text(path: str | Path) -> str:
    """The PNG's `parameters` chunk as it is (shown in the page beside the filled fields)."""
    with Image.open(path) as image:
        return dict(getattr(image, "text", None) or {}).get("parameters", "")


def shipped_models(models_dir: Path) -> dict[str, str]:
    """The shipped text-to-image models: {folder name: path of its model.safetensors}."""
    return {p.parent.name: str(p) for p in sorted(Path(models_dir).glob("*/model.safetensors"))}


def shipped_controlnets(models_dir: Path) -> dict[str, str]:
    """The shipped ControlNets: {"folder/file": path} of every controlnet*.safetensors in models/."""
    return {f"{p.parent.name}/{p.name}": str(p) for p in sorted(Path(models_dir).glob(f"*/{CONTROLNET_GLOB}"))}


def shipped_loras(models_dir: Path) -> dict[str, str]:
    """The LoRA files in the models folder: {"folder/file": path} of every */*.safetensors whose keys are a
    LoRA's (its header alone is read; model and ControlNet files are not listed)."""
    loras = {}
    for path in sorted(Path(models_dir).glob("*/*.safetensors")):
        try:
            if any(LORA_KEY.search(key) for key in TensorFile(path).keys()):
                loras[f"{path.parent.name}/{path.name}"] = str(path)
        except (OSError, ValueError):  # an unreadable file is no choice; the path box still takes it
            continue
    return loras


def lora_folders(models_dir: Path) -> list[Path]:
    """Where "read settings from a PNG" looks for a LoRA by file name: the models folder's folders."""
    return sorted(p for p in Path(models_dir).iterdir() if p.is_dir())


def editor_images(value: dict | None) -> tuple[Image.Image | None, Image.Image | None]:
    """The image editor's value ({"background", "layers", "composite"}, PIL images) as (init image RGB,
    mask "L": white where any layer was painted, None if nothing was)."""
    if not value or value.get("background") is None:
        return None, None
    background = value["background"].convert("RGB")
    painted = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        alpha = np.asarray(layer.convert("RGBA"))[..., 3]
        if alpha.shape != painted.shape:  # layers are made at the background's size; another is a bug
            raise ValueError(f"a mask layer is {alpha.shape[1]}x{alpha.shape[0]} but the image is "
                             f"{background.width}x{background.height}")
        painted |= alpha > 0
    if not painted.any():
        return background, None
    return background, Image.fromarray(painted.astype(np.uint8) * 255, mode="L")


def canny_preview(image, low: int, high: int) -> np.ndarray:
    """The Canny condition a ControlNet is given for `image` (a path or PIL image), as uint8 [H, W]: the
    edges `ldm.request.condition_tensor` computes (conditioning.edges.canny on the RGB image). A file that
    is no image is a one-line ValueError."""
    return canny(np.asarray(open_image(image, "RGB", "control image", unreadable="control image")), low, high)


def next_output_paths(folder: Path, prompt: str, seeds: list[int]) -> list[Path]:
    """New file names for images of `prompt` with `seeds`, as generate.py names them: a 5-digit counter
    going on from the highest in `folder`, a slug of the prompt, the seed (no file is replaced)."""
    numbers = [int(m.group(1)) for p in Path(folder).glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    first = max(numbers, default=-1) + 1
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "image"
    return [Path(folder) / f"{first + k:05d}-{slug}-seed{seed}.png" for k, seed in enumerate(seeds)]
