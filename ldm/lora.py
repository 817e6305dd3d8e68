"""LoRA files in and out (kohya / A1111 and diffusers / PEFT), applied unmerged or merged.

A LoRA adds `scale * alpha / rank * up @ down` to a layer's weight W: down [r, in], up [out, r] for a
linear layer; for a convolution (LoCon) down [r, in, kh, kw] is a conv with the layer's stride and
padding and up [out, r, 1, 1] a 1x1 conv, so the merged weight is `up.flatten(1) @ down.flatten(1)`
reshaped to W's [out, in, kh, kw].

    lora = read_lora("style.safetensors", model)           # model: LatentDiffusion, a UNetModel,
    handle = apply_lora(model, lora, scale=0.8)            # or {"unet": ..., "text_encoder": ...}
    ...                                                    # every forward now sees the LoRA
    handle.remove()                                        # and now it does not
    merge_lora(model, lora, scale=0.8)                     # W += ..., same outputs, no cost per step

Unmerged, a LoRA is a forward hook on each target layer that adds the low-rank branch to its output:
the model's parameters and state_dict stay as they were, several LoRAs stack (one hook each), and the
layers' fused CPU kernels step aside for a hooked layer (README "Adapters and hooks"). Key names are
in `ldm.lora_keys`. Command line (one-line errors, files written atomically):

    python -m ldm.lora merge BASE LORA[:SCALE]... --out FILE
    python -m ldm.lora extract BASE TUNED --rank R --out FILE [--format kohya|peft]
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.cli import ArgumentParser, check_output_file, run
from common.weights import file_sha256
from ldm.lora_files import (FORMATS, LoRA, LoRALayer, lora_from_state_dict, lora_state_dict, model_parts, read_lora,
                            write_lora)
from ldm.lora_keys import TEXT, TargetTable
from ldm.original_format import STAGE2_FILE, check_model_file, export_original, load_model

__all__ = ["FORMATS", "LoRA", "LoRAHandle", "LoRALayer", "apply_lora", "extract_lora", "lora_from_state_dict",
           "lora_state_dict", "merge_lora", "model_parts", "read_lora", "write_lora"]


# ----------------------------------------------------------------------------- using


class LoRAHandle:
    """The hooks of LoRAs applied unmerged; `remove()` (or leaving a `with` block) takes them off."""

    def __init__(self, hooks: list):
        self._hooks = hooks

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> LoRAHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class _Branch:
    """Forward hook adding `scale * alpha / rank * up(down(x))` to a linear or conv layer's output."""

    def __init__(self, layer: LoRALayer, scale: float):
        # The factor goes into `up` once: one pass over the output fewer per call.
        self.down, self.up = layer.down, layer.up * (scale * layer.alpha / layer.rank)
        self._cast: tuple[torch.Tensor, torch.Tensor] | None = None

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """down and scaled up on x's device and dtype, cast once and kept (a step calls every hook)."""
        if self._cast is None or self._cast[0].device != x.device or self._cast[0].dtype != x.dtype:
            self._cast = (self.down.to(x.device, x.dtype), self.up.to(x.device, x.dtype))
        return self._cast

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0]
        down, up = self.weights(x)
        in_place = not torch.is_grad_enabled() and output.dtype == x.dtype
        if isinstance(module, nn.Conv2d):
            h = F.conv2d(F.conv2d(x, down, None, module.stride, module.padding, module.dilation), up)
            return output.add_(h) if in_place else output + h
        if in_place and output.is_contiguous():
            # One GEMM that accumulates into the layer's output instead of a product, then a sum.
            rows = output.view(-1, output.shape[-1])
            rows.addmm_(F.linear(x, down).reshape(rows.shape[0], -1), up.t())
            return output
        return output + F.linear(F.linear(x, down), up)


def _targets(model, lora: LoRA) -> list[tuple[nn.Module, LoRALayer]]:
    parts = model_parts(model)
    out = []
    for name, layer in lora.layers.items():
        part, path = name.split(".", 1)
        if part not in parts:
            raise ValueError(f"{lora.source}: the LoRA adapts the {part}, which the model given does not have")
        out.append((parts[part].get_submodule(path), layer))
    return out


def apply_lora(model: nn.Module | Mapping[str, nn.Module], lora: LoRA, scale: float = 1.0) -> LoRAHandle:
    """Apply `lora` without touching the weights: each target layer's output gains
    `scale * alpha / rank * up(down(x))` (equal to merging). Apply several for a stack; the handle
    removes this one. Works in training, no_grad and inference_mode; the branch is not trained."""
    return LoRAHandle([module.register_forward_hook(_Branch(layer, scale)) for module, layer in _targets(model, lora)])


@torch.no_grad()
def merge_lora(model: nn.Module | Mapping[str, nn.Module], lora: LoRA, scale: float = 1.0) -> None:
    """Bake `lora` into the weights: W += scale * alpha / rank * up @ down (computed in float32)."""
    for module, layer in _targets(model, lora):
        weight = module.weight
        weight.copy_((weight.float() + scale * layer.delta().to(weight.device)).to(weight.dtype))


# ----------------------------------------------------------------------------- extracting


@torch.no_grad()
def extract_lora(base: nn.Module | Mapping[str, nn.Module], tuned: nn.Module | Mapping[str, nn.Module],
                 rank: int) -> LoRA:
    """The difference tuned - base of every linear / conv weight as a rank-`rank` LoRA (truncated SVD,
    the best rank-r approximation in Frobenius norm), alpha = rank. Layers that did not change are
    left out. base and tuned must have the same architecture."""
    if rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    base_table, tuned_table = TargetTable(model_parts(base)), TargetTable(model_parts(tuned))
    lora = LoRA(source="extracted")
    for name, target in base_table.targets.items():
        other = tuned_table.targets.get(name)
        if other is None or other.module.weight.shape != target.module.weight.shape:
            raise ValueError(f"extract: the two models differ in architecture at {name}")
        diff = other.module.weight.double() - target.module.weight.double()
        if not diff.any():
            continue
        u, s, vh = torch.linalg.svd(diff.flatten(1), full_matrices=False)
        r = min(rank, s.shape[0])
        root = s[:r].sqrt()  # split evenly between up and down, so neither factor is tiny
        up, down = (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float()
        if diff.ndim == 4:
            down, up = down.reshape(r, *diff.shape[1:]), up[:, :, None, None]
        lora.layers[name] = LoRALayer(down.contiguous(), up.contiguous(), float(r))
    _warn_uncarried(model_parts(base), model_parts(tuned))
    return lora


def _warn_uncarried(base: dict[str, nn.Module], tuned: dict[str, nn.Module]) -> None:
    """Warn about changed tensors a LoRA has no place for (biases, norms, embeddings)."""
    changed = []
    for part, module in base.items():
        adapted = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        theirs = tuned[part].state_dict()
        changed += [f"{part}.{k}" for k, v in module.state_dict().items()
                    if k not in adapted and v.is_floating_point() and not torch.equal(v, theirs[k])]
    if changed:
        warnings.warn(f"{len(changed)} changed tensors are not linear / conv weights and are not in the LoRA, "
                      f"e.g. {changed[:5]}", stacklevel=3)


# ----------------------------------------------------------------------------- command line


def _path_and_scale(arg: str) -> tuple[str, float]:
    """`file.safetensors:0.8` -> (file, 0.8); without a number after the last ':' the scale is 1."""
    path, colon, tail = arg.rpartition(":")
    if colon and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return arg, 1.0


def _check_out(path: str) -> None:
    check_output_file(path)
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"--out {path}: the file written is safetensors; give it a .safetensors name")


def _merge(args) -> None:
    _check_out(args.out)
    loras = [_path_and_scale(arg) for arg in args.loras]
    for path, _ in loras:
        if not Path(path).is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
    kind = check_model_file(args.base)
    model = load_model(args.base, args.config)
    text_changed = False
    for path, scale in loras:
        lora = read_lora(path, model, allow_partial=args.allow_partial)
        merge_lora(model, lora, scale)
        text_changed |= any(name.startswith(TEXT + ".") for name in lora.layers)
        print(f"merged {path} at scale {scale:g}: {len(lora.layers)} layers")
    if kind is STAGE2_FILE:
        # A frozen pretrained text encoder is rebuilt from its source, not stored; a merged one must be.
        model.text_encoder.requires_grad_(text_changed or any(p.requires_grad for p in model.text_encoder.parameters()))
        model.save(args.out)
    else:
        print(f"wrote its config to {export_original(model, args.out)}")
    print(f"wrote {args.out}")


def _extract(args) -> None:
    _check_out(args.out)
    for path in (args.base, args.tuned):
        check_model_file(path)
    base = load_model(args.base, args.config)
    tuned = load_model(args.tuned, args.tuned_config or args.config)
    if TargetTable(model_parts(base)).targets.keys() != TargetTable(model_parts(tuned)).targets.keys():
        raise ValueError(f"{args.base} and {args.tuned} are models of different architectures")
    lora = extract_lora(base, tuned, args.rank)
    if not lora.layers:
        raise ValueError(f"{args.base} and {args.tuned} have the same linear and conv weights: nothing to extract")
    write_lora(lora, args.out, base, args.format,
               metadata={"ldm_lora": {"base_sha256": file_sha256(args.base), "rank": args.rank, "alpha": args.rank,
                                      "layers": len(lora.layers)}})
    print(f"wrote {args.out}: {len(lora.layers)} layers, rank <= {args.rank}, {args.format} format")


def main(argv: list[str] | None = None) -> None:
    """`python -m ldm.lora merge ...` / `extract ...`; bad input is one line on stderr, exit code 2."""
    parser = ArgumentParser(prog="python -m ldm.lora", description="Merge LoRA files into a model, or extract one.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="bake LoRAs into a model file")
    merge.add_argument("base", help="a stage-2 model.safetensors or an original SD checkpoint")
    merge.add_argument("loras", nargs="+", metavar="LORA[:SCALE]",
                       help="LoRA files (kohya or PEFT), scale 1 by default")
    merge.add_argument("--out", required=True, help="the merged model (.safetensors)")
    merge.add_argument("--config", help="the original YAML of an original-format BASE")
    merge.add_argument("--allow-partial", action="store_true", help="skip LoRA keys that match no layer (warning)")
    extract = commands.add_parser("extract", help="the difference of two models as a LoRA, by SVD")
    extract.add_argument("base")
    extract.add_argument("tuned")
    extract.add_argument("--rank", type=int, required=True)
    extract.add_argument("--out", required=True, help="the LoRA file (.safetensors)")
    extract.add_argument("--format", choices=FORMATS, default="kohya")
    extract.add_argument("--config", help="the original YAML of original-format models")
    extract.add_argument("--tuned-config", help="TUNED's YAML when it differs from --config")
    args = parser.parse_args(argv)
    if args.command == "extract" and args.rank < 1:
        parser.error(f"--rank must be at least 1, got {args.rank}")
    (_merge if args.command == "merge" else _extract)(args)


if __name__ == "__main__":
    run(lambda: main(sys.argv[1:]))
