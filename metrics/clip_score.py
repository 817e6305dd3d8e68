"""CLIP score: how well images match their prompts according to an open_clip model.

score(image, prompt) = 100 * max(cos(E_image(image), E_text(prompt)), 0), averaged over pairs,
the definition torchmetrics' CLIPScore uses (Hessel et al. 2021 with weight 100 instead of 2.5).

Pretrained CLIP weights cannot be downloaded on an offline machine, and a random model would
give meaningless numbers, so the scorer is only built from weights that are already here: a
local file, or a tag (e.g. "openai") whose file is in the open_clip / Hugging Face cache. Nothing
is downloaded; otherwise `load_clip_scorer` raises FileNotFoundError saying what to provide and
`try_load_clip_scorer` returns (None, that message).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_ARCH = "ViT-B-32"
DEFAULT_WEIGHTS = "openai"
# open_clip's default weight file in a Hugging Face repository, and the safetensors twin it prefers.
HF_WEIGHTS_FILE = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS_FILE = "open_clip_model.safetensors"


class CLIPScorer:
    """Scores image-prompt pairs with an open_clip model (any `open_clip.CLIP`, trained or not).

    images: [N, 3, H, W] in [-1, 1]; resized so the short side matches the model's input size
    (bicubic, antialiased), centre-cropped, then normalised with `mean` / `std`.
    """

    def __init__(self, model: nn.Module, tokenizer, mean: Sequence[float], std: Sequence[float],
                 device: str | torch.device = "cpu", batch_size: int = 64):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.batch_size = batch_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> normalised model input [N, 3, h, w] (on the CPU)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP score expects RGB images [N, 3, H, W], got shape {tuple(images.shape)}")
        x = ((images.float().cpu() + 1) / 2).clamp(0, 1)
        target_h, target_w = self.image_size
        scale = max(target_h / x.shape[-2], target_w / x.shape[-1])
        resized = (max(target_h, round(x.shape[-2] * scale)), max(target_w, round(x.shape[-1] * scale)))
        if resized != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=resized, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (resized[0] - target_h) // 2, (resized[1] - target_w) // 2
        x = x[..., top:top + target_h, left:left + target_w]
        return (x - self.mean) / self.std

    @torch.inference_mode()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [-1, 1] -> unit-norm embeddings [N, D] (float32, CPU)."""
        parts = [self.model.encode_image(self.preprocess(chunk).to(self.device)).float()
                 for chunk in images.split(self.batch_size)]
        return F.normalize(torch.cat(parts), dim=-1).cpu()

    @torch.inference_mode()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """N prompts -> unit-norm embeddings [N, D] (float32, CPU)."""
        prompts = list(prompts)
        parts = [self.model.encode_text(self.tokenizer(prompts[i:i + self.batch_size]).to(self.device)).float()
                 for i in range(0, len(prompts), self.batch_size)]
        return F.normalize(torch.cat(parts), dim=-1).cpu()

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-pair CLIP scores [N]: 100 * max(cosine similarity, 0)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return 100 * cosine.clamp(min=0)

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> float:
        """Mean CLIP score over the pairs."""
        return float(self.scores(images, prompts).mean())


def cached_weights_file(arch: str, tag: str, cache_dir: str | Path | None = None) -> Path | None:
    """The local file of open_clip weight tag `tag` for `arch` if it was downloaded before, else None.

    Looks where open_clip puts it (the Hugging Face hub cache, or ~/.cache/clip for URL
    downloads; `cache_dir` replaces both, as open_clip's own cache_dir argument does) without
    any network access.
    """
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if cfg.get("file"):
        return Path(cfg["file"]) if Path(cfg["file"]).is_file() else None
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        # "org/repo/" means open_clip's default file name; "org/repo/file.bin" names the file.
        repo_id, filename = os.path.split(cfg["hf_hub"])
        filename = filename or HF_WEIGHTS_FILE
        stem, suffix = os.path.splitext(filename)
        safe_twin = HF_SAFE_WEIGHTS_FILE if filename == HF_WEIGHTS_FILE else stem + ".safetensors"
        for name in dict.fromkeys((safe_twin, filename) if suffix in (".bin", ".pth") else (filename,)):
            found = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
            if isinstance(found, str) and Path(found).is_file():
                return Path(found)
    if cfg.get("url"):
        candidate = Path(cache_dir or "~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
        if candidate.is_file():
            return candidate
    return None


def load_clip_scorer(arch: str = DEFAULT_ARCH, weights: str = DEFAULT_WEIGHTS, device: str | torch.device = "cpu",
                     cache_dir: str | Path | None = None) -> CLIPScorer:
    """A CLIPScorer for open_clip architecture `arch` with `weights`: a checkpoint file, or a weight
    tag of `arch` whose file is already cached. Raises FileNotFoundError when the weights are not here."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.pretrained import get_pretrained_cfg

    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    path = Path(weights).expanduser()
    tag_cfg: dict = {}
    if not path.is_file():
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if weights not in tags:
            raise FileNotFoundError(f"CLIP score: {weights!r} is neither a weights file nor an open_clip tag of {arch} "
                                    f"(tags: {tags})")
        tag_cfg = get_pretrained_cfg(arch, weights)
        cached = cached_weights_file(arch, weights, cache_dir)
        if cached is None:
            raise FileNotFoundError(
                f"CLIP score needs the open_clip weights '{weights}' for {arch}, which are not in the local cache "
                f"(nothing is downloaded here); run once with network access, or pass a checkpoint file"
            )
        path = cached
    model = open_clip.create_model(arch, pretrained=str(path), force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)))
    mean = tag_cfg.get("mean") or OPENAI_DATASET_MEAN
    std = tag_cfg.get("std") or OPENAI_DATASET_STD
    return CLIPScorer(model, open_clip.get_tokenizer(arch), mean, std, device)


def try_load_clip_scorer(arch: str = DEFAULT_ARCH, weights: str = DEFAULT_WEIGHTS, device: str | torch.device = "cpu",
                         cache_dir: str | Path | None = None) -> tuple[CLIPScorer | None, str | None]:
    """(scorer, None) when the weights are available, else (None, the reason)."""
    try:
        return load_clip_scorer(arch, weights, device, cache_dir), None
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return None, str(e)
