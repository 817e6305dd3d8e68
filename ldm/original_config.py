"""Original LDM / Stable Diffusion inference YAML (`model.target` + `params`) <-> our config dataclasses.

The `target` strings of those files are never imported: the class names we know are mapped to our
builders, anything else is a ValueError naming it. Training-only `params` (monitor, keys, LR
scheduler, ...) are ignored; architecture keys our modules do not implement are rejected by
`from_dict`, naming them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from autoencoder import AutoencoderConfig, DDConfig
from common.config import ConfigError, find_config, from_dict, yaml_error_line
from conditioning import TextEncoderConfig
from ldm.diffusion import DiffusionConfig
from ldm.latent_diffusion import LatentDiffusionConfig, check_text_to_image_unet
from ldm.unet import ORIGINAL_DEFAULTS, UNetConfig
from ldm.schedule import ScheduleConfig

LDM_TARGETS = ("ldm.models.diffusion.ddpm.LatentDiffusion", "cldm.cldm.ControlLDM")
UNET_TARGETS = ("ldm.modules.diffusionmodules.openaimodel.UNetModel", "cldm.cldm.ControlledUnetModel")
AUTOENCODER_TARGETS = {"ldm.models.autoencoder.AutoencoderKL": "kl", "ldm.models.autoencoder.VQModelInterface": "vq",
                       "ldm.models.autoencoder.VQModel": "vq"}
CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPENCLIP_TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
# Our own trainable text transformer has no original counterpart; exported configs name it by our path.
TRANSFORMER_TARGET = "conditioning.text_encoders.TransformerTextEncoder"

# Original beta_schedule names -> ScheduleConfig.kind (LDM's "linear" is linear in sqrt(beta)).
BETA_SCHEDULES = {"linear": "ldm-linear", "sqrt_linear": "linear", "cosine": "cosine"}
# The original UNetModel's constructor defaults where ours differ (ours suit small models trained here).
IGNORED_UNET_KEYS = ("use_fp16",)  # precision is chosen at run time here
OPTIONAL_UNET_KEYS = ("dims", "num_classes", "use_fp16", "num_heads_upsample", "use_new_attention_order",
                      "disable_self_attentions", "num_attention_blocks", "disable_middle_self_attn",
                      "adm_in_channels", "n_embed")
IGNORED_AE_KEYS = ("lossconfig", "monitor", "ckpt_path", "ignore_keys", "image_key", "colorize_nlabels",
                   "remap", "sane_index_shape")


@dataclass
class OriginalModelConfig:
    """What an original inference YAML describes, in our terms.

    `scale_by_std`: the file's `scale_factor` buffer overrides `scale_factor`.
    `control`: the YAML is ControlNet's ControlLDM; its `control_model.*` weights are loaded
    separately (`ldm.controlnet.load_controlnet`).
    """

    ldm: LatentDiffusionConfig
    autoencoder: AutoencoderConfig
    scale_factor: float = 1.0
    scale_by_std: bool = False
    control: bool = False


def _target(section: Any, where: str, known) -> str:
    if not isinstance(section, dict) or "target" not in section:
        raise ValueError(f"{where}: expected a mapping with 'target' and 'params'")
    target = section["target"]
    if target not in known:
        raise ValueError(f"{where}: unsupported target {target!r} (known: {', '.join(known)})")
    return target


def _params(section: dict) -> dict:
    return dict(section.get("params") or {})


def parse_original_config(raw: dict | str | Path) -> OriginalModelConfig:
    """Read an original YAML (path or already-parsed dict) into `OriginalModelConfig`.

    Text encoders are built architecture-only (`pretrained: False`): the checkpoint carries them.
    """
    source = "original config"
    if not isinstance(raw, dict):
        path = find_config(raw)
        source = str(path)
        text = path.read_text(encoding="utf-8")
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(yaml_error_line(e, source, text)) from None
    if not isinstance(raw, dict) or "model" not in raw:
        raise ValueError(f"{source}: no top-level 'model' section (expected an original LDM/SD config)")
    model_target = _target(raw["model"], f"{source}: model", LDM_TARGETS)
    p = _params(raw["model"])
    if p.get("conditioning_key", "crossattn") not in ("crossattn", None):
        raise ValueError(f"{source}: conditioning_key {p['conditioning_key']!r} is not supported (only crossattn)")
    kind = p.get("beta_schedule", "linear")
    if kind not in BETA_SCHEDULES:
        raise ValueError(f"{source}: beta_schedule {kind!r} is not supported ({', '.join(BETA_SCHEDULES)})")
    schedule = ScheduleConfig(kind=BETA_SCHEDULES[kind], num_timesteps=int(p.get("timesteps", 1000)),
                              linear_start=float(p.get("linear_start", 1e-4)),
                              linear_end=float(p.get("linear_end", 2e-2)),
                              cosine_s=float(p.get("cosine_s", 8e-3)))
    parameterization = p.get("parameterization", "eps")
    if parameterization not in ("eps", "v", "x0"):
        raise ValueError(f"{source}: parameterization {parameterization!r} must be eps, v or x0")
    diffusion = DiffusionConfig(schedule=schedule, parameterization=parameterization)

    for name in ("unet_config", "first_stage_config", "cond_stage_config"):
        if name not in p:
            raise ValueError(f"{source}: model.params has no {name}")
    _target(p["unet_config"], f"{source}: unet_config", UNET_TARGETS)
    unet_params = {k: v for k, v in _params(p["unet_config"]).items() if k not in IGNORED_UNET_KEYS}
    unet = from_dict(UNetConfig, {**ORIGINAL_DEFAULTS, **unet_params}, source=f"{source}: unet_config.params")
    check_text_to_image_unet(unet, f"{source}: unet_config.params")

    ae_target = _target(p["first_stage_config"], f"{source}: first_stage_config", AUTOENCODER_TARGETS)
    ae_kind = AUTOENCODER_TARGETS[ae_target]
    ae_params = {k: v for k, v in _params(p["first_stage_config"]).items() if k not in IGNORED_AE_KEYS}
    autoencoder = from_dict(AutoencoderConfig, {"kind": ae_kind, **ae_params},
                            source=f"{source}: first_stage_config.params")

    text = _text_config(p["cond_stage_config"], f"{source}: cond_stage_config")
    return OriginalModelConfig(LatentDiffusionConfig(unet=unet, diffusion=diffusion, text=text), autoencoder,
                               scale_factor=float(p.get("scale_factor", 1.0)),
                               scale_by_std=bool(p.get("scale_by_std", False)),
                               control=model_target == "cldm.cldm.ControlLDM")


def _text_config(section: dict, where: str) -> TextEncoderConfig:
    target = _target(section, where, (CLIP_TARGET, OPENCLIP_TARGET, TRANSFORMER_TARGET))
    params = _params(section)
    params.pop("freeze", None)  # SD configs freeze it; fine-tuning scripts decide here
    params.pop("device", None)
    if target == CLIP_TARGET:
        version = params.pop("version", None)
        if version not in (None, "openai/clip-vit-large-patch14"):
            raise ValueError(f"{where}: only the ViT-L/14 CLIP text encoder is supported, got version {version!r}")
        return from_dict(TextEncoderConfig, {"kind": "clip", "pretrained": False, "layer": "last", **params},
                         source=where)
    if target == OPENCLIP_TARGET:
        params.pop("version", None)  # the weight tag; weights come from the checkpoint
        # The original class defaults to the last layer; SD 2.x configs ask for "penultimate".
        return from_dict(TextEncoderConfig, {"kind": "openclip", "pretrained": False, "arch": "ViT-H-14",
                                             "layer": "last", **params}, source=where)
    return from_dict(TextEncoderConfig, {"kind": "transformer", **params}, source=where)


def original_config_dict(ldm: LatentDiffusionConfig, autoencoder: AutoencoderConfig, scale_factor: float,
                         context_dim: int | None = None) -> dict:
    """The original-style inference YAML (as a dict) describing a model built from our configs.

    `context_dim`: the text encoder's width, written when `ldm.unet.context_dim` is None.
    """
    schedule = ldm.diffusion.schedule
    kinds = {v: k for k, v in BETA_SCHEDULES.items()}
    if schedule.zero_terminal_snr or ldm.diffusion.learn_sigma:
        raise ValueError("zero_terminal_snr / learn_sigma models have no original LatentDiffusion config")
    params: dict[str, Any] = dict(linear_start=schedule.linear_start, linear_end=schedule.linear_end,
                                  timesteps=schedule.num_timesteps, first_stage_key="jpg", cond_stage_key="txt",
                                  image_size=ldm.unet.image_size or 64, channels=autoencoder.embed_dim,
                                  cond_stage_trainable=ldm.text.kind == "transformer" or not ldm.text.freeze,
                                  conditioning_key="crossattn", monitor="val/loss_simple_ema",
                                  scale_factor=float(scale_factor), use_ema=False)
    if kinds[schedule.kind] != "linear":
        params["beta_schedule"] = kinds[schedule.kind]
    if schedule.kind == "cosine":
        params["cosine_s"] = schedule.cosine_s
    if ldm.diffusion.parameterization != "eps":
        params["parameterization"] = ldm.diffusion.parameterization
    unet = asdict(ldm.unet)
    if unet["context_dim"] is None:
        unet["context_dim"] = context_dim
    for key in ("num_heads", "num_head_channels"):  # -1 means "not set"; other readers expect it absent
        if unet[key] == -1:
            del unet[key]
    defaults = asdict(UNetConfig())
    for key in OPTIONAL_UNET_KEYS:  # absent from the original YAMLs unless set; some readers choke on null
        if unet[key] == defaults[key]:
            del unet[key]
    params["unet_config"] = {"target": UNET_TARGETS[0], "params": unet}
    ae = asdict(autoencoder)
    ae_params = {"embed_dim": ae["embed_dim"], "monitor": "val/rec_loss", "ddconfig": ae["ddconfig"],
                 "lossconfig": {"target": "torch.nn.Identity"}}
    if autoencoder.kind == "vq":
        ae_params["n_embed"] = ae["n_embed"]
    if ae_params["ddconfig"]["norm_num_groups"] == DDConfig().norm_num_groups:
        del ae_params["ddconfig"]["norm_num_groups"]  # not an original key; keep files readable elsewhere
    ae_target = {"kl": "ldm.models.autoencoder.AutoencoderKL", "vq": "ldm.models.autoencoder.VQModelInterface"}
    params["first_stage_config"] = {"target": ae_target[autoencoder.kind], "params": ae_params}
    params["cond_stage_config"] = _text_section(ldm.text)
    return {"model": {"base_learning_rate": 1.0e-4, "target": LDM_TARGETS[0], "params": params}}


def _text_section(text: TextEncoderConfig) -> dict:
    if text.kind == "clip":  # "penultimate" (clip skip) is our extension; the original knows "last"
        return {"target": CLIP_TARGET, "params": {"layer": "penultimate"}} if text.layer == "penultimate" \
            else {"target": CLIP_TARGET}
    if text.kind == "openclip":
        return {"target": OPENCLIP_TARGET, "params": {"arch": text.arch, "freeze": True,
                                                      "layer": text.layer or "penultimate"}}
    if text.kind == "transformer":
        return {"target": TRANSFORMER_TARGET, "params": {"n_embed": text.n_embed, "n_layer": text.n_layer,
                                                         "n_head": text.n_head, "max_length": text.max_length,
                                                         "dropout": text.dropout}}
    raise ValueError(f"text encoder kind {text.kind!r} has no original-format counterpart")


def write_original_config(path: str | Path, ldm: LatentDiffusionConfig, autoencoder: AutoencoderConfig,
                          scale_factor: float, context_dim: int | None = None) -> None:
    """Write `original_config_dict(...)` as YAML to `path`."""
    raw = original_config_dict(ldm, autoencoder, scale_factor, context_dim)
    Path(path).write_text(yaml.safe_dump(raw, sort_keys=False))
