"""The web UI's page and its handlers: a gradio Blocks app over `ldm.Pipeline`.

A LoRA (one of the models folder's, or a file's path) at a scale applies to every mode; the pipeline is
loaded for each (model, ControlNet, LoRA file and scale) and the last few are kept.

One generate button draws in the mode of the open tab (text to image, image to image, inpainting with a
mask drawn in the page, ControlNet with its Canny condition shown before drawing). Images are written
with `ldm.png_metadata.save_image` and the gallery serves those files as they are, so a downloaded image
holds generate.py's text chunks (gradio would re-encode PIL images as WebP without them). A bad input is a
`gr.Error` (a message in the page); the server goes on serving. One request runs at a time (the queue's
concurrency 1): a 2-core CPU gains nothing from two, and each loaded model is used by one request only.
"""
from __future__ import annotations

import random
import threading
from argparse import Namespace
from collections import OrderedDict
from pathlib import Path

import gradio as gr
from PIL import Image

from common.cli import RunFailed
from ..pipeline import Pipeline
from ..png_metadata import PARAMETERS_KEY, save_image
from ..request import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, open_image
from ..samplers import SAMPLERS
from ..sampling_options import IMG2IMG_STRENGTH, MAX_SEED
from .fields import (UI_FIELDS, canny_preview, editor_images, lora_folders, next_output_paths, settings_from_png,
                     shipped_controlnets, shipped_loras, shipped_models)

MODES = ("text to image", "image to image", "inpainting", "ControlNet")
CUSTOM_MODEL = "(the file below)"
NO_LORA = "(none)"
CUSTOM_LORA = "(the LoRA file below)"
LOADED_PIPELINES = 2  # kept loaded, so switching between two models (or with / without a ControlNet) is quick
# What a bad input raises (Pipeline's one-line errors) and becomes a message in the page.
INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError, RunFailed)


class Studio:
    """The app's state: where models and outputs are, the loaded pipelines (a few, most recent last)."""

    def __init__(self, args: Namespace):
        self.models_dir = Path(args.models_dir)
        self.outdir = Path(args.outdir)
        self.default_model, self.default_config = str(args.model), args.config
        self.dtype = args.dtype  # every pipeline's (`ldm.precision`)
        self.models = shipped_models(self.models_dir)
        self.controlnets = shipped_controlnets(self.models_dir)
        self.loras = shipped_loras(self.models_dir)
        self.pipelines: OrderedDict[tuple, Pipeline] = OrderedDict()
        self.lock = threading.Lock()  # the queue runs one request at a time; the lock makes sure of it

    def model_choices(self) -> list[str]:
        """The model dropdown: the shipped models, and the file-path box's entry."""
        return [*self.models, CUSTOM_MODEL]

    def initial_model(self) -> tuple[str, str]:
        """(dropdown choice, path box) for --model: its shipped name if it is one, else the path."""
        for name, path in self.models.items():
            if Path(path).resolve() == Path(self.default_model).resolve() and not self.default_config:
                return name, ""
        return CUSTOM_MODEL, self.default_model

    def lora_choices(self) -> list[str]:
        """The LoRA dropdown: none, the models folder's LoRAs, and the LoRA path box's entry."""
        return [NO_LORA, *self.loras, CUSTOM_LORA]

    def lora_file(self, lora: str | None, path: str | None) -> str | None:
        """The chosen LoRA file's path (None for none)."""
        if lora in (None, "", NO_LORA):
            return None
        if lora != CUSTOM_LORA:
            return self.loras.get(lora, lora)  # an API caller may give a path in place of a choice
        if not (path or "").strip():
            raise ValueError("choose a LoRA, or give a LoRA file's path")
        return path.strip()

    def lora_fields(self, file: str) -> tuple[str, str]:
        """(dropdown choice, path box) showing a LoRA file: its choice if it is one of the folder's."""
        if not file:
            return NO_LORA, ""
        for name, path in self.loras.items():
            if Path(path).resolve() == Path(file).resolve():
                return name, ""
        return CUSTOM_LORA, file

    def pipeline(self, model: str, path: str, config: str, controlnet: str | None,
                 loras: tuple[tuple[str, float], ...] = ()) -> Pipeline:
        """The pipeline for the chosen model (and ControlNet, and LoRAs: (path, scale) pairs), loaded once
        and kept among the last few. A LoRA file written again since (a newer modification time) is read
        again."""
        checkpoint = self.models.get(model) if model != CUSTOM_MODEL else path.strip()
        if not checkpoint:
            raise ValueError("choose a model, or give a model file's path")
        nets = [self.controlnets.get(controlnet, controlnet)] if controlnet else []
        files = tuple((file, scale, _modified(file)) for file, scale in loras)
        key = (checkpoint, config.strip() or None, tuple(nets), files)
        if key not in self.pipelines:
            self.pipelines[key] = Pipeline.from_file(checkpoint, key[1], controlnets=nets, loras=list(loras),
                                                     dtype=self.dtype)
            while len(self.pipelines) > LOADED_PIPELINES:
                self.pipelines.popitem(last=False)
        self.pipelines.move_to_end(key)
        return self.pipelines[key]

    def generate(self, mode, model, model_path, config, prompt, negative, sampler, steps, guidance, seed, count,
                 width, height, init_image, strength, editor, mask_file, controlnet, control_file, canny_low,
                 canny_high, control_scale, lora=NO_LORA, lora_path="", lora_scale=1.0, progress=gr.Progress()):
        """Draw, write the PNGs, and return (gallery of (path, caption), the first image's parameters)."""
        try:
            with self.lock:
                progress(0, desc="loading the model")
                file = self.lora_file(lora, lora_path)
                loras = ((file, float(lora_scale)),) if file else ()
                pipe = self.pipeline(model, model_path, config, controlnet if mode == "ControlNet" else None, loras)
                keywords = self.mode_keywords(mode, init_image, strength, editor, mask_file, control_file,
                                              canny_low, canny_high, control_scale)
                seed = random.randint(0, 2**31 - 1) if seed is None or int(seed) < 0 else int(seed)
                images = pipe(prompt, negative_prompt=negative, sampler=sampler, steps=int(steps),
                              guidance=float(guidance), seed=seed, num_images=int(count),
                              callback=lambda step, total: progress((step + 1, total), desc="sampling"),
                              **size_keywords(width, height), **keywords)
        except INPUT_ERRORS as e:
            raise gr.Error(page_message(e, mask_file, control_file)) from None
        self.outdir.mkdir(parents=True, exist_ok=True)
        seeds = [seed + k for k in range(len(images))]
        paths = next_output_paths(self.outdir, prompt, seeds)
        for image, path in zip(images, paths):
            save_image(image, path)
        return [(str(p), f"seed {s}") for p, s in zip(paths, seeds)], images[0].info.get(PARAMETERS_KEY, "")

    def mode_keywords(self, mode, init_image, strength, editor, mask_file, control_file, canny_low, canny_high,
                      control_scale) -> dict:
        """The Pipeline keywords of the open tab's inputs."""
        if mode == "image to image":
            if init_image is None:
                raise ValueError("image to image: upload an init image")
            return {"init_image": init_image, "strength": float(strength)}
        if mode == "inpainting":
            image, drawn = editor_images(editor)
            if image is None:
                raise ValueError("inpainting: upload an image and paint the part to repaint")
            mask = open_image(mask_file, "L", "mask") if mask_file else drawn
            if mask is None:
                raise ValueError("inpainting: paint the part to repaint (or upload a mask, white = repaint)")
            return {"init_image": image, "mask": mask}
        if mode == "ControlNet":
            if not control_file:
                raise ValueError("ControlNet: upload a control image")
            return {"control_image": control_file, "control": "canny", "canny_low": int(canny_low),
                    "canny_high": int(canny_high), "control_scale": float(control_scale)}
        return {}

    def preview(self, control_file, canny_low, canny_high):
        """The Canny condition of an uploaded control image (None when there is none)."""
        if not control_file:
            return None
        try:
            return Image.fromarray(canny_preview(control_file, int(canny_low), int(canny_high)))
        except INPUT_ERRORS as e:
            raise gr.Error(page_message(e, control_file)) from None

    def read_png(self, path):
        """Fill the fields from a dropped PNG: one update per field of UI_FIELDS, then the notes."""
        if not path:
            return [gr.update()] * len(UI_FIELDS) + [""]
        try:
            settings = settings_from_png(path, lora_folders(self.models_dir))
        except (*INPUT_ERRORS, OSError) as e:
            raise gr.Error(page_message(e, path)) from None
        if "lora" in settings.values:
            settings.values["lora"], settings.values["lora_path"] = self.lora_fields(settings.values["lora"])
        updates = [gr.update(value=settings.values[name]) if name in settings.values else gr.update()
                   for name in UI_FIELDS]
        notes = "\n".join([settings.parameters, *(f"note: {n}" for n in settings.notes)]).strip()
        return updates + [notes]


def _modified(path: str) -> int | None:
    """A file's modification time in ns (None if it is not there: Pipeline says so)."""
    try:
        return Path(path).stat().st_mtime_ns
    except OSError:
        return None


def page_message(error: Exception, *uploads) -> str:
    """An error as the page shows it: uploads named by their file names, not gradio's cache paths."""
    text = str(error)
    for path in uploads:
        if isinstance(path, str) and path:
            text = text.replace(path, Path(path).name)
    return text


def size_keywords(width, height) -> dict:
    """Width and height as Pipeline keywords; 0 leaves the size to the model (its training size) or to the
    uploaded image, and one of them alone makes a square. A size that differs from an uploaded image's is
    Pipeline's error."""
    width, height = int(width or 0), int(height or 0)
    if not width and not height:
        return {}
    return {"width": width or height, "height": height or width}


def build(args: Namespace) -> gr.Blocks:
    """The page. Element ids (elem_id) name what the browser tests use."""
    studio = Studio(args)
    model_choice, model_file = studio.initial_model()
    with gr.Blocks(title="Latent diffusion") as app:
        gr.Markdown("## Latent diffusion")
        mode = gr.Radio(list(MODES), value=MODES[0], visible=False, elem_id="mode")  # set by the tabs; an API input
        with gr.Row():
            model = gr.Dropdown(studio.model_choices(), value=model_choice, label="Model", elem_id="model")
            model_path = gr.Textbox(model_file, label="Model file (for the file below)", elem_id="model-path",
                                    placeholder="path/to/model.safetensors or an original SD .ckpt")
            config = gr.Textbox(args.config or "", label="Original YAML config (SD / LDM files)", elem_id="config")
        with gr.Row():
            lora = gr.Dropdown(studio.lora_choices(), value=NO_LORA, label="LoRA", elem_id="lora")
            lora_path = gr.Textbox("", label="LoRA file's path (for the LoRA file below)", elem_id="lora-path",
                                   placeholder="path/to/lora.safetensors (kohya / A1111 or diffusers / PEFT)")
            lora_scale = gr.Slider(0, 2, 1, step=0.05, label="LoRA scale", elem_id="lora-scale")
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=2, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                with gr.Row():
                    sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT_SAMPLER, label="Sampler", elem_id="sampler",
                                          allow_custom_value=True)  # an unknown one gets Pipeline's message
                    steps = gr.Slider(1, 150, DEFAULT_STEPS, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(1, 20, DEFAULT_GUIDANCE, step=0.5, label="Guidance (CFG)",
                                         elem_id="guidance")
                with gr.Row():
                    seed = gr.Number(0, precision=0, minimum=-1, maximum=MAX_SEED, label="Seed (-1: random)",
                                     elem_id="seed")
                    count = gr.Slider(1, 16, 4, step=1, label="Number of images", elem_id="count")
                    width = gr.Number(0, precision=0, minimum=0, label="Width (0: the model's or image's)",
                                      elem_id="width")
                    height = gr.Number(0, precision=0, minimum=0, label="Height (0: the model's or image's)",
                                       elem_id="height")
                with gr.Tabs():
                    with gr.Tab(MODES[0], elem_id="tab-txt2img") as tab:
                        gr.Markdown("Draws from the prompt alone.")
                    tab.select(lambda: MODES[0], None, mode)
                    with gr.Tab(MODES[1], elem_id="tab-img2img") as tab:
                        init_image = gr.Image(type="pil", label="Init image", elem_id="init-image")
                        strength = gr.Slider(0, 1, IMG2IMG_STRENGTH, step=0.05, label="Strength", elem_id="strength")
                    tab.select(lambda: MODES[1], None, mode)
                    with gr.Tab(MODES[2], elem_id="tab-inpaint") as tab:
                        editor = gr.ImageEditor(type="pil", label="Image: paint the part to repaint",
                                                brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"),
                                                elem_id="editor")
                        mask_file = gr.File(label="or a mask file (white = repaint)", file_types=["image"],
                                            type="filepath", elem_id="mask-file")
                    tab.select(lambda: MODES[2], None, mode)
                    with gr.Tab(MODES[3], elem_id="tab-controlnet") as tab:
                        controlnet = gr.Dropdown(list(studio.controlnets), label="ControlNet (or a file's path)",
                                                 value=next(iter(studio.controlnets), None), allow_custom_value=True,
                                                 elem_id="controlnet")
                        with gr.Row():
                            control_file = gr.File(label="Control image", file_types=["image"], type="filepath",
                                                   elem_id="control-file")
                            edges = gr.Image(label="Canny condition", interactive=False, elem_id="edges")
                        with gr.Row():
                            canny_low = gr.Slider(0, 255, 100, step=1, label="Canny low", elem_id="canny-low")
                            canny_high = gr.Slider(0, 255, 200, step=1, label="Canny high", elem_id="canny-high")
                            control_scale = gr.Slider(0, 2, 1, step=0.05, label="Control scale",
                                                      elem_id="control-scale")
                    tab.select(lambda: MODES[3], None, mode)
                generate = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                gallery = gr.Gallery(label="Images (download: PNG with its settings)", columns=2,
                                     buttons=["download"], elem_id="gallery")
                info = gr.Textbox(label="Settings of the first image", lines=3, elem_id="info")
                with gr.Accordion("Read settings from a PNG", open=False):
                    png = gr.File(label="Drop a PNG made here or by A1111", file_types=[".png"], type="filepath",
                                  elem_id="png-file")
                    png_notes = gr.Textbox(label="Its parameters", lines=3, elem_id="png-notes")
        inputs = [mode, model, model_path, config, prompt, negative, sampler, steps, guidance, seed, count, width,
                  height, init_image, strength, editor, mask_file, controlnet, control_file, canny_low, canny_high,
                  control_scale, lora, lora_path, lora_scale]
        generate.click(studio.generate, inputs, [gallery, info], api_name="generate", concurrency_limit=1,
                       concurrency_id="generate")
        for trigger in (control_file.change, canny_low.release, canny_high.release):
            trigger(studio.preview, [control_file, canny_low, canny_high], edges, api_name=False)
        fields = {"prompt": prompt, "negative_prompt": negative, "sampler": sampler, "steps": steps,
                  "guidance": guidance, "seed": seed, "width": width, "height": height, "strength": strength,
                  "lora": lora, "lora_path": lora_path, "lora_scale": lora_scale}
        png.change(studio.read_png, png, [fields[name] for name in UI_FIELDS] + [png_notes], api_name="read_png")
    app.queue(default_concurrency_limit=1)
    return app
