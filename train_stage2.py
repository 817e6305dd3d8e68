"""Stage 2: train a text-conditioned U-Net as a DDPM in a frozen autoencoder's latent space.

    python train_stage2.py --config configs/ldm/emoji64.yaml --first-stage runs/ae/autoencoder.safetensors \
        [--resume] [key=value ...]
    python train_stage2.py --config my-finetune.yaml --init-from sd-v1-5.safetensors \
        --original-config configs/sd/v1-inference.yaml
    python train_stage2.py --config configs/ldm/lora-default.yaml --init-from models/default/model.safetensors

Writes checkpoints under train.output_dir and, at the end, `model.safetensors`: U-Net (EMA weights
when train.ema_decay is set), text encoder and autoencoder with their configs, ready for generate.py.
With a `lora:` section (training.lora.LoRAConfig) the --init-from model stays frozen and only LoRA
adapters train; checkpoints hold the adapters only, and the run writes `lora.safetensors` instead.
With a `dreambooth:` section (training.dreambooth.DreamBoothConfig) the --init-from model learns a
subject from a folder of pictures, with prior preservation on class images it draws first.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from autoencoder import measure_scale_factor
from autoencoder.model_file import load_autoencoder, read_autoencoder_config
from common.cli import run
from common.config import ConfigError, at_least, check_range, to_dict
from common.randomness import Generators, randn_like, sample_generators
from common.weights import file_sha256, load_weights
from conditioning import drop_captions
from conditioning.context_cache import ContextCache
from data import DataConfig, build_dataset
from data.dreambooth import split_pairs
from ldm.generation import generate_latents
from ldm.latent_cache import fingerprint, latent_cache
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.original_format import check_model_file, load_model
from training import TrainConfig, TrainingTask, ema_weights, eval_mode, train
from training.dreambooth import (CLASS_KEY_OFFSET, DreamBoothConfig, check_dreambooth, combine_losses,
                                 dreambooth_dataset)
from training.lora import LoRAAdapters, LoRAConfig
from training.optimizers import LRDecay, adam, warmup_then_decay
from training.cli import check_adam, export_errors, is_main_process, main_process_first, start_run, train_parser

log = logging.getLogger("train_stage2")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_steps: int = 500
    decay: LRDecay = "constant"  # cosine / cooldown: to 0 at train.max_steps
    cooldown_fraction: float = 0.2  # decay "cooldown": the last part of train.max_steps, lr linearly to 0

    def __post_init__(self):
        check_adam(self.lr, self.betas)
        check_range("weight_decay", self.weight_decay, low=0)
        at_least("warmup_steps", self.warmup_steps, 0)
        check_range("cooldown_fraction", self.cooldown_fraction, low=0, high=1, low_inclusive=False)


@dataclass
class SampleConfig:
    """Image grids written every train.image_every steps: fixed prompts and seeds, EMA weights."""

    prompts: list[str] = field(default_factory=list)
    seed: int = 0
    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 5.0

    def __post_init__(self):
        at_least("seed", self.seed, 0)
        at_least("steps", self.steps, 1)
        check_range("guidance", self.guidance, low=0, high=100)


@dataclass
class Stage2Config:
    model: LatentDiffusionConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    samples: SampleConfig = field(default_factory=SampleConfig)
    caption_dropout: float = 0.1  # captions replaced by "", the unconditional input of guidance
    scale_factor: float | None = None  # None: from the stage-1 file's metadata (or the means', see below)
    # false: train on the posterior means, scaled by 1 / their std unless scale_factor is set. For
    # autoencoders whose posterior noise outweighs the means (train_stage1.py warns): a few latents with
    # a huge std set the samples' std, so sampled latents carry their content at a fraction of unit scale.
    # None: what the --init-from model was trained on (its file records it), else true.
    latent_sample: bool | None = None
    latent_cache: bool = False
    latent_cache_dir: str | None = None  # None: <train.output_dir>/latent_cache; one folder shares it
    lora: LoRAConfig | None = None  # set: train LoRA adapters on the frozen --init-from model
    dreambooth: DreamBoothConfig | None = None  # set: teach --init-from a subject from a few pictures

    def __post_init__(self):
        check_range("caption_dropout", self.caption_dropout, low=0, high=1)
        if self.scale_factor is not None:
            check_range("scale_factor", self.scale_factor, low=0, low_inclusive=False)


class LatentDiffusionTask(TrainingTask):
    """One AdamW optimizer over the U-Net (and a trainable text encoder), linear warm-up; with
    `adapters`, over those LoRA adapters only (the model stays frozen)."""

    def __init__(self, cfg: Stage2Config, model: LatentDiffusion, adapters: LoRAAdapters | None = None):
        self.cfg, self.model, self.adapters = cfg, model, adapters
        if adapters is not None:
            trainable = adapters.modules()
            text_trains = adapters.adapts("text_encoder")
        else:
            trainable = {"unet": model.unet}
            if any(p.requires_grad for p in model.text_encoder.parameters()):
                trainable["text_encoder"] = model.text_encoder
            text_trains = "text_encoder" in trainable
        self.trainable = nn.ModuleDict(trainable)
        self.text_contexts = ContextCache(model.encode_text, frozen=not text_trains)

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        self.model.to(self.device)
        self.trainable.train()
        if self.adapters is not None:
            self.adapters.train_parts()
        opt = adam([p for p in self.trainable.parameters() if p.requires_grad], decoupled_weight_decay=True,
                   lr=self.cfg.optim.lr, betas=tuple(self.cfg.optim.betas), weight_decay=self.cfg.optim.weight_decay)
        optim, total = self.cfg.optim, self.cfg.train.max_steps
        sched = warmup_then_decay(opt, optim.warmup_steps, optim.decay, total, optim.cooldown_fraction)
        self.optimizers = {"unet": accelerator.prepare(opt)}
        self.schedulers = {"unet": sched}
        self.modules = dict(self.trainable.items())
        # Each is called through its forward (train.shard=fsdp); adapter modules are not (their layers are).
        self.shardable = tuple(self.modules) if self.adapters is None else ()
        self.ema_target = self.trainable

    def latents(self, batch: dict, generators: Generators = None) -> torch.Tensor:
        """Scaled latents [B, C, h, w]: a fresh posterior sample (its mean for a model trained on the means,
        `LatentDiffusion.latent_sample`), from the cache or the images."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"], batch["latent_std"]
            if not self.model.latent_sample:
                return mean * self.model.scale_factor
            return (mean + std * randn_like(mean, generators)) * self.model.scale_factor
        return self.model.encode_images(batch["image"], sample=self.model.latent_sample, generator=generators)

    def generators(self, batch: dict, key_offset: int = 0) -> Generators:
        """Each sample's own random stream, so that neither batch size nor process count changes a draw."""
        if "sample_key" not in batch:
            return None
        return sample_generators(self.cfg.train.seed, batch["sample_key"] + key_offset)

    def parts(self, batch: dict) -> list[tuple[dict, Generators]]:
        """The batch and its generators; under DreamBooth's prior preservation its instance and class halves
        (the class half's streams keyed apart from the instance half's)."""
        dreambooth = self.cfg.dreambooth
        if dreambooth is None or not dreambooth.prior:
            return [(batch, self.generators(batch))]
        instances, classes = split_pairs(batch)
        return [(instances, self.generators(batch)), (classes, self.generators(batch, CLASS_KEY_OFFSET))]

    def training_step(self, batch, step):
        parts = self.parts(batch)
        latents, captions = [], []
        for part, part_generators in parts:  # each drawn from in this order: posterior, dropout, t, noise
            latents.append(self.latents(part, part_generators))
            captions += drop_captions(part["caption"], self.cfg.caption_dropout, part_generators)
        generators = None if parts[0][1] is None else [g for _, part_generators in parts for g in part_generators]
        z = torch.cat(latents) if len(latents) > 1 else latents[0]
        context = self.text_contexts(captions)
        terms = self.model.diffusion.training_losses(self.model, z, {"context": context}, generator=generators)
        if self.cfg.dreambooth is not None:  # instance loss + prior_loss_weight * class loss, both logged
            loss, extra = combine_losses(terms["loss"], len(latents[0]), self.cfg.dreambooth.prior_loss_weight)
        else:
            loss, extra = terms["loss"].mean(), {}
        logs = {"loss": loss.item(), "mse": terms["mse"].mean().item(), **extra}
        if "vlb" in terms:
            logs["vlb"] = terms["vlb"].mean().item()
        yield "unet", loss, logs

    @torch.no_grad()
    def images(self, batch, ema):
        """Samples of the fixed prompts with the EMA weights (when kept); training resumes from the live ones."""
        if not self.cfg.samples.prompts:
            return {}
        s = self.cfg.samples
        with ema_weights(self.trainable, ema), eval_mode(self.model):
            latents = generate_latents(self.model, s.prompts, seed=s.seed, sampler=s.sampler, steps=s.steps,
                                       guidance=s.guidance, height=self.cfg.data.size, width=self.cfg.data.size)
            images = self.model.decode_latents(latents)
        return {"samples": images}

    def extra_state(self) -> dict:
        return {"diffusion": self.model.diffusion.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if "diffusion" in state:
            self.model.diffusion.load_state_dict(state["diffusion"])


def main() -> None:
    parser = train_parser(__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--first-stage", help="autoencoder.safetensors written by train_stage1.py (train a new U-Net)")
    source.add_argument("--init-from", help="fine-tune a whole model: a model.safetensors of ours, or an original "
                                            "SD/LDM .ckpt/.safetensors with --original-config")
    parser.add_argument("--original-config", help="the original YAML (e.g. configs/sd/v1-inference.yaml) of --init-from")
    parser.add_argument("--ema", action="store_true", help="start from the EMA weights of an original --init-from file")
    args = parser.parse_args()
    if args.init_from:  # a wrong kind of file is named before the run's folder is touched
        check_model_file(args.init_from)
    else:
        read_autoencoder_config(args.first_stage)
    cfg = start_run(args, Stage2Config)
    if cfg.lora is not None and not args.init_from:
        raise ConfigError("lora: adapters train on an existing model: pass --init-from MODEL (a model.safetensors "
                          "or an original checkpoint) instead of --first-stage")
    if cfg.dreambooth is not None and not args.init_from:
        raise ConfigError("dreambooth: a subject is taught to an existing model: pass --init-from MODEL instead of "
                          "--first-stage")
    if cfg.dreambooth is not None:  # its pictures checked before the model loads
        check_dreambooth(cfg.dreambooth, cfg.data, cfg.train.batch_size)
    out = Path(cfg.train.output_dir)

    if args.init_from:
        model = load_model(args.init_from, args.original_config, use_ema=args.ema)
        log.info("fine-tuning %s: its own architecture replaces the config's model section", args.init_from)
        cfg.model = model.cfg
        if cfg.scale_factor is not None:
            model.scale_factor = cfg.scale_factor
        model.latent_sample = fine_tuning_latent_sample(model, cfg.latent_sample, args.init_from)
    else:
        autoencoder, ae_cfg, measured_scale = load_autoencoder(args.first_stage)
        scale = cfg.scale_factor if cfg.scale_factor is not None else measured_scale
        if cfg.model.unet.image_size is None:  # recorded so generate.py defaults to the training size
            cfg.model.unet.image_size = cfg.data.size // autoencoder.downsample_factor
        if cfg.latent_sample is False and cfg.scale_factor is None:
            scale = _means_scale_factor(autoencoder, cfg)
            log.info("latent_sample=false: scale factor %.5f from the posterior means (the file's: %.5f)",
                     scale, measured_scale)
        model = LatentDiffusion(cfg.model, autoencoder, ae_cfg, scale, latent_sample=cfg.latent_sample is not False)
    log.info("U-Net %.2f M parameters; latent scale factor %.5f", _millions(model.unet), model.scale_factor)

    cache_dir = cfg.latent_cache_dir or Path(cfg.train.output_dir) / "latent_cache"

    def cached(data):
        key = fingerprint(args.first_stage or args.init_from, cfg.data, data)
        return latent_cache(data, model.autoencoder, key, cache_dir, num_workers=cfg.train.num_workers)

    with main_process_first():  # caches are built once; the other processes then read them
        if cfg.dreambooth is not None:  # class images drawn by the base model, before any adapter is injected
            dataset = dreambooth_dataset(cfg.dreambooth, cfg.data, model, args.init_from, out, cfg.train.batch_size,
                                         cache=cached if cfg.latent_cache else None)
        else:
            dataset = build_dataset(cfg.data)
            dataset = cached(dataset) if cfg.latent_cache else dataset
    adapters = LoRAAdapters.inject(model, cfg.lora) if cfg.lora is not None else None
    if adapters is not None:
        log.info("LoRA rank %d on %s layers; %.3f M adapter parameters", cfg.lora.rank,
                 {k: len(v) for k, v in adapters.layers.items()}, _millions(nn.ModuleDict(adapters.modules())))
    task = LatentDiffusionTask(cfg, model, adapters)
    last = train(task, dataset, cfg.train, resume=args.resume, run_config=to_dict(cfg))
    if not is_main_process():
        return

    states = {k: m.state_dict() for k, m in task.trainable.items()}
    if cfg.train.shard != "none" and last is not None:  # sharded modules' full weights are in the last checkpoint
        states = {k: load_weights(last / f"{k}.safetensors") for k in states}
    if cfg.train.ema_decay and last is not None:  # sample with the EMA weights
        ema = load_weights(last / "ema.safetensors")
        states = {k: {n[len(k) + 1:]: v for n, v in ema.items() if n.startswith(k + ".")} for k in states}
    with export_errors(out):
        if adapters is not None:  # the base model is not written: only its sha256, in the LoRA's metadata
            adapters.save(out / "lora.safetensors", states, base_sha256=file_sha256(args.init_from),
                          metadata={"base": Path(args.init_from).name, "steps": task_steps(last)})
        else:
            model.save(out / "model.safetensors", unet_state=states["unet"], text_state=states.get("text_encoder"))
    log.info("wrote %s", out / ("lora.safetensors" if adapters is not None else "model.safetensors"))


def fine_tuning_latent_sample(model: LatentDiffusion, requested: bool | None, source: str) -> bool:
    """Whether fine-tuning `model` (loaded from `source`) trains on posterior samples: the config's
    `latent_sample` when set, else what the model was trained on."""
    if requested is None:
        return model.latent_sample
    if requested != model.latent_sample:
        kinds = ["samples" if v else "means" for v in (requested, model.latent_sample)]
        log.warning("latent_sample %s: fine-tuning %s on posterior %s, though it was trained on posterior %s",
                    str(requested).lower(), source, *kinds)
    return requested


def _means_scale_factor(autoencoder: nn.Module, cfg: Stage2Config, batches: int = 8) -> float:
    """1 / std of the posterior means over the first `batches` training batches."""
    data = build_dataset(cfg.data)
    images = (torch.stack([data[k]["image"] for k in range(i, min(i + cfg.train.batch_size, len(data)))])
              for i in range(0, min(len(data), batches * cfg.train.batch_size), cfg.train.batch_size))
    return measure_scale_factor(lambda x: autoencoder.encode_latents(x, sample=False), images)


def task_steps(checkpoint: Path | None) -> int:
    """The step a run's last checkpoint holds (0 without one)."""
    return int(checkpoint.name.removeprefix("step_")) if checkpoint is not None else 0


def _millions(module: nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


if __name__ == "__main__":
    run(main)
