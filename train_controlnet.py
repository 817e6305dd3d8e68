"""Train a ControlNet on a trained stage-2 model: the U-Net stays locked, a copy of its encoder learns the condition.

    python train_controlnet.py --config configs/controlnet/shapes-edges.yaml --stage2 runs/shapes64/model.safetensors \
        [--resume] [key=value ...]

The data section's `condition` ("canny", "shapes-edges", "shapes-mask") supplies the condition
images. With `controlnet.sd_locked: true` (default) only the ControlNet trains; `false` also trains
the U-Net's output blocks and output layer, as in the ControlNet paper's unlocked mode. Captions are
replaced by "" at `empty_prompt_rate` (0.5 in the paper), so the ControlNet learns to read the
condition without the prompt's help. Writes checkpoints under train.output_dir and, at the end,
`controlnet.safetensors` (EMA weights when train.ema_decay is set): the ControlNet, plus the U-Net
output blocks when unlocked, with its config and the stage-2 file's sha256 in the metadata, ready for
`generate.py --controlnet`. With a `lora:` section (training.lora.LoRAConfig) LoRA adapters on the
locked U-Net train beside the ControlNet, in place of the unlocked mode: the run also writes
`lora.safetensors` (the U-Net's adapters, for `generate.py --lora` / `python -m ldm.lora merge`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from common.cli import run
from common.config import ConfigError, at_least, check_range, to_dict
from common.weights import file_sha256, load_weights
from conditioning import drop_captions
from conditioning.context_cache import ContextCache
from data import DataConfig, build_dataset
from ldm.controlnet import Control, ControlledModel, ControlNet, save_controlnet
from ldm.generation import generate_latents
from ldm.latent_cache import fingerprint, latent_cache
from ldm.latent_diffusion import LatentDiffusion
from ldm.original_format import check_model_file, load_model
from train_stage2 import LatentDiffusionTask, OptimConfig, fine_tuning_latent_sample, task_steps
from training import TrainConfig, ema_weights, eval_mode, train
from training.lora import LoRAAdapters, LoRAConfig
from training.cli import export_errors, is_main_process, main_process_first, start_run, train_parser

log = logging.getLogger("train_controlnet")


@dataclass
class ControlNetOptions:
    hint_channels: int = 3
    sd_locked: bool = True  # False: the U-Net's output_blocks and out train too
    only_mid_control: bool = False  # add only the middle residual (an ablation of the paper)


@dataclass
class ControlSampleConfig:
    """Image grids every train.image_every steps: the batch's first `count` conditions and captions, EMA weights."""

    count: int = 4
    seed: int = 0
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 5.0

    def __post_init__(self):
        at_least("count", self.count, 1)
        at_least("seed", self.seed, 0)
        at_least("steps", self.steps, 1)
        check_range("guidance", self.guidance, low=0, high=100)


@dataclass
class ControlNetTrainConfig:
    data: DataConfig
    controlnet: ControlNetOptions = field(default_factory=ControlNetOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5, warmup_steps=0))
    samples: ControlSampleConfig = field(default_factory=ControlSampleConfig)
    empty_prompt_rate: float = 0.5
    latent_cache: bool = False
    latent_cache_dir: str | None = None  # None: <train.output_dir>/latent_cache; one folder shares it
    latent_sample: bool | None = None  # None: what the --stage2 model was trained on (posterior samples or means)
    lora: LoRAConfig | None = None  # set: LoRA adapters on the locked U-Net train too (needs sd_locked: true)

    def __post_init__(self):
        check_range("empty_prompt_rate", self.empty_prompt_rate, low=0, high=1)
        if self.lora is not None and not self.controlnet.sd_locked:
            raise ValueError("lora adapts the U-Net in place of controlnet.sd_locked: false (which trains its "
                             "output blocks whole): set one of them")


class HintedLatents(Dataset):
    """A latent cache with each item's condition image taken from the source dataset (same key)."""

    def __init__(self, latents: Dataset, source: Dataset):
        self.latents, self.source = latents, source

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, key: int) -> dict:
        return {**self.latents[key], "hint": self.source[key]["hint"]}


class ControlNetTask(LatentDiffusionTask):
    """The stage-2 task with the U-Net locked and a ControlNet beside it.

    Reuses the stage-2 set-up (one AdamW over `self.trainable` with warm-up, under the optimizer
    name "unet"), latents (cache or images) and resumable diffusion state; `trainable` holds the
    ControlNet and, when unlocked, the U-Net's output blocks, or with `adapters` the U-Net's LoRA adapters.
    """

    def __init__(self, cfg: ControlNetTrainConfig, model: LatentDiffusion, controlnet: ControlNet,
                 adapters: LoRAAdapters | None = None):
        self.cfg, self.model, self.controlnet, self.adapters = cfg, model, controlnet, adapters
        model.requires_grad_(False)
        trainable = {"controlnet": controlnet.requires_grad_(True)}
        if not cfg.controlnet.sd_locked:
            trainable["unet_decoder"] = nn.ModuleDict(
                {"output_blocks": model.unet.output_blocks, "out": model.unet.out}).requires_grad_(True)
        if adapters is not None:
            trainable.update({k: m.requires_grad_(True) for k, m in adapters.modules().items()})
        self.trainable = nn.ModuleDict(trainable)
        # The text encoder is frozen here, unless LoRA adapts it.
        text_frozen = adapters is None or not adapters.adapts("text_encoder")
        self.text_contexts = ContextCache(model.encode_text, frozen=text_frozen)

    def setup(self, accelerator) -> None:
        self.controlnet.to(accelerator.device)
        super().setup(accelerator)
        # Train mode as in the original (gradient checkpointing, dropout); only the text encoder and
        # autoencoder stay in eval mode.
        self.model.unet.train()

    def controlled_unet(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                        hint: torch.Tensor) -> torch.Tensor:
        """The U-Net's prediction with the ControlNet's residuals (unit scales), as sampling adds them."""
        control = Control(self.controlnet, hint, only_mid_control=self.cfg.controlnet.only_mid_control)
        return ControlledModel(self.model.unet, [control], batch=x_t.shape[0])(x_t, t, context)

    def training_step(self, batch, step):
        generators = self.generators(batch)
        z = self.latents(batch, generators)
        context = self.text_contexts(drop_captions(batch["caption"], self.cfg.empty_prompt_rate, generators))
        inputs = {"context": context, "hint": batch["hint"]}
        terms = self.model.diffusion.training_losses(self.controlled_unet, z, inputs, generator=generators)
        loss = terms["loss"].mean()
        yield "unet", loss, {"loss": loss.item(), "mse": terms["mse"].mean().item()}

    @torch.no_grad()
    def images(self, batch, ema):
        """Samples for the batch's first conditions and captions with the EMA weights (when kept)."""
        s = self.cfg.samples
        count = min(s.count, len(batch["caption"]))
        hints = batch["hint"][:count]
        with ema_weights(self.trainable, ema), eval_mode(self.model):
            latents = generate_latents(self.model, list(batch["caption"][:count]), seed=s.seed, sampler=s.sampler,
                                       steps=s.steps, guidance=s.guidance, height=hints.shape[2],
                                       width=hints.shape[3], control=[Control(
                                           self.controlnet, hints, only_mid_control=self.cfg.controlnet.only_mid_control)])
            samples = self.model.decode_latents(latents)
        grids = {"conditions": hints * 2 - 1, "samples": samples}
        if "image" in batch:
            grids["targets"] = batch["image"][:count]
        return grids


def check_config(cfg: ControlNetTrainConfig, model: LatentDiffusion) -> None:
    """Clear errors for a config that cannot train a ControlNet on this model."""
    if cfg.data.condition is None:
        raise ConfigError("data.condition must be set ('canny', 'shapes-edges' or 'shapes-mask'): "
                          "it supplies the ControlNet's condition images")
    if not 0.0 <= cfg.empty_prompt_rate <= 1.0:
        raise ConfigError(f"empty_prompt_rate must lie in [0, 1], got {cfg.empty_prompt_rate}")
    multiple = model.latent_factor * 2 ** (len(model.cfg.unet.channel_mult) - 1)
    if cfg.data.size % multiple:
        raise ConfigError(f"data.size {cfg.data.size} must be a multiple of {multiple} for this model "
                          f"(autoencoder factor {model.latent_factor} times the U-Net's downsampling)")


def main() -> None:
    parser = train_parser(__doc__.splitlines()[0])
    parser.add_argument("--stage2", required=True,
                        help="model.safetensors written by train_stage2.py, or an original SD/LDM checkpoint")
    parser.add_argument("--original-config", help="the original YAML of an original --stage2 checkpoint")
    args = parser.parse_args()
    if not Path(args.stage2).is_file():
        raise FileNotFoundError(f"stage-2 model not found: {args.stage2}")
    check_model_file(args.stage2)  # a wrong kind of file is named before the run's folder is touched
    cfg = start_run(args, ControlNetTrainConfig)
    model = load_model(args.stage2, args.original_config)
    model.latent_sample = fine_tuning_latent_sample(model, cfg.latent_sample, args.stage2)
    check_config(cfg, model)
    out = Path(cfg.train.output_dir)

    controlnet = ControlNet.from_unet(model.unet, cfg.controlnet.hint_channels, model.latent_factor)
    # After the copy: the ControlNet starts from the base U-Net's encoder, not from a wrapped one.
    adapters = LoRAAdapters.inject(model, cfg.lora) if cfg.lora is not None else None
    log.info("ControlNet %.2f M parameters (U-Net %s)", sum(p.numel() for p in controlnet.parameters()) / 1e6,
             "locked" if cfg.controlnet.sd_locked else "output blocks trainable")
    dataset = build_dataset(cfg.data)
    if cfg.latent_cache:
        key = fingerprint(args.stage2, cfg.data, dataset)
        cache_dir = cfg.latent_cache_dir or Path(cfg.train.output_dir) / "latent_cache"
        with main_process_first():  # built once; the other processes then read it
            cache = latent_cache(dataset, model.autoencoder, key, cache_dir, num_workers=cfg.train.num_workers)
        dataset = HintedLatents(cache, dataset)
    task = ControlNetTask(cfg, model, controlnet, adapters)
    last = train(task, dataset, cfg.train, resume=args.resume, run_config=to_dict(cfg))
    if not is_main_process():
        return

    states = {k: m.state_dict() for k, m in task.trainable.items()}
    if cfg.train.shard != "none" and last is not None:  # sharded modules' full weights are in the last checkpoint
        states = {k: load_weights(last / f"{k}.safetensors") for k in states}
    if cfg.train.ema_decay and last is not None:
        ema = load_weights(last / "ema.safetensors")
        states = {k: {n[len(k) + 1:]: v for n, v in ema.items() if n.startswith(k + ".")} for k in states}
    stage2_sha256 = file_sha256(args.stage2)
    with export_errors(out):
        if adapters is not None:
            adapters.save(out / "lora.safetensors", states, base_sha256=stage2_sha256,
                          metadata={"base": Path(args.stage2).name, "steps": task_steps(last),
                                    "controlnet": "controlnet.safetensors"})
            log.info("wrote %s", out / "lora.safetensors")
        save_controlnet(out / "controlnet.safetensors", controlnet, states["controlnet"],
                        unet_decoder=states.get("unet_decoder"),
                        metadata={"stage2": Path(args.stage2).name, "stage2_sha256": stage2_sha256,
                                  "condition": cfg.data.condition, "canny": [cfg.data.canny_low, cfg.data.canny_high],
                                  "sd_locked": cfg.controlnet.sd_locked, "steps": task_steps(last),
                                  "only_mid_control": cfg.controlnet.only_mid_control,
                                  # trained with these U-Net adapters: use the two together
                                  **({"unet_lora": "lora.safetensors"} if adapters is not None else {})})
    log.info("wrote %s", out / "controlnet.safetensors")


if __name__ == "__main__":
    run(main)
