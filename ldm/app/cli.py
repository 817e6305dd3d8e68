"""`python -m ldm.app`'s flags and start: check the model files, build the page, serve it.

    python -m ldm.app [--model FILE [--config YAML]] [--host 127.0.0.1] [--port 7860] [--share]

A bad flag or model file is a one-line error (exit code 2) before gradio starts.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

# gradio sends usage analytics at start unless told not to; this may run offline (set before its import).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from common.cli import run
from ..precision import AUTO_DTYPE, DTYPE_NAMES
from ..request import ModelFiles

try:
    from .ui import build
except ModuleNotFoundError as e:  # gradio is the optional `ui` extra: say so in one line when it is missing
    if e.name != "gradio":
        raise
    build = None

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "models" / "default" / "model.safetensors"
DEFAULT_PORT = 7860  # gradio's and A1111's


def parser() -> argparse.ArgumentParser:
    """The flags, named as gradio apps and A1111 name them (--host, --port, --share)."""
    p = argparse.ArgumentParser(prog="python -m ldm.app", description="Web UI: text to image, image to image, "
                                "inpainting and ControlNet on a model file, in the browser.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true", help="also serve through a public gradio.live link (needs "
                   "the internet)")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="the model file selected at start: ours "
                   "(train_stage2.py's model.safetensors) or an original SD / LDM file with --config (default: "
                   "the shipped models/default)")
    p.add_argument("--config", help="the original inference YAML of an original SD / LDM --model (default: the "
                   ".yaml beside it)")
    p.add_argument("--models-dir", default=str(ROOT / "models"), help="where the model choices come from: every "
                   "*/model.safetensors and */controlnet*.safetensors in it, and the LoRA choices: every "
                   "*/*.safetensors holding LoRA weights (default: the shipped models/)")
    p.add_argument("--outdir", default="outputs/ui", help="where generated PNGs are written (default outputs/ui)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help="what the U-Net and ControlNets run in "
                   "(generate.py's --dtype); auto: the device's default, "
                   f"{', '.join(f'{k} {v}' for k, v in AUTO_DTYPE.items())}")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags, checked: a port in 0..65535 (0: any free one), the model file readable (its configs, no
    weights), the models folder present. Errors are one-line ValueErrors / FileNotFoundErrors."""
    args = parser().parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if not Path(args.models_dir).is_dir():
        raise FileNotFoundError(f"--models-dir not found: {args.models_dir}")
    ModelFiles.read(args.model, args.config, dtype=args.dtype,
                    names={"checkpoint": "--model", "controlnets": "the ControlNet choice", "dtype": "--dtype"})
    return args


def launch(args: argparse.Namespace) -> None:
    """Build the page and serve it until interrupted."""
    if build is None:
        raise ValueError("the web UI needs gradio: pip install -e '.[ui]' (make ui installs it)")
    build(args).launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                       allowed_paths=[str(Path(args.outdir).resolve())], footer_links=["api"])


def main(argv: list[str] | None = None) -> None:
    """`python -m ldm.app` and `ldm-ui`: bad input is one line on stderr and exit code 2."""
    run(lambda: launch(parse_args(argv)))
