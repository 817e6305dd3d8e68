"""Original LDM / Stable Diffusion checkpoints: load them into `LatentDiffusion`, export ours to them.

Key layout of an original file: `model.diffusion_model.*` (U-Net), `first_stage_model.*`
(autoencoder, plus `loss.*` in training files), `cond_stage_model.*` (text encoder),
`model_ema.*` (EMA U-Net with dots removed from the names), schedule buffers at top level.

Memory: the model is built with its parameters on the meta device (no storage), tensors are read
one at a time (`common.tensor_file.TensorFile`: safetensors' mapping, or an mmap'ed
`torch.load(weights_only=True)`) and then assigned, so an SD-size file never sits in memory twice.
A U-Net wanted in another dtype (`unet_dtype`, generate.py --dtype bf16) is read straight in that
dtype: no float32 copy of it is made, and from a `.safetensors` file none of its float32 pages stays
resident either.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn

from autoencoder import AutoencoderConfig, build_autoencoder
from autoencoder.model_file import FILE_DESCRIPTIONS
from autoencoder.model_file import FILE_FORMAT as STAGE1_FORMAT
from common.tensor_file import TensorFile
from common.weights import CheckpointError, load_state_dict_strict, read_metadata, save_weights
from ldm.controlnet import FILE_FORMAT as CONTROLNET_FORMAT
from ldm.latent_diffusion import FILE_FORMAT as STAGE2_FORMAT
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.original_config import OriginalModelConfig, parse_original_config, write_original_config
from ldm.precision import cast_for_inference, inference_dtypes

UNET_PREFIX = "model.diffusion_model."
AUTOENCODER_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
EMA_PREFIX = "model_ema."
CONTROL_PREFIX = "control_model."
# Tensors an original file may hold that no module of ours takes.
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "scale_factor", "model_ema.decay",
                 "model_ema.num_updates")
DROPPED_SUFFIXES = ("embeddings.position_ids",)  # a constant that newer transformers no longer stores
EXPORT_FORMAT = "ldm-original"


def ema_key(unet_key: str) -> str:
    """`input_blocks.0.0.weight` -> `model_ema.diffusion_modelinput_blocks00weight` (the original's flattening)."""
    return EMA_PREFIX + ("diffusion_model." + unet_key).replace(".", "")


def _fit(value: torch.Tensor, like: torch.Tensor, key: str) -> torch.Tensor:
    """Reshape proj_in/proj_out between 1x1 conv [C, C, 1, 1] (SD 1.x) and Linear [C, C] (SD 2.x)."""
    if value.shape != like.shape and key.endswith(("proj_in.weight", "proj_out.weight")) \
            and value.numel() == like.numel() and {value.ndim, like.ndim} == {2, 4}:
        return value.reshape(like.shape)
    return value


def _load_module(module: nn.Module, tensors: TensorFile, names: dict[str, str],
                 dtype: torch.dtype | Mapping[str, torch.dtype] | None, what: str) -> None:
    """Assign `tensors[names[k]]` to every entry `k` of `module.state_dict()`, strictly.

    `names` maps the module's keys to file keys; floating-point tensors are read as `dtype` (one for
    all, or per key; None keeps the file's). Raises CheckpointError naming the first missing
    and mis-shaped keys (by their names in the file).
    """
    expected = module.state_dict(keep_vars=True)
    state = {}
    for key, like in expected.items():
        if names[key] in tensors:
            wanted = dtype.get(key) if isinstance(dtype, Mapping) else dtype
            state[key] = _fit(tensors.get(names[key], wanted), like, key)
    load_state_dict_strict(module, state, tensors.path, what=f"the {what}", file_key=lambda k: names.get(k, k),
                           assign=True, hint="check the config against the file")


class _MetaStaysMeta(torch.overrides.TorchFunctionMode):
    """Makes `tensor.to(device)` a no-op for meta tensors while a model is being built.

    open_clip's `create_model` ends with `model.to("cpu")`, which would fail (or, with real
    tensors, allocate) for parameters created on the meta device.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.to and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


def build_empty_model(config: OriginalModelConfig) -> LatentDiffusion:
    """The model with its parameters on the meta device (no storage); buffers (masks, ...) stay real."""
    with init_empty_weights(include_buffers=False), _MetaStaysMeta():
        autoencoder = build_autoencoder(config.autoencoder)
        return LatentDiffusion(config.ldm, autoencoder, config.autoencoder, config.scale_factor)


def load_original_model(checkpoint: str | Path, config: str | Path | dict | OriginalModelConfig,
                        use_ema: bool = False, dtype: torch.dtype | None = torch.float32,
                        device: str | torch.device = "cpu", unet_dtype: torch.dtype | None = None) -> LatentDiffusion:
    """A `LatentDiffusion` from an original `.ckpt` / `.safetensors` and its original YAML.

    Args:
        checkpoint: original SD / LDM file (`model.diffusion_model.*`, `first_stage_model.*`,
            `cond_stage_model.*`); a ControlLDM file's `control_model.*` is skipped (see
            `ldm.controlnet.load_controlnet`).
        config: path of an original inference YAML, its parsed dict, or an `OriginalModelConfig`.
        use_ema: take the U-Net from `model_ema.*` (CheckpointError when the file has none).
        dtype: floating-point dtype of the loaded weights (None keeps the file's).
        unet_dtype: the U-Net as `ldm.precision.cast_for_inference` leaves it in this dtype (GroupNorms
            float32), read straight in it: the same tensors as loading, then casting, without the
            float32 copy (the module doc). None: the U-Net as `dtype` says.
    Returns the model in eval mode on `device`.
    """
    if not isinstance(config, OriginalModelConfig):
        config = parse_original_config(config)
    tensors = TensorFile(checkpoint)
    model = build_empty_model(config)
    unet_names = {k: UNET_PREFIX + k for k in model.unet.state_dict()}
    if use_ema:
        if not any(k.startswith(EMA_PREFIX) and k not in SCHEDULE_KEYS for k in tensors.keys()):
            raise CheckpointError(f"{tensors.path}: use_ema was asked for but the file has no model_ema.* weights")
        unet_names = {k: ema_key(k) for k in unet_names}
    ae_names = {k: AUTOENCODER_PREFIX + k for k in model.autoencoder.state_dict()}
    text_names = {k: TEXT_PREFIX + k for k in model.text_encoder.state_dict()}
    _check_unexpected(tensors, [unet_names, ae_names, text_names], use_ema, config.control)
    unet_dtypes = dtype if unet_dtype is None else inference_dtypes(model.unet, unet_dtype)
    _load_module(model.unet, tensors, unet_names, unet_dtypes, "U-Net")
    _load_module(model.autoencoder, tensors, ae_names, dtype, "autoencoder")
    _load_module(model.text_encoder, tensors, text_names, dtype, "text encoder")
    if config.scale_by_std and "scale_factor" in tensors:
        model.scale_factor = float(tensors.get("scale_factor"))
    _check_schedule(model, tensors)
    return model.to(device).eval()


def _check_unexpected(tensors: TensorFile, name_maps: list[dict[str, str]], use_ema: bool, control: bool) -> None:
    taken = {name for names in name_maps for name in names.values()}
    skipped = (EMA_PREFIX, "first_stage_model.loss.") + ((CONTROL_PREFIX,) if control else ())
    if use_ema:  # the live U-Net weights are then the ones left over
        skipped += (UNET_PREFIX,)
    unexpected = [k for k in tensors.keys() if k not in taken and k not in SCHEDULE_KEYS
                  and not k.startswith(skipped) and not k.endswith(DROPPED_SUFFIXES)]
    if unexpected:
        raise CheckpointError(f"{tensors.path}: {len(unexpected)} unexpected weights, e.g. {unexpected[:5]}; "
                              "the file holds modules the config does not describe")


def _check_schedule(model: LatentDiffusion, tensors: TensorFile) -> None:
    if "alphas_cumprod" not in tensors:
        return
    stored = tensors.get("alphas_cumprod")
    rtol = max(1e-4, 4 * torch.finfo(stored.dtype).eps)  # fp16 files store the table rounded
    stored, ours = stored.float(), model.diffusion.schedule.alphas_cumprod.cpu()
    if stored.shape != ours.shape or not torch.allclose(stored, ours, rtol=rtol, atol=1e-6):
        raise CheckpointError(f"{tensors.path}: the file's alphas_cumprod differ from the config's schedule "
                              "(linear_start / linear_end / timesteps / beta_schedule)")


def load_original_autoencoder(checkpoint: str | Path, config: AutoencoderConfig,
                              dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """An autoencoder from a stand-alone VAE file (`encoder.*`, `decoder.*`, `loss.*` dropped) or from
    the `first_stage_model.*` part of a full SD file; strict, one tensor at a time."""
    tensors = TensorFile(checkpoint)
    with init_empty_weights(include_buffers=False):
        autoencoder = build_autoencoder(config)
    full = any(k.startswith(AUTOENCODER_PREFIX) for k in tensors.keys())
    prefix = AUTOENCODER_PREFIX if full else ""
    names = {k: prefix + k for k in autoencoder.state_dict()}
    if not full:
        taken = set(names.values())
        unexpected = [k for k in tensors.keys() if k not in taken and not k.startswith(("loss.", EMA_PREFIX))]
        if unexpected:
            raise CheckpointError(f"{tensors.path}: {len(unexpected)} unexpected weights, e.g. {unexpected[:5]}")
    _load_module(autoencoder, tensors, names, dtype, "autoencoder")
    return autoencoder.eval().requires_grad_(False)


def original_state_dict(model: LatentDiffusion, unet_state: dict[str, torch.Tensor] | None = None,
                        schedule: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """(original key, tensor) pairs of `model`: U-Net (or `unet_state`, e.g. EMA), autoencoder, text
    encoder, and the schedule buffers plus `scale_factor` when `schedule`."""
    for k, v in (unet_state or model.unet.state_dict()).items():
        yield UNET_PREFIX + k, v
    for k, v in model.autoencoder.state_dict().items():
        yield AUTOENCODER_PREFIX + k, v
    for k, v in model.text_encoder.state_dict().items():
        if not k.endswith(DROPPED_SUFFIXES):
            yield TEXT_PREFIX + k, v
    if schedule:
        yield from model.diffusion.schedule.buffers().items()
        yield "scale_factor", torch.tensor(model.scale_factor)


def export_original(model: LatentDiffusion, path: str | Path, unet_state: dict[str, torch.Tensor] | None = None,
                    dtype: torch.dtype | None = None, config_path: str | Path | None = None) -> Path:
    """Write `model` as one original-format `.safetensors` and its original-style YAML beside it.

    `unet_state` replaces the live U-Net weights (e.g. EMA ones); `dtype` (e.g. torch.float16)
    converts floating-point weights. The YAML goes to `config_path` (default: same name, `.yaml`).
    Returns the YAML's path. Our trainable text transformer is exported under its own names and
    a `conditioning.text_encoders.TransformerTextEncoder` target that only this project reads.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors, got {path}")
    tensors = {}
    for k, v in original_state_dict(model, unet_state):
        v = v.detach()
        tensors[k] = v.to(dtype) if dtype is not None and v.is_floating_point() and v.ndim > 0 else v
    save_weights(tensors, path, {"format": EXPORT_FORMAT})
    config_path = Path(config_path) if config_path else path.with_suffix(".yaml")
    write_original_config(config_path, model.cfg, model.autoencoder_cfg, model.scale_factor,
                          model.text_encoder.context_dim)
    return config_path


# -- what a weights file is ---------------------------------------------------------------------------

@dataclass(frozen=True)
class FileKind:
    """What a weights file holds, as far as choosing a loader goes.

    description: what the file is, for messages ("{path} is {description}").
    model: a whole text-to-image model (a stage-2 file or an original SD / LDM checkpoint).
    controlnet: ControlNet weights (a ControlNet file, or an original checkpoint holding one).
    """

    description: str
    model: bool = False
    controlnet: bool = False


STAGE2_FILE = FileKind(FILE_DESCRIPTIONS[STAGE2_FORMAT], model=True)
ORIGINAL_FILE = FileKind("an original SD / LDM checkpoint", model=True)
CONTROL_LDM_FILE = FileKind("an original ControlNet checkpoint with its base model", model=True, controlnet=True)
CONTROLNET_FILE = FileKind(FILE_DESCRIPTIONS[CONTROLNET_FORMAT], controlnet=True)
ORIGINAL_CONTROLNET_FILE = FileKind("an original ControlNet file", controlnet=True)
STAGE1_FILE = FileKind(FILE_DESCRIPTIONS[STAGE1_FORMAT])
VAE_FILE = FileKind("an autoencoder (VAE) weights file")
UNKNOWN_FILE = FileKind("not a model file of a known kind (no ldm-* metadata, and none of the original key "
                        f"prefixes {UNET_PREFIX}, {CONTROL_PREFIX}, encoder. / decoder.)")
# Files of this project say what they are in their metadata; other files are told by their keys.
FORMAT_KINDS = {STAGE2_FORMAT: STAGE2_FILE, EXPORT_FORMAT: FileKind(FILE_DESCRIPTIONS[EXPORT_FORMAT], model=True),
                CONTROLNET_FORMAT: CONTROLNET_FILE, STAGE1_FORMAT: STAGE1_FILE}


def model_file_kind(path: str | Path) -> FileKind:
    """What the weights file at `path` holds, from its metadata or, for original files, its key prefixes
    (for a .ckpt that means opening its pickle; no tensor is read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    stat = path.stat()
    return _file_kind(path, stat.st_mtime_ns, stat.st_size)


# Callers look twice (a command line before it loads, then the loader); opening a legacy .ckpt pickle
# reads all of it. Keyed by the file's time and size too, so a rewritten file is looked at again.
@functools.lru_cache(maxsize=8)
def _file_kind(path: Path, mtime_ns: int, size: int) -> FileKind:
    if path.suffix == ".safetensors":
        found = read_metadata(path).get("format")
        if isinstance(found, str) and found in FORMAT_KINDS:
            return FORMAT_KINDS[found]
    keys = TensorFile(path).keys()

    def has(*prefixes: str) -> bool:
        return any(key.startswith(prefixes) for key in keys)

    if has(UNET_PREFIX):  # ControlNet 1.0 releases hold the whole base model beside control_model.*
        return CONTROL_LDM_FILE if has(CONTROL_PREFIX) else ORIGINAL_FILE
    if has(CONTROL_PREFIX, "input_hint_block."):
        return ORIGINAL_CONTROLNET_FILE
    if has("encoder.", "decoder.", AUTOENCODER_PREFIX):
        return VAE_FILE
    return UNKNOWN_FILE


MODEL_FILES = "a stage-2 model file (train_stage2.py's model.safetensors) or an original SD checkpoint"


def check_model_file(path: str | Path) -> FileKind:
    """The kind of `path`; a CheckpointError naming it unless it holds a whole text-to-image model."""
    kind = model_file_kind(path)
    if not kind.model:
        raise CheckpointError(f"{path} is {kind.description}; a text-to-image model is {MODEL_FILES}")
    return kind


def _original_yaml(checkpoint: Path, config: str | Path | None) -> str | Path:
    """`config`, or without one the YAML of the same name beside the checkpoint (as `export_original` writes)."""
    if config is not None:
        return config
    beside = checkpoint.with_suffix(".yaml")
    if not beside.is_file():
        raise ValueError(f"{checkpoint} is an original-format checkpoint: pass its YAML config "
                         "(e.g. configs/sd/v1-inference.yaml)")
    return beside


def _check_stage2_options(checkpoint: Path, config: str | Path | None, use_ema: bool) -> None:
    if config is not None or use_ema:
        raise ValueError(f"{checkpoint} is a stage-2 file of this project: it carries its config and "
                         "picked weights; leave out the original config / EMA choice")


def read_model_configs(checkpoint: str | Path, config: str | Path | None = None,
                       use_ema: bool = False) -> tuple[LatentDiffusionConfig, AutoencoderConfig]:
    """The configs of the model `load_model` would build from the same arguments, without reading any
    weights: enough to check image sizes and step counts before loading."""
    checkpoint = Path(checkpoint)
    if check_model_file(checkpoint) is STAGE2_FILE:
        _check_stage2_options(checkpoint, config, use_ema)
        cfg, ae_cfg, _ = LatentDiffusion.read_configs(checkpoint)
        return cfg, ae_cfg
    original = parse_original_config(_original_yaml(checkpoint, config))
    return original.ldm, original.autoencoder


def load_model(checkpoint: str | Path, config: str | Path | None = None, use_ema: bool = False,
               device: str | torch.device = "cpu", unet_dtype: torch.dtype | None = None) -> LatentDiffusion:
    """A stage-2 file of ours, or an original SD/LDM file with its YAML `config`.

    Without `config`, an original file uses the YAML of the same name beside it (as written by
    `export_original`); if there is none, a ValueError asks for one. A file that holds no whole model
    (a ControlNet, an autoencoder) is a CheckpointError saying what it holds. unet_dtype: the U-Net as
    `ldm.precision.cast_for_inference` leaves it in that dtype (an original file's is read straight in
    it: `load_original_model`); None: float32.
    """
    checkpoint = Path(checkpoint)
    if check_model_file(checkpoint) is STAGE2_FILE:
        _check_stage2_options(checkpoint, config, use_ema)
        model = LatentDiffusion.load(checkpoint, device=device)
        if unet_dtype is not None:  # stage-2 files are small: cast after loading
            cast_for_inference([model.unet], unet_dtype)
        return model
    return load_original_model(checkpoint, _original_yaml(checkpoint, config), use_ema=use_ema, device=device,
                               unet_dtype=unet_dtype)


__all__ = ["FileKind", "LatentDiffusionConfig", "OriginalModelConfig", "TensorFile", "check_model_file", "ema_key",
           "export_original", "load_model", "load_original_autoencoder", "load_original_model", "model_file_kind",
           "original_state_dict", "parse_original_config", "read_model_configs"]
