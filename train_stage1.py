"""Stage 1: train a KL- or VQ-regularised autoencoder with L1 + LPIPS + a PatchGAN discriminator.

    python train_stage1.py --config configs/autoencoder/kl-f4-emoji64.yaml [--resume] [key=value ...]
    # fine-tune the decoder of a trained autoencoder (a stage-1 or stage-2 file); its latent space stays
    python train_stage1.py --config ... init_from=models/default/model.safetensors train_part=decoder

Writes checkpoints under train.output_dir and, at the end, `autoencoder.safetensors`: the weights
(EMA ones when train.ema_decay is set) with the model config and the measured latent scale factor
in its metadata, which stage 2 reads.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import DataLoader, IterableDataset

from autoencoder import build_autoencoder, build_autoencoder_loss, measure_scale_factor
from autoencoder.config import AutoencoderConfig, AutoencoderLossConfig
from autoencoder.kl import AutoencoderKL
from autoencoder.model_file import load_autoencoder, save_autoencoder
from common.cli import run
from common.config import at_least, check_range, to_dict
from common.randomness import sample_generators
from common.weights import load_weights
from data import DataConfig, build_dataset
from training import TrainConfig, TrainingTask, ema_weights, train
from training.cli import check_adam, export_errors, is_main_process, start_run, train_parser
from training.optimizers import LRDecay, adam, warmup_then_decay

log = logging.getLogger("train_stage1")


@dataclass
class OptimConfig:
    lr: float = 4.5e-6
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    warmup_steps: int = 0
    decay: LRDecay = "constant"  # cosine / cooldown: to 0 at train.max_steps (both optimizers)
    cooldown_fraction: float = 0.2  # decay "cooldown": the last part of train.max_steps, lr linearly to 0

    def __post_init__(self):
        check_adam(self.lr, self.betas)
        at_least("warmup_steps", self.warmup_steps, 0)
        check_range("cooldown_fraction", self.cooldown_fraction, low=0, high=1, low_inclusive=False)


@dataclass
class Stage1Config:
    model: AutoencoderConfig
    loss: AutoencoderLossConfig
    data: DataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scale_factor_batches: int = 8  # batches of latents to measure 1/std over at the end
    init_from: str | None = None  # start from this autoencoder (a stage-1 file, or a stage-2 file's)
    # "decoder": train only what maps latents to images; the encoder, the latent space and its scale factor
    # stay the init_from file's, so a stage 2 trained on that file still fits the result.
    train_part: Literal["all", "decoder"] = "all"

    def __post_init__(self):
        at_least("scale_factor_batches", self.scale_factor_batches, 1)
        if self.train_part == "decoder" and self.init_from is None:
            raise ValueError("train_part=decoder needs init_from: the trained autoencoder whose decoder to fine-tune")


class AutoencoderTask(TrainingTask):
    """Generator step (autoencoder + learned logvar), then discriminator step, per batch."""

    def __init__(self, cfg: Stage1Config):
        self.cfg = cfg
        self.autoencoder = build_autoencoder(cfg.model)
        self.loss = build_autoencoder_loss(cfg.loss)
        self.init_scale_factor = _init_from(self.autoencoder, cfg) if cfg.init_from else None
        self.trained = self.autoencoder.decoder_parameters() if cfg.train_part == "decoder" \
            else list(self.autoencoder.parameters())
        trained = {id(p) for p in self.trained}
        for p in self.autoencoder.parameters():  # frozen ones get no gradients: no encoder backward
            p.requires_grad_(id(p) in trained)

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        if accelerator.num_processes > 1 and self.device.type == "cuda":
            # The PatchGAN's batch statistics over the global batch, as one process has them (same
            # parameter names; torch has no SyncBatchNorm on CPUs, where each process uses its own batch).
            self.loss = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.loss)
        self.autoencoder.to(self.device).train(self.cfg.train_part == "all")
        if self.cfg.train_part == "decoder":  # a VQ codebook's EMA and dead-code updates stay off with the encoder
            self.autoencoder.decoder.train()
            self.autoencoder.post_quant_conv.train()
        self.loss.to(self.device).train()
        betas = tuple(self.cfg.optim.betas)
        # The original left the learned logvar out of the optimizer; here it trains with the autoencoder.
        opt_ae = adam([*self.trained, *self.loss.autoencoder_parameters()], lr=self.cfg.optim.lr,
                      betas=betas)
        opt_disc = adam(self.loss.discriminator_parameters(), lr=self.cfg.optim.lr, betas=betas)
        optim, total = self.cfg.optim, self.cfg.train.max_steps
        self.schedulers = {name: warmup_then_decay(opt, optim.warmup_steps, optim.decay, total, optim.cooldown_fraction)
                           for name, opt in (("autoencoder", opt_ae), ("discriminator", opt_disc))}
        opt_ae, opt_disc = accelerator.prepare(opt_ae, opt_disc)
        self.modules = {"autoencoder": self.autoencoder, "loss": self.loss}
        self.optimizers = {"autoencoder": opt_ae, "discriminator": opt_disc}
        self.ema_target = self.autoencoder

    def training_step(self, batch, step):
        x = batch["image"]
        if isinstance(self.autoencoder, AutoencoderKL) and "sample_key" in batch:
            # Each sample's posterior draw from its own stream (common.randomness): any process count alike.
            generators = sample_generators(self.cfg.train.seed, batch["sample_key"])
            (x_hat, reg), vq_info = self.autoencoder(x, generator=generators), []
        else:
            x_hat, reg, *vq_info = self.autoencoder(x)  # KL: (x_hat, posterior); VQ: (x_hat, q_loss, info)
        loss, logs = self.loss.generator_loss(x, x_hat, reg, step, self.autoencoder.get_last_layer())
        if vq_info:
            logs.update(codebook_usage=float(vq_info[0].usage), perplexity=float(vq_info[0].perplexity))
        yield "autoencoder", loss, logs
        if self.loss.discriminator_active(step):
            d_loss, d_logs = self.loss.discriminator_loss(x, x_hat.detach(), step)
            yield "discriminator", d_loss, d_logs

    @torch.no_grad()
    def images(self, batch, ema):
        """Up to 8 images over their reconstructions with the EMA weights (when kept)."""
        x = batch["image"][:8]
        with ema_weights(self.autoencoder, ema):
            x_hat = self.autoencoder(x)[0]
        return {"reconstruction": torch.cat([x, x_hat])}


def main() -> None:
    parser = train_parser(__doc__.splitlines()[0])
    args = parser.parse_args()
    cfg = start_run(args, Stage1Config)
    out = Path(cfg.train.output_dir)

    dataset = build_dataset(cfg.data)
    task = AutoencoderTask(cfg)
    last = train(task, dataset, cfg.train, resume=args.resume, run_config=to_dict(cfg))
    if not is_main_process():
        return

    model = task.autoencoder
    if cfg.train.ema_decay and last is not None:  # export the EMA weights
        model.load_state_dict(load_weights(last / "ema.safetensors"))
    model.eval()
    if cfg.train_part == "decoder":
        scale = task.init_scale_factor  # the same encoder: the latents a stage 2 was trained on
    else:
        scale = _measured_scale_factor(model, dataset, cfg)
    with export_errors(out):
        save_autoencoder(model, cfg.model, out / "autoencoder.safetensors", scale_factor=scale)
    log.info("latent scale factor %.5f; wrote %s", scale, out / "autoencoder.safetensors")


def _init_from(model: torch.nn.Module, cfg: Stage1Config) -> float:
    """Load cfg.init_from's autoencoder weights into `model` (built from cfg.model); its scale factor."""
    source, source_cfg, scale = load_autoencoder(cfg.init_from)
    if source_cfg != cfg.model:
        ours, theirs = _flat(asdict(cfg.model)), _flat(asdict(source_cfg))
        differ = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
        raise ValueError(f"init_from {cfg.init_from} holds another autoencoder than the config's model: "
                         + ", ".join(f"model.{k} is {theirs.get(k)!r} there, {ours.get(k)!r} here" for k in differ))
    model.load_state_dict(source.state_dict())
    return scale


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


def _measured_scale_factor(model, dataset, cfg: Stage1Config) -> float:
    """1 / std of the latents of a few training batches (of the posterior's samples for a KL model)."""
    batches = _scale_batches(dataset, cfg, next(model.parameters()).device)
    g = torch.Generator(next(model.parameters()).device).manual_seed(cfg.train.seed)
    scale = measure_scale_factor(lambda x: model.encode_latents(x, sample=True, generator=g), batches)
    if cfg.model.kind == "kl":  # posterior noise that outweighs the means would shrink stage 2's content
        means_scale = measure_scale_factor(lambda x: model.encode_latents(x, sample=False),
                                           _scale_batches(dataset, cfg, next(model.parameters()).device))
        if scale < 0.5 * means_scale:
            log.warning("the posterior's noise dominates the latents' std (scale factor %.4g from samples, %.4g "
                        "from the means): a few latents have a huge variance; train stage 2 with latent_sample=false",
                        scale, means_scale)
    return scale


def _scale_batches(dataset, cfg: Stage1Config, device):
    """A fixed, shuffled selection of training batches to measure the latent std on."""
    shuffle = not isinstance(dataset, IterableDataset)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=shuffle,
                        generator=torch.Generator().manual_seed(cfg.train.seed), num_workers=cfg.train.num_workers)
    for i, batch in enumerate(loader):
        if i == cfg.scale_factor_batches:
            return
        yield batch["image"].to(device)


if __name__ == "__main__":
    run(main)
