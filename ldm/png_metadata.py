"""Generation settings in PNG text chunks: A1111's `parameters` text and our JSON `ldm-generation` record.

Every image `ldm.pipeline.Pipeline` draws (and so every file generate.py writes) carries both:
A1111's infotext ("prompt", then "Negative prompt: ...", then "Steps: 25, Sampler: DPM++ 2M, Schedule
type: Karras, CFG scale: 3, ..."), which A1111's PNG Info, ComfyUI and civitai read, and all settings as
JSON. `read_png_record` reads either back (ours exactly, A1111's as far as its fields go).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from .denoiser import SIGMA_SPACINGS
from .samplers import get_sampler

PARAMETERS_KEY = "parameters"  # A1111's text chunk, read by its PNG Info tab, ComfyUI and civitai
RECORD_KEY = "ldm-generation"  # our JSON record, every setting (`Pipeline.settings`) with prompt and seed
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
# An extra network named in an A1111 prompt, `<lora:NAME:SCALE>` (A1111's re_extra_net); A1111 reads the
# tags out of the prompt before encoding it and keeps them in the infotext's prompt.
A1111_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


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
    apply, Denoising strength, Eta DDIM and Guidance rescale. LoRAs as A1111 writes them: a tag
    `<lora:NAME:SCALE>` each after the prompt, and `Lora hashes: "NAME: HASH, ..."` last (NAME the file
    name without suffix, HASH A1111's 12 hex digits). Inpainting and ControlNet settings are in the JSON
    record only."""
    strength = record.get("strength") if record.get("init_image") else None
    fields = {"Steps": record["steps"], "Sampler": A1111_SAMPLERS.get(record["sampler"], record["sampler"]),
              "Schedule type": a1111_schedule(record), "CFG scale": a1111_number(record["guidance"]),
              "Seed": record["seed"], "Size": record["size"], "Model hash": record["checkpoint_sha256"][:10],
              "Model": Path(record["checkpoint"]).stem,
              "Denoising strength": None if strength is None else a1111_number(strength),
              "Eta DDIM": a1111_number(record["eta"]) if record["eta"] else None,
              "Guidance rescale": a1111_number(record["guidance_rescale"]) if record["guidance_rescale"] else None}
    names = [a1111_lora_name(name) for name in record.get("loras", [])]
    if names:
        fields["Lora hashes"] = ", ".join(f"{name}: {h}" for name, h in zip(names, record["lora_hashes"]))
    pairs = ", ".join(f"{key}: {a1111_quote(value)}" for key, value in fields.items() if value is not None)
    negative = f"\nNegative prompt: {record['negative']}" if record["negative"] else ""
    tags = [f"<lora:{name}:{a1111_number(scale)}>" for name, scale in zip(names, record.get("lora_scales", []))]
    prompt = " ".join([record["prompt"], *tags]).strip()
    return f"{prompt}{negative}\n{pairs}".strip()


def a1111_lora_name(file_name: str) -> str:
    """How A1111 names a LoRA file in tags and hashes: its name without suffix, less the characters its
    tags and "Lora hashes" cannot hold (':', ',', '<', '>')."""
    return re.sub(r"[:,<>]", "", Path(file_name).stem)


def a1111_loras(prompt: str, hashes: str, unused: list[str]) -> tuple[str, dict]:
    """A1111's prompt without its `<lora:NAME:SCALE>` tags, and the record fields of those LoRAs (loras:
    their names, lora_scales, lora_hashes from "Lora hashes" where given). Text-encoder / U-Net weights
    given apart (`<lora:NAME:TE:UNET>`) and other extra networks go to `unused`."""
    known = {}
    for pair in hashes.split(","):
        name, _, value = pair.partition(":")
        if value.strip():
            known[name.strip()] = value.strip()
    loras: dict[str, float] = {}

    def take(match: re.Match) -> str:
        kind, (name, *items) = match.group(1), match.group(2).split(":")
        if kind not in ("lora", "lyco"):
            unused.append(f"{match.group(0)} (an extra network other than a LoRA)")
            return ""
        try:  # A1111: text-encoder weight, U-Net weight (default the first), dyn dim; or te= / unet= / dyn=
            scale = float(items[0]) if items else 1.0
        except ValueError:
            unused.append(f"{match.group(0)} (not a scale)")
            return ""
        if items[1:] and items[1:] != [items[0]]:
            unused.append(f"{match.group(0)} (weights or settings beyond one scale; taken as {scale:g})")
        loras[name] = scale
        return ""

    text = A1111_EXTRA_NETWORK.sub(take, prompt).strip()
    if not loras:
        return text, {}
    return text, {"loras": list(loras), "lora_scales": list(loras.values()),
                  "lora_hashes": [known.get(name) for name in loras]}


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
    fields["prompt"], loras = a1111_loras(fields["prompt"], values.pop("Lora hashes", ""), record.unused)
    fields.update(loras)
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



def png_info(text: dict[str, str]) -> PngInfo:
    """The text chunks (`png_text`, or an image's `.info`) as the `pnginfo` of PIL's PNG writer."""
    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    return info


def image_text(image: Image.Image) -> dict[str, str]:
    """The text chunks of a `Pipeline` image (in its `.info`): `parameters` and `ldm-generation`."""
    return {key: image.info[key] for key in (PARAMETERS_KEY, RECORD_KEY) if key in image.info}


def save_image(image: Image.Image, path, text: dict[str, str] | None = None) -> None:
    """Write an image as PNG with its settings (`image_text`, or the chunks `text`): for a `Pipeline`
    image, the bytes generate.py writes. `path`: a file name or a binary file object."""
    image.save(path, format="PNG", pnginfo=png_info(image_text(image) if text is None else text))
