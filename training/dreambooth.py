"""DreamBooth (Ruiz et al. 2023) for train_stage2.py: teach a model one subject from a few pictures.

A `dreambooth:` section replaces the data set by the 3-20 pictures in `instance_dir`, all captioned
with `instance_prompt`, a rare token bound to the subject ("a sks teapot"). With prior preservation
(`class_prompt` set and `prior_loss_weight` > 0) the base model first draws `num_class_images`
pictures for `class_prompt` ("a teapot"), cached on disk (`ldm.class_images`), and every batch pairs
each subject example with one of them (`data.dreambooth.PriorPairs`). The loss is

    instance MSE + prior_loss_weight * class MSE

each the mean of the per-example diffusion loss over its half of the batch; both terms are logged
(`instance_loss`, `class_loss`). The class half keeps the model drawing the class as before, so the rare
token takes the subject without the class prompt drifting to it. Without prior preservation the run is
exactly a fine-tune on the instance pictures under their prompt. It works with a `lora:` section
(adapters only) and without (the whole U-Net), and with everything else of the shared loop.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from common.config import ConfigError, at_least, check_range
from common.weights import file_sha256
from data import DataConfig
from data.dreambooth import InstanceImages, PriorPairs, instance_image_files
from data.folder import FolderDataset
from ldm.class_images import ClassImageSpec, class_images
from ldm.samplers import SAMPLERS
from training.ema import eval_mode

log = logging.getLogger(__name__)

# The class half's random draws (posterior, caption dropout, t, noise) come from generators keyed by the
# sample's key plus this: the loop's keys (epoch * N + index, or epoch << 40 for streams) stay far below it.
CLASS_KEY_OFFSET = 1 << 62


@dataclass
class DreamBoothConfig:
    """The `dreambooth:` section of train_stage2.py (needs --init-from: the model to teach the subject).

    instance_dir: folder with 3-20 pictures of the subject, each at least data.size on its shorter side
        (data.size / crop / flip / seed shape them; data.source and path are not used).
    instance_prompt: their caption, with a rare token for the subject, e.g. "a sks teapot".
    class_prompt: the subject's class, e.g. "a teapot"; null turns prior preservation off.
    num_class_images: class pictures the base model draws for it (once; see class_dir).
    prior_loss_weight: lambda, the class term's weight; 0 turns prior preservation off.
    class_dir: where the class pictures are kept, in a subfolder per base model, prompt, count and
        sampling settings; runs given the same folder share them. null: <train.output_dir>/class_images.
    class_sampler / class_steps / class_guidance / class_seed / class_batch_size: how they are drawn
        (image i from seed class_seed + i; generate.py's defaults).
    instance_repeats: the epoch is max(instance images x repeats, num_class_images) pairs; raise it
        so that one batch fits when there are few of both.
    """

    instance_dir: str
    instance_prompt: str
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_dir: str | None = None
    class_sampler: str = "dpmpp-2m"
    class_steps: int = 25
    class_guidance: float = 3.0
    class_seed: int = 0
    class_batch_size: int = 16
    instance_repeats: int = 1

    def __post_init__(self):
        if not isinstance(self.instance_prompt, str) or not self.instance_prompt.strip():
            raise ValueError("instance_prompt has no text: give the subject's caption with its rare token, "
                             "e.g. 'a sks teapot'")
        if self.class_prompt is not None:
            if not isinstance(self.class_prompt, str) or not self.class_prompt.strip():
                raise ValueError("class_prompt has no text: give the subject's class, e.g. 'a teapot', or null "
                                 "for no prior preservation")
            if self.class_prompt.strip() == self.instance_prompt.strip():
                raise ValueError(f"class_prompt is the instance prompt {self.instance_prompt!r}: the class prompt "
                                 "names the class without the rare token, e.g. 'a teapot'")
        at_least("num_class_images", self.num_class_images, 1)
        check_range("prior_loss_weight", self.prior_loss_weight, low=0)
        if self.class_sampler not in SAMPLERS:
            raise ValueError(f"class_sampler must be one of {list(SAMPLERS)}, got {self.class_sampler!r}")
        at_least("class_steps", self.class_steps, 1)
        check_range("class_guidance", self.class_guidance, low=0, high=100)
        at_least("class_seed", self.class_seed, 0)
        at_least("class_batch_size", self.class_batch_size, 1)
        at_least("instance_repeats", self.instance_repeats, 1)

    @property
    def prior(self) -> bool:
        """Whether prior preservation is on: a class prompt and a positive weight."""
        return self.class_prompt is not None and self.prior_loss_weight > 0


def check_dreambooth(cfg: DreamBoothConfig, data: DataConfig, batch_size: int) -> int:
    """Check the instance folder (see `data.dreambooth.instance_image_files`) and that one batch fits in
    an epoch, before any model loads; return the epoch's length in examples (pairs under prior
    preservation). Raises FileNotFoundError / ValueError / ConfigError with one line naming the problem."""
    count = len(instance_image_files(cfg.instance_dir, data.size))
    length = max(count * cfg.instance_repeats, cfg.num_class_images if cfg.prior else 0)
    if length < batch_size:
        raise ConfigError(f"dreambooth: {count} instance images x instance_repeats {cfg.instance_repeats} make "
                          f"{length} examples, fewer than train.batch_size {batch_size}: raise "
                          f"dreambooth.instance_repeats to at least {-(-batch_size // count)}")
    return length


def dreambooth_dataset(cfg: DreamBoothConfig, data: DataConfig, model, model_file: str | Path, output_dir: str | Path,
                       batch_size: int, cache=None) -> Dataset:
    """The run's training set: the instance pictures, paired with class pictures under prior preservation
    (drawn by `model`, the unchanged base read from `model_file`, unless cached).

    `cache(dataset)`, when given, turns a part into its latent cache (train_stage2's latent_cache).
    """
    length = check_dreambooth(cfg, data, batch_size)
    instances = InstanceImages(cfg.instance_dir, cfg.instance_prompt, data)
    classes = None
    if cfg.prior:
        spec = ClassImageSpec(model_sha256=file_sha256(model_file), prompt=cfg.class_prompt,
                              count=cfg.num_class_images, size=data.size, sampler=cfg.class_sampler,
                              steps=cfg.class_steps, guidance=cfg.class_guidance, seed=cfg.class_seed)
        root = cfg.class_dir or Path(output_dir) / "class_images"
        with eval_mode(model):  # the base draws as it samples; each submodule's own flag comes back after
            folder = class_images(model, spec, root, batch_size=cfg.class_batch_size)
        classes = FolderDataset(DataConfig(source="folder", path=str(folder), size=data.size, crop="center",
                                           flip=data.flip, seed=data.seed))
    elif cfg.class_prompt is not None:
        log.info("dreambooth: prior_loss_weight 0, so no class images: a plain fine-tune on the instance pictures")
    if cache is not None:
        instances = cache(instances)
        classes = cache(classes) if classes is not None else None
    return PriorPairs(instances, classes, length)


def combine_losses(per_example: torch.Tensor, instances: int, weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The DreamBooth loss of a batch whose first `instances` examples are the subject's and the rest
    the class's: mean(instance losses) + weight * mean(class losses). per_example: [B] -> scalar, logs."""
    instance = per_example[:instances].mean()
    logs = {"instance_loss": instance.item()}
    if per_example.shape[0] == instances:
        return instance, logs
    prior = per_example[instances:].mean()
    logs["class_loss"] = prior.item()
    return instance + weight * prior, logs
