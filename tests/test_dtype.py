"""Low-precision inference (issue 23 item 1): generate.py --dtype and `Pipeline.from_file(dtype=)`.

bf16 images against the float32 ones at the same seeds (the float32 path is the reference), for every
sampler, with a ControlNet and with a LoRA unmerged and merged; the weights really in the dtype after load
and never cast again while drawing; the noise and the sampler's state float32 in every dtype; the dtype in
the PNG and back through --from-png; one-line errors for a bad value; the web UI's --dtype. On tests/test_generate.py's tiny
model with random weights (its images are far from flat: another seed changes a pixel by 42 on average).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import generate
from layers import GroupNorm32
from ldm import Pipeline
from ldm.app import cli
from ldm.app.ui import CUSTOM_MODEL, Studio
from ldm.lora import write_lora
from ldm.precision import AUTO_DTYPE
from ldm.samplers import SAMPLERS
from test_generate import SIZE
from test_generate_lora import random_lora
from test_pipeline import files  # noqa: F401 (the fixture: tiny model, a ControlNet on it, a photo)

PROMPT = "a red apple"
DRAW = dict(steps=6, guidance=3.0, seed=3, num_images=4, size=SIZE)
# bf16 against float32 images (0-255) of the tiny model, measured at DRAW's settings: for every sampler
# largest |difference| 2 to 4, mean |difference| 0.23 to 0.46; with the ControlNet (scale 4) 2 and 0.24,
# with the LoRA 3 and 0.48 (hooks) / 0.40 (merged); fp16: largest 1. The tolerances leave about 2x room;
# another seed's images differ by 42 on average.
MAX_DIFF, MEAN_DIFF = 8, 1.0
# What the ControlNet or the LoRA must change, on average, for its path to count as tested: 10x MEAN_DIFF
# (measured: 12.9 and 21.0).
EFFECT = 10 * MEAN_DIFF


@pytest.fixture(scope="module")
def lora_file(files, tmp_path_factory) -> Path:  # noqa: F811
    """A random LoRA on every linear and conv layer of the U-Net and the text encoder (kohya format)."""
    model = Pipeline.from_file(files["model"], dtype="fp32").model
    path = tmp_path_factory.mktemp("dtype-lora") / "style.safetensors"
    write_lora(random_lora(model, 1), path, model, "kohya")
    return path


@pytest.fixture(scope="module")
def pipes(files) -> dict[str, Pipeline]:  # noqa: F811
    return {dtype: Pipeline.from_file(files["model"], dtype=dtype) for dtype in ("fp32", "bf16")}


def pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def assert_close(low: np.ndarray, reference: np.ndarray) -> None:
    difference = np.abs(low - reference)
    assert difference.max() <= MAX_DIFF and difference.mean() <= MEAN_DIFF, (difference.max(), difference.mean())


def control_keywords(files) -> dict:  # noqa: F811
    return dict(control_image=str(files["photo"]), control="canny", control_scale=4.0)


# -- the weights ---------------------------------------------------------------------------------------

def test_weights_are_in_the_dtype_after_load(files):  # noqa: F811
    pipe = Pipeline.from_file(files["model"], controlnets=[files["controlnet"]], dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    for network in (pipe.model.unet, pipe.controlnets[0][1].net):
        norms = {id(p) for m in network.modules() if isinstance(m, GroupNorm32) for p in m.parameters()}
        assert norms and len(norms) < len(list(network.parameters()))
        for name, p in network.named_parameters():
            # GroupNorm32 computes in float32: its parameters stay float32, so no step casts them.
            assert p.dtype == (torch.float32 if id(p) in norms else torch.bfloat16), name
    for part in (pipe.model.text_encoder, pipe.model.autoencoder):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    assert Pipeline.from_file(files["model"], dtype=torch.float16).dtype == torch.float16  # a torch dtype too


class WeightCasts(TorchDispatchMode):
    """Records every copy-with-cast (`aten._to_copy`) whose source is one of the `watched` storages."""

    def __init__(self, watched: dict[int, str]):
        super().__init__()
        self.watched, self.casts = watched, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        source = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and isinstance(source, torch.Tensor):
            name = self.watched.get(source.untyped_storage().data_ptr())
            if name is not None:
                self.casts.append(name)
        return func(*args, **(kwargs or {}))


def test_weights_are_cast_once_not_per_step(files, lora_file):  # noqa: F811
    pipe = Pipeline.from_file(files["model"], controlnets=[files["controlnet"]], loras=[lora_file], dtype="bf16")
    networks = {"unet": pipe.model.unet, "controlnet": pipe.controlnets[0][1].net}
    weights = {t.untyped_storage().data_ptr(): f"{part}.{name}" for part, network in networks.items()
               for name, t in [*network.named_parameters(), *network.named_buffers()]}
    hooked = [(name, hook) for name, m in pipe.model.unet.named_modules() for hook in m._forward_hooks.values()
              if hasattr(hook, "down")]
    assert len(hooked) > 10  # the LoRA's hooks on the U-Net
    factors = {t.untyped_storage().data_ptr(): f"lora {name}" for name, hook in hooked for t in (hook.down, hook.up)}
    keywords = dict(control_keywords(files), seed=1, size=SIZE)
    with WeightCasts(weights) as first:
        pipe(PROMPT, steps=2, **keywords)
    assert first.casts == []
    with WeightCasts({**weights, **factors}) as second:  # the hooks cast their factors on the first call only
        pipe(PROMPT, steps=3, **keywords)
    assert second.casts == []


def test_merged_lora_is_rounded_once(files, lora_file):  # noqa: F811
    """A LoRA merged at load is added to the float32 weights; the sum is then rounded to bf16 once."""
    fp32 = Pipeline.from_file(files["model"], loras=[lora_file], lora_merge=True, dtype="fp32").model.unet
    bf16 = Pipeline.from_file(files["model"], loras=[lora_file], lora_merge=True, dtype="bf16").model.unet
    merged = fp32.state_dict()
    for key, value in bf16.state_dict().items():
        assert torch.equal(value, merged[key].to(value.dtype)), key


# -- noise and sampler state -----------------------------------------------------------------------------

def test_noise_and_the_sampler_state_are_float32_in_every_dtype(files):  # noqa: F811
    first_inputs = {}
    for dtype in ("fp32", "bf16", "fp16"):
        pipe = Pipeline.from_file(files["model"], dtype=dtype)
        seen = []
        pipe.model.unet.register_forward_hook(lambda module, args, out: seen.append((args[0], out)))
        pipe(PROMPT, sampler="dpmpp-2m", **DRAW)
        assert {(x.dtype, out.dtype) for x, out in seen} == {(torch.float32, torch.float32)}
        first_inputs[dtype] = seen[0][0]
    # The first step's input is the starting noise times a float32 scale: the same numbers in every dtype.
    assert torch.equal(first_inputs["bf16"], first_inputs["fp32"])
    assert torch.equal(first_inputs["fp16"], first_inputs["fp32"])


def test_a_bf16_unet_embeds_timesteps_as_fp32_does(pipes):
    """The sinusoids are taken of float32 timesteps: bf16 would round t = 997 .. 999 to 996 or 1000
    (steps of 4 above 512), and sin(t) (the first frequency is 1) would be far off. Measured largest
    difference relative to the embedding's largest value: 0.0033 to 0.0047 (from bf16 timesteps: 0.19
    to 0.66)."""
    fp32, bf16 = pipes["fp32"].model.unet, pipes["bf16"].model.unet
    with torch.no_grad():
        for t in (997.0, 998.0, 998.5, 999.0, 501.25):
            reference = fp32.embed(torch.tensor([t]), 1, "cpu")
            low = bf16.embed(torch.tensor([t]), 1, "cpu")
            assert low.dtype == torch.bfloat16
            assert (low.float() - reference).abs().max() <= 0.02 * reference.abs().max(), t


# -- images close to float32's -------------------------------------------------------------------------

@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_in_bf16_draws_close_to_fp32(pipes, sampler):
    images = {dtype: pixels(pipe(PROMPT, sampler=sampler, **DRAW)) for dtype, pipe in pipes.items()}
    assert_close(images["bf16"], images["fp32"])


def test_fp16_runs_on_cpu_close_to_fp32(files, pipes, capsys):  # noqa: F811
    fp16 = Pipeline.from_file(files["model"], dtype="fp16")
    if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        assert "note: fp16 on this CPU has no oneDNN kernels" in capsys.readouterr().err
    assert_close(pixels(fp16(PROMPT, **DRAW)), pixels(pipes["fp32"](PROMPT, **DRAW)))


def test_controlnet_in_bf16_draws_close_to_fp32(files, pipes):  # noqa: F811
    controlled = {dtype: Pipeline.from_file(files["model"], controlnets=[files["controlnet"]], dtype=dtype)
                  for dtype in ("fp32", "bf16")}
    keywords = dict(DRAW, **control_keywords(files))
    images = {dtype: pixels(pipe(PROMPT, **keywords)) for dtype, pipe in controlled.items()}
    assert_close(images["bf16"], images["fp32"])
    uncontrolled = pixels(pipes["bf16"](PROMPT, **DRAW))
    assert np.abs(images["bf16"] - uncontrolled).mean() > EFFECT


@pytest.mark.parametrize("merge", [False, True], ids=["hooks", "merged"])
def test_lora_in_bf16_draws_close_to_fp32(files, pipes, lora_file, merge):  # noqa: F811
    reference = pixels(Pipeline.from_file(files["model"], loras=[lora_file], dtype="fp32")(PROMPT, **DRAW))
    bf16 = pixels(Pipeline.from_file(files["model"], loras=[lora_file], lora_merge=merge, dtype="bf16")(PROMPT, **DRAW))
    assert_close(bf16, reference)
    assert np.abs(bf16 - pixels(pipes["bf16"](PROMPT, **DRAW))).mean() > EFFECT


# -- generate.py ----------------------------------------------------------------------------------------

def run_cli(folder: Path, *flags) -> Path:
    generate.main([*map(str, flags), "--out", str(folder), "--overwrite"])
    return folder / "000-seed0.png"


def record(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text["ldm-generation"])


def test_cli_dtype_is_recorded_and_read_back(files, tmp_path):  # noqa: F811
    flags = [PROMPT, "--checkpoint", files["model"], "--steps", 3, "--size", SIZE]
    bf16 = run_cli(tmp_path / "bf16", *flags, "--dtype", "bf16")
    assert record(bf16)["dtype"] == "bf16"
    again = run_cli(tmp_path / "again", "--from-png", bf16, "--checkpoint", files["model"])
    assert again.read_bytes() == bf16.read_bytes()  # --from-png draws in the recorded dtype
    fp32 = run_cli(tmp_path / "fp32", "--from-png", bf16, "--checkpoint", files["model"], "--dtype", "fp32")
    assert record(fp32)["dtype"] == "fp32" and fp32.read_bytes() != bf16.read_bytes()
    default = run_cli(tmp_path / "default", *flags)
    auto = AUTO_DTYPE["cpu"]  # what "auto" means on a CPU: the documented default
    assert record(default)["dtype"] == auto
    assert np.array_equal(pixels([Image.open(default)]), pixels([Image.open({"fp32": fp32, "bf16": bf16}[auto])]))


def test_bad_dtype_is_one_line(files, capsys):  # noqa: F811
    with pytest.raises(SystemExit) as info:
        generate.main([PROMPT, "--checkpoint", str(files["model"]), "--dtype", "fp64"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--dtype" in err and "'fp64'" in err and len(err.strip().splitlines()) == 1
    for bad in ("half", torch.float64):
        with pytest.raises(ValueError, match=r"^dtype must be one of auto, fp32, bf16, fp16, got") as error:
            Pipeline.from_file(files["model"], dtype=bad)
        assert "\n" not in str(error.value)


def test_the_web_ui_loads_its_pipelines_in_the_dtype_given(files, tmp_path):  # noqa: F811
    studio = Studio(cli.parse_args(["--model", str(files["model"]), "--outdir", str(tmp_path), "--dtype", "bf16"]))
    pipe = studio.pipeline(CUSTOM_MODEL, str(files["model"]), "", None)
    assert pipe.dtype == torch.bfloat16 and pipe.model.unet.dtype == torch.bfloat16
    with pytest.raises(SystemExit):
        cli.parse_args(["--dtype", "fp64"])
