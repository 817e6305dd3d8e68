"""LoRA files (kohya / A1111, diffusers / PEFT) read, written, applied unmerged and merged, extracted.

The oracle is diffusers: the same kohya file, with keys exactly as sd-scripts writes them, loaded by
diffusers into a `UNet2DConditionModel` holding our U-Net's weights gives the same output as ours.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from common.cli import run
from common.weights import CheckpointError
from conditioning import TextEncoderConfig
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.lora import (LoRA, LoRALayer, apply_lora, extract_lora, lora_from_state_dict, lora_state_dict, main,
                      merge_lora, model_parts, read_lora, write_lora)
from ldm.lora_keys import TargetTable, diffusers_unet_paths
from ldm.unet import UNetConfig, UNetModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from unet_speed import diffusers_config, diffusers_twin, randomize_zero_init  # noqa: E402

COMMON = dict(image_size=8, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False)
LAYOUTS = {  # SD 1.x-like: 1x1-conv proj_in, num_heads; SD 2.x-like: linear proj_in, num_head_channels
    "sd1": dict(COMMON, model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[1, 2],
                num_heads=4, context_dim=16),
    "sd2": dict(COMMON, model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=2, attention_resolutions=[2, 4],
                num_head_channels=8, context_dim=24, use_linear_in_transformer=True),
}
# sd-scripts adapts the layers of Transformer2DModel, and with conv_dim those of ResnetBlock2D,
# Downsample2D and Upsample2D; never conv_in, conv_out or the time embedding.
SD_SCRIPTS_TARGET = re.compile(r"lora_unet_(down|mid|up)_blocks?_.*(attentions|resnets|downsamplers|upsamplers)_")
SCALE = 0.7


def unet(layout: str) -> UNetModel:
    torch.manual_seed(0)
    model = UNetModel(**LAYOUTS[layout]).eval()
    randomize_zero_init(model)
    return model


def inputs(layout: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    return x, torch.tensor([3, 700]), torch.randn(2, 5, LAYOUTS[layout]["context_dim"], generator=g)


def random_lora(parts, seed: int, rank: int = 4, only=None, sd_scripts: bool = False) -> LoRA:
    """Random down / up for every adaptable layer (kohya name matching `only`); alphas differ by layer,
    or with `sd_scripts` as sd-scripts sets them: network_dim 4 / alpha 2 for linear layers and 1x1
    convs, conv_dim 2 / conv_alpha 1 for 3x3 convs (diffusers reads per-layer alphas of attention
    layers from kohya files as the most common alpha)."""
    g = torch.Generator().manual_seed(seed)
    lora = LoRA(source=f"random-{seed}")
    for i, (name, target) in enumerate(TargetTable(parts).targets.items()):
        if only is not None and not only.match(target.kohya):
            continue
        w = target.module.weight
        wide = w.ndim == 4 and w.shape[2:] != (1, 1)
        r = (2 if wide else 4) if sd_scripts else rank
        down = torch.randn(r, *w.shape[1:], generator=g) * 0.2
        up = torch.randn(w.shape[0], r, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.2
        lora.layers[name] = LoRALayer(down, up, (1.0 if wide else 2.0) if sd_scripts else float(1 + i % 3))
    return lora


@torch.no_grad()
def run_unet(model, layout: str) -> torch.Tensor:
    x, t, context = inputs(layout)
    return model(x, t, context)


def diffusers_with_lora(ours: UNetModel, layout: str, path: Path, scale: float):
    """diffusers' twin of `ours` with the LoRA file at `path` loaded by diffusers' own loader."""
    from diffusers import StableDiffusionPipeline
    twin = diffusers_twin(ours, LAYOUTS[layout])
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, unet=twin, adapter_name="test")
    twin.set_adapters(["test"], weights=[scale])
    return twin


@torch.no_grad()
def run_twin(twin, layout: str) -> torch.Tensor:
    x, t, context = inputs(layout)
    return twin(x, t, encoder_hidden_states=context).sample


def assert_close(got, want, changed_from=None):
    if changed_from is not None:  # the comparison means something: the LoRA moves the output
        assert (want - changed_from).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


# ----------------------------------------------------------------------------- key mapping


@pytest.mark.parametrize("layout", LAYOUTS)
def test_diffusers_paths_are_diffusers_own_checkpoint_conversion(layout):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    model = unet(layout)
    state = model.state_dict()
    theirs = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in state.items()},
                                         diffusers_config(LAYOUTS[layout]))
    paths = diffusers_unet_paths(model)
    assert len(paths) == sum(1 for k, v in theirs.items() if k.endswith(".weight") and v.ndim >= 2)
    for ours, path in paths.items():
        want = theirs[f"{path}.weight"]
        assert torch.equal(state[f"{ours}.weight"].reshape(want.shape), want), ours


# ----------------------------------------------------------------------------- diffusers oracle


@pytest.mark.parametrize("layout", LAYOUTS)
def test_kohya_file_as_sd_scripts_writes_it_matches_diffusers(layout, tmp_path):
    ours = unet(layout)
    lora = random_lora({"unet": ours}, seed=2, only=SD_SCRIPTS_TARGET, sd_scripts=True)
    tensors = lora_state_dict(lora, ours, "kohya")
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in tensors  # LoCon 3x3
    assert any(k.endswith("attn1_to_q.lora_up.weight") and "transformer_blocks_0" in k for k in tensors)
    save_file(tensors, str(tmp_path / "kohya.safetensors"))  # a plain file, as other tools write it

    base = run_unet(ours, layout)
    want = run_twin(diffusers_with_lora(ours, layout, tmp_path / "kohya.safetensors", SCALE), layout)
    read = read_lora(tmp_path / "kohya.safetensors", ours)
    assert read.layers.keys() == lora.layers.keys()
    with apply_lora(ours, read, SCALE):
        unmerged = run_unet(ours, layout)
    assert_close(run_unet(ours, layout), base)  # removed
    merge_lora(ours, read, SCALE)
    merged = run_unet(ours, layout)
    assert_close(unmerged, want, changed_from=base)
    assert_close(merged, want)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_our_peft_file_loads_in_diffusers(layout, tmp_path):
    ours = unet(layout)
    lora = random_lora({"unet": ours}, seed=3)
    write_lora(lora, tmp_path / "peft.safetensors", ours, format="peft")
    assert all(k.startswith("unet.") and ".lora_" in k for k in load_file(str(tmp_path / "peft.safetensors")))
    base = run_unet(ours, layout)
    want = run_twin(diffusers_with_lora(ours, layout, tmp_path / "peft.safetensors", SCALE), layout)
    with apply_lora(ours, lora, SCALE):
        assert_close(run_unet(ours, layout), want, changed_from=base)
    with apply_lora(ours, read_lora(tmp_path / "peft.safetensors", ours), SCALE):  # and back into ours
        assert_close(run_unet(ours, layout), want)


# ----------------------------------------------------------------------------- formats


def test_kohya_round_trip_and_compvis_names(tmp_path):
    ours = unet("sd1")
    lora = random_lora({"unet": ours}, seed=4)
    write_lora(lora, tmp_path / "a.safetensors", ours)
    back = read_lora(tmp_path / "a.safetensors", ours)
    # Tools that train on the CompVis U-Net write our own module paths, underscored.
    compvis = {f"lora_unet_{name[5:].replace('.', '_')}.{suffix}": value
               for name, layer in lora.layers.items()
               for suffix, value in (("lora_down.weight", layer.down), ("lora_up.weight", layer.up),
                                     ("alpha", torch.tensor(layer.alpha)))}
    save_file(compvis, str(tmp_path / "compvis.safetensors"))
    for read in (back, read_lora(tmp_path / "compvis.safetensors", ours)):
        assert read.layers.keys() == lora.layers.keys()
        for name, layer in lora.layers.items():
            assert torch.equal(read.layers[name].down, layer.down) and torch.equal(read.layers[name].up, layer.up)
            assert read.layers[name].alpha == layer.alpha


def test_peft_on_our_own_paths_and_old_diffusers_names():
    ours = unet("sd1")
    g = torch.Generator().manual_seed(5)
    down, up = torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
    name = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    out = "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0"
    old = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora"
    read = lora_from_state_dict({f"{old}.down.weight": down, f"{old}.up.weight": up}, ours)
    assert list(read.layers) == [f"unet.{out}"]
    for tensors in ({f"{name}.lora_A.default.weight": down, f"{name}.lora_B.default.weight": up},  # PEFT injected
                    {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up},
                    {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight": down,
                     "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.up.weight": up}):
        read = lora_from_state_dict(tensors, ours)
        assert list(read.layers) == [f"unet.{name}"] and read.layers[f"unet.{name}"].alpha == 2.0
        assert torch.equal(read.layers[f"unet.{name}"].up, up)


def test_sd1_conv_lora_fits_sd2_linear_projection_and_back():
    conv, linear = UNetModel(**dict(LAYOUTS["sd1"])), UNetModel(**dict(LAYOUTS["sd1"], use_linear_in_transformer=True))
    linear.load_state_dict({k: v.reshape(linear.state_dict()[k].shape) for k, v in conv.state_dict().items()})
    lora = random_lora({"unet": conv}, seed=6, only=re.compile(r".*proj_in"))
    moved = lora_from_state_dict(lora_state_dict(lora, conv), linear)
    assert next(iter(moved.layers.values())).down.ndim == 2
    for model, this in ((conv, lora), (linear, moved)):
        apply_lora(model, this, SCALE)
    assert_close(run_unet(linear, "sd1"), run_unet(conv, "sd1"))


# ----------------------------------------------------------------------------- applying


def test_stacked_loras_unmerged_equal_merged_in_every_mode():
    ours = unet("sd2")
    a, b = random_lora({"unet": ours}, seed=7), random_lora({"unet": ours}, seed=8, rank=2)
    base = run_unet(ours, "sd2")
    handles = [apply_lora(ours, a, SCALE), apply_lora(ours, b, -0.4)]
    unmerged = run_unet(ours, "sd2")
    x, t, context = inputs("sd2")
    with torch.inference_mode():
        assert_close(ours(x, t, context), unmerged)
    ours.train()
    trained = ours(x, t, context)
    trained.square().mean().backward()  # the base weights still train through the hooks
    assert ours.get_submodule("input_blocks.4.1.transformer_blocks.0.attn1.to_q").weight.grad.abs().sum() > 0
    ours.eval()
    assert_close(trained.detach(), unmerged)
    for handle in handles:
        handle.remove()
    assert_close(run_unet(ours, "sd2"), base)
    merge_lora(ours, a, SCALE)
    merge_lora(ours, b, -0.4)
    assert_close(run_unet(ours, "sd2"), unmerged, changed_from=base)


def test_merge_is_w_plus_scale_alpha_over_rank_up_down():
    ours = unet("sd1")
    name = "input_blocks.1.0.in_layers.2"  # a 3x3 conv
    conv = ours.get_submodule(name)
    g = torch.Generator().manual_seed(9)
    layer = LoRALayer(torch.randn(3, 32, 3, 3, generator=g), torch.randn(32, 3, 1, 1, generator=g), 1.5)
    before = conv.weight.detach().clone()
    merge_lora(ours, LoRA({f"unet.{name}": layer}), SCALE)
    expected = before + SCALE * 1.5 / 3 * torch.einsum("or,rikl->oikl", layer.up[:, :, 0, 0], layer.down)
    torch.testing.assert_close(conv.weight.detach(), expected, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- bad files


def test_unknown_keys_are_named_or_counted_when_partial(tmp_path):
    ours = unet("sd1")
    tensors = lora_state_dict(random_lora({"unet": ours}, seed=10, only=SD_SCRIPTS_TARGET), ours)
    tensors["lora_unet_not_a_layer.lora_down.weight"] = torch.zeros(2, 4)
    tensors["lora_unet_not_a_layer.lora_up.weight"] = torch.zeros(4, 2)
    save_file(tensors, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"2 of \d+ LoRA keys match no layer.*lora_unet_not_a_layer"):
        read_lora(tmp_path / "extra.safetensors", ours)
    with pytest.warns(UserWarning, match="2 of"):
        read = read_lora(tmp_path / "extra.safetensors", ours, allow_partial=True)
    assert len(read.layers) == (len(tensors) - 2) // 3


def test_a_lora_for_another_model_is_one_line_naming_key_and_shapes(tmp_path):
    small, other = unet("sd1"), UNetModel(**dict(LAYOUTS["sd1"], model_channels=64))
    write_lora(random_lora({"unet": other}, seed=11, only=SD_SCRIPTS_TARGET), tmp_path / "big.safetensors", other)
    with pytest.raises(CheckpointError) as info:
        read_lora(tmp_path / "big.safetensors", small)
    message = str(info.value)
    assert "\n" not in message and "lora_down.weight" in message
    assert ("lora_unet_down_blocks_0_resnets_0_time_emb_proj.lora_down.weight does not fit the model's "
            "unet.input_blocks.1.0.emb_layers.1: LoRA down (4, 256) / up (64, 4), model weight (32, 128)") in message


def test_mismatched_rank_or_width_is_an_error():
    ours = unet("sd1")
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    for up in (torch.zeros(32, 3), torch.zeros(33, 2)):
        with pytest.raises(CheckpointError, match=rf"{key}.lora_down.weight does not fit.*up \({up.shape[0]}, "):
            lora_from_state_dict({f"{key}.lora_down.weight": torch.zeros(2, 32), f"{key}.lora_up.weight": up}, ours)


def test_down_without_up_is_an_error():
    ours = unet("sd1")
    with pytest.raises(CheckpointError, match="attn1_to_q.lora_down.weight has no matching up"):
        lora_from_state_dict({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight":
                              torch.zeros(2, 32)}, ours)


# ----------------------------------------------------------------------------- extract and the command line


def low_rank_change(model, seed: int, rank: int) -> LoRA:
    """A rank-`rank` change of every adaptable layer, alpha = rank."""
    lora = random_lora(model_parts(model), seed, rank)
    for layer in lora.layers.values():
        layer.alpha = float(rank)
    return lora


def test_extracting_a_rank_r_difference_reproduces_the_tuned_model():
    base, tuned = unet("sd1"), unet("sd1")
    merge_lora(tuned, low_rank_change(tuned, seed=12, rank=3))
    lora = extract_lora(base, tuned, rank=3)
    assert {layer.rank for layer in lora.layers.values()} == {3}
    with apply_lora(base, lora):
        assert_close(run_unet(base, "sd1"), run_unet(tuned, "sd1"), changed_from=run_unet(unet("sd1"), "sd1"))
    lower = extract_lora(base, tuned, rank=2)  # a lower rank cannot carry it
    with apply_lora(base, lower):
        assert (run_unet(base, "sd1") - run_unet(tuned, "sd1")).abs().max() > 1e-3


def tiny_model(clip_folder: Path | None = None) -> LatentDiffusion:
    """A stage-2 model with a trainable text transformer, or a frozen CLIP from `clip_folder` (which
    the model file does not store: a LoRA merged into it must make it stored)."""
    torch.manual_seed(0)
    text = (TextEncoderConfig(kind="clip", name_or_path=str(clip_folder)) if clip_folder else
            TextEncoderConfig(kind="transformer", n_embed=16, n_layer=1, n_head=2, max_length=8))
    ae = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(
        double_z=True, z_channels=4, resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[]))
    cfg = LatentDiffusionConfig(
        unet=UNetConfig(**{k: v for k, v in LAYOUTS["sd1"].items() if k != "context_dim"}),
        text=text)
    model = LatentDiffusion(cfg, build_autoencoder(ae), ae, scale_factor=0.5).eval()
    randomize_zero_init(model.unet)
    return model


@torch.no_grad()
def run_model(model: LatentDiffusion) -> torch.Tensor:
    x, t, _ = inputs("sd1")
    return model(x, t, model.encode_text(["a red apple", "a cat"]))


def cli(argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        run(lambda: (main(argv), sys.exit(0)))
    return info.value.code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A random 2-layer transformers CLIPTextModel saved to a folder."""
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77)).save_pretrained(folder)
    return folder


def test_merge_and_extract_commands(tmp_path, capsys, tiny_clip):
    model = tiny_model(tiny_clip)
    model.save(tmp_path / "base.safetensors")
    lora = low_rank_change(model, seed=13, rank=2)
    kohya = lora_state_dict(lora, model, "kohya")
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya  # sd-scripts' names
    write_lora(lora, tmp_path / "lora.safetensors", model, format="peft")
    code, err = cli(["merge", str(tmp_path / "base.safetensors"), f"{tmp_path / 'lora.safetensors'}:0.5",
                     "--out", str(tmp_path / "merged.safetensors")], capsys)
    assert code == 0, err
    merged = LatentDiffusion.load(tmp_path / "merged.safetensors")
    base_out = run_model(model)
    with apply_lora(model, lora, 0.5):
        assert_close(run_model(merged), run_model(model), changed_from=base_out)

    code, err = cli(["extract", str(tmp_path / "base.safetensors"), str(tmp_path / "merged.safetensors"),
                     "--rank", "2", "--out", str(tmp_path / "extracted.safetensors")], capsys)
    assert code == 0, err
    with apply_lora(model, read_lora(tmp_path / "extracted.safetensors", model)):
        assert_close(run_model(model), run_model(merged))


@pytest.mark.parametrize("args, message", [
    (["merge", "{base}", "{tmp}/missing.safetensors", "--out", "{tmp}/m.safetensors"], "LoRA file not found"),
    (["merge", "{base}", "{tmp}/other.safetensors:0.5", "--out", "{tmp}/m.safetensors"], "does not fit the model"),
    (["merge", "{base}", "{tmp}/other.safetensors", "--out", "{tmp}/m.ckpt"], "give it a .safetensors name"),
    (["extract", "{base}", "{base}", "--rank", "0", "--out", "{tmp}/e.safetensors"], "--rank must be at least 1"),
    (["extract", "{base}", "{base}", "--rank", "2", "--out", "{tmp}/e.safetensors"], "nothing to extract"),
])
def test_command_errors_are_one_line(tmp_path, capsys, args, message):
    model = tiny_model()
    model.save(tmp_path / "base.safetensors")
    other = UNetModel(**dict(LAYOUTS["sd1"], model_channels=64))
    write_lora(random_lora({"unet": other}, seed=14, only=SD_SCRIPTS_TARGET), tmp_path / "other.safetensors", other)
    code, err = cli([a.format(base=tmp_path / "base.safetensors", tmp=tmp_path) for a in args], capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.safetensors").exists()


def test_kohya_text_encoder_keys_match_diffusers(tmp_path, tiny_clip):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel
    model = tiny_model(tiny_clip)
    lora = random_lora({"text_encoder": model.text_encoder}, seed=15, sd_scripts=True)
    save_file(lora_state_dict(lora, model, "kohya"), str(tmp_path / "te.safetensors"))
    theirs = CLIPTextModel.from_pretrained(tiny_clip).eval()
    state, alphas = StableDiffusionPipeline.lora_state_dict(str(tmp_path / "te.safetensors"))
    StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder=theirs, adapter_name="test")
    prompts = ["a red apple", ""]
    with torch.no_grad():
        base = model.encode_text(prompts)
        want = theirs(input_ids=model.text_encoder.tokenize(prompts)).last_hidden_state
        with apply_lora(model, read_lora(tmp_path / "te.safetensors", model)):
            assert_close(model.encode_text(prompts), want, changed_from=base)
