"""Weights read straight in the inference dtype, and what generating lets go of before decoding (issue 23 item 4).

The reference is the loader as it was before: load in the file's dtype (or float32), then cast with
`ldm.precision.cast_for_inference`. Reading in the dtype must give the same tensors bit for bit, from
`.safetensors` and `.ckpt` files, fp32 and fp16 ones, for the U-Net and ControlNets, and through
`Pipeline`. The memory itself: a U-Net converted on load is never read through the file's mapping (the
mapping's resident pages, from /proc/self/smaps); a decoder level lets its input go after its first block
and a ResnetBlock its first conv's output before its second conv (weak references); dropping the U-Net's
phase-weight caches before decoding leaves the images' bytes unchanged. Tiny models, random weights.
"""
from __future__ import annotations

import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from common.allocator import trim_heap
from common import tensor_file
from common.tensor_file import TensorFile
from layers import GroupNorm32
from ldm import Pipeline
from ldm import pipeline as pipeline_module
from ldm.controlnet import ControlNet, load_controlnet, save_controlnet
from ldm.original_format import export_original, load_original_model
from ldm.precision import cast_for_inference
from test_original_format import SIZE, tiny_model

TARGETS = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The tiny model as original files (fp32 and fp16 .safetensors, fp32 .ckpt) and a ControlNet on
    it (ours, and as an original .pth and .safetensors with control_model.* keys)."""
    folder = tmp_path_factory.mktemp("load-dtype")
    model = tiny_model()
    config = export_original(model, folder / "fp32.safetensors")
    export_original(model, folder / "fp16.safetensors", dtype=torch.float16, config_path=folder / "fp16.yaml")
    torch.save({"state_dict": load_file(str(folder / "fp32.safetensors"))}, folder / "fp32.ckpt")
    net = ControlNet.from_unet(model.unet, latent_factor=2)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # no zero convs left: every weight means something
    save_controlnet(folder / "controlnet.safetensors", net)
    torch.save({f"control_model.{k}": v for k, v in net.state_dict().items()}, folder / "control_v11.pth")
    original = {f"control_model.{k}": v.half() for k, v in net.state_dict().items()}
    torch.save(original, folder / "control_fp16.pth")
    return {"fp32": folder / "fp32.safetensors", "fp16": folder / "fp16.safetensors", "ckpt": folder / "fp32.ckpt",
            "config": config, "controlnet": folder / "controlnet.safetensors",
            "control_v11": folder / "control_v11.pth", "control_fp16": folder / "control_fp16.pth"}


def assert_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes and bits (NaN-free random weights, so torch.equal is bit equality here)."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert torch.equal(got[key], value), key


def cast_reference(path: Path, config: Path, dtype: torch.dtype, file_dtype: torch.dtype | None):
    """The model as it loaded before: everything in `file_dtype` (None: the file's), then the U-Net cast."""
    model = load_original_model(path, config, dtype=file_dtype)
    cast_for_inference([model.unet], dtype)
    return model


@pytest.mark.parametrize("source", ["fp32", "fp16", "ckpt"])
@pytest.mark.parametrize("dtype", TARGETS)
def test_unet_read_in_the_dtype_is_load_then_cast(files, source, dtype):
    read = load_original_model(files[source], files["config"], unet_dtype=dtype)
    reference = cast_reference(files[source], files["config"], dtype, torch.float32)
    assert_identical(read.unet.state_dict(), reference.unet.state_dict())
    assert_identical(read.state_dict(), reference.state_dict())  # the text encoder and autoencoder too
    dtypes = {v.dtype for v in read.unet.state_dict().values() if v.is_floating_point()}
    assert dtypes == {dtype, torch.float32}  # GroupNorms stay float32


def test_fp16_file_read_as_float32_is_load_then_cast(files):
    """The autoencoder and text encoder of an fp16 file (float32 in memory) take the plain-read path too."""
    read = load_original_model(files["fp16"], files["config"])
    as_stored = load_original_model(files["fp16"], files["config"], dtype=None)
    assert {v.dtype for v in as_stored.autoencoder.state_dict().values()} == {torch.float16}
    want = {k: v.float() for k, v in as_stored.state_dict().items()}
    assert_identical(read.state_dict(), want)


@pytest.mark.parametrize("chunk", [tensor_file.CHUNK_BYTES, 96])
def test_tensor_file_reads_every_dtype_pair_as_a_cast(files, chunk, monkeypatch):
    monkeypatch.setattr(tensor_file, "CHUNK_BYTES", chunk)  # 96 bytes: most tensors take many reads
    tensors = TensorFile(files["fp32"])
    mapped = load_file(str(files["fp32"]))
    for key in list(mapped)[:40]:
        for dtype in TARGETS:
            assert torch.equal(tensors.get(key, dtype), mapped[key].to(dtype)), (key, dtype)


@pytest.mark.parametrize("source", ["controlnet", "control_v11", "control_fp16"])
@pytest.mark.parametrize("dtype", TARGETS)
def test_controlnet_read_in_the_dtype_is_load_then_cast(files, source, dtype):
    unet = load_original_model(files["fp32"], files["config"]).unet
    read = load_controlnet(files[source], unet=unet, latent_factor=2, dtype=dtype).net
    reference = load_controlnet(files[source], unet=unet, latent_factor=2).net
    assert {v.dtype for v in reference.state_dict().values()} == {torch.float32}  # float32 whatever the file
    cast_for_inference([reference], dtype)
    assert_identical(read.state_dict(), reference.state_dict())


def test_pipeline_loads_unet_and_controlnet_in_the_dtype(files):
    pipe = Pipeline.from_file(files["fp16"], files["config"], controlnets=[files["controlnet"]], dtype="bf16")
    reference = cast_reference(files["fp16"], files["config"], torch.bfloat16, torch.float32)
    assert_identical(pipe.model.state_dict(), reference.state_dict())
    net = load_controlnet(files["controlnet"]).net
    cast_for_inference([net], torch.bfloat16)
    assert_identical(pipe.controlnets[0][1].net.state_dict(), net.state_dict())


# -- memory ------------------------------------------------------------------------------------------------

def mapped_resident_bytes(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
            inside = line.endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1]) * 1024
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc/self/smaps")
def test_a_unet_cast_on_load_is_not_read_through_the_mapping(tmp_path):
    """Cast through the mapping, the float32 pages stay resident for as long as any view of the file lives
    (here the float32 autoencoder's); read with plain reads, they never enter the process."""
    model = tiny_model(channels=128)  # a U-Net of about 20 MB: far above the kernel's fault-around
    path = tmp_path / "wide.safetensors"
    config = export_original(model, path)
    unet_bytes = sum(v.numel() * 4 for v in model.unet.state_dict().values())
    assert unet_bytes > 10 * 2**20
    read = load_original_model(path, config, unet_dtype=torch.bfloat16)
    assert mapped_resident_bytes(path) < unet_bytes / 8
    old_way = cast_reference(path, config, torch.bfloat16, torch.float32)
    assert mapped_resident_bytes(path) > unet_bytes  # the measure sees the float32 pages when they are there
    del read, old_way


def test_decoder_lets_go_of_a_level_input_and_of_conv1_output():
    decoder = tiny_model().autoencoder.decoder
    level = decoder.up[0]  # full resolution, run last, two blocks or more
    assert len(level.block) >= 2
    seen: dict[str, weakref.ref] = {}
    alive: dict[str, bool] = {}
    level.block[0].register_forward_pre_hook(lambda m, args: seen.update(level_input=weakref.ref(args[0])))
    level.block[1].register_forward_pre_hook(lambda m, args: alive.update(level_input=seen["level_input"]() is not None))
    block = level.block[1]
    block.conv1.register_forward_hook(lambda m, args, out: seen.update(conv1=weakref.ref(out)))
    block.conv2.register_forward_pre_hook(lambda m, args: alive.update(conv1=seen["conv1"]() is not None))
    with torch.no_grad():
        decoder(torch.randn(1, 4, SIZE // 2, SIZE // 2))
    assert alive == {"level_input": False, "conv1": False}


def test_dropping_phase_caches_before_decoding_keeps_the_images(files, monkeypatch):
    pipe = Pipeline.from_file(files["fp32"], files["config"])
    draw = dict(steps=3, guidance=3.0, seed=5, num_images=2, size=SIZE)
    released = []
    kept = pipe._before_decoding
    monkeypatch.setattr(pipe, "_before_decoding", lambda: released.append(
        any(hasattr(m, "_phase_cache") for m in pipe.model.unet.modules())) or kept())
    first = [np.asarray(image) for image in pipe("a red apple", **draw)]
    assert released == [True]  # sampling had cached phase weights; they were dropped here
    assert not any(hasattr(m, "_phase_cache") for m in pipe.model.unet.modules())
    again = [np.asarray(image) for image in pipe("a red apple", **draw)]  # the cache computed anew
    monkeypatch.setattr(pipe, "_before_decoding", lambda: None)
    never = [np.asarray(image) for image in pipe("a red apple", **draw)]
    for a, b, c in zip(first, again, never):
        assert np.array_equal(a, b) and np.array_equal(a, c)
    assert isinstance(trim_heap(), bool)


def test_cast_keeps_group_norm_parameters_exact():
    """GroupNorms stay float32 as they were, not rounded to bf16 and back (as `network.to(dtype)` then
    `.float()` would); every other weight is the float32 one rounded to bf16."""
    unet = tiny_model().unet
    norms = {f"{name}.{key}" for name, m in unet.named_modules() if isinstance(m, GroupNorm32)
             for key in m.state_dict()}
    assert norms
    with torch.no_grad():  # trained-like scales and shifts (initialised at 1 and 0, which bf16 holds exactly)
        for key, value in unet.state_dict().items():
            if key in norms:
                value.add_(torch.randn_like(value) * 0.1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    cast_for_inference([unet], torch.bfloat16)
    for key, value in unet.state_dict().items():
        want = before[key] if key in norms else before[key].to(torch.bfloat16)
        assert value.dtype == want.dtype and torch.equal(value, want), key
        if key in norms:
            assert not torch.equal(value, before[key].to(torch.bfloat16).float()), key  # the test can tell


def test_pipeline_trims_the_heap_once_per_batch_before_decoding(files, monkeypatch):
    pipe = Pipeline.from_file(files["fp32"], files["config"])
    events = []
    monkeypatch.setattr(pipeline_module, "trim_heap", lambda: events.append("trim"))
    decode = pipe.model.decode_latents
    monkeypatch.setattr(pipe.model, "decode_latents", lambda *a, **k: events.append("decode") or decode(*a, **k))
    list(pipe("a red apple", steps=2, guidance=3.0, seed=0, num_images=3, batch_size=2, size=SIZE))
    assert events == ["trim", "decode", "trim", "decode"]  # two batches (2 + 1 images); never per decoder stage
