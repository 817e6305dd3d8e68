"""ldm.evaluate.Evaluator (references computed once, the same numbers as the CLI, other weights
against the same references) and bench/quality_sweep.py (grid parsing, cost accounting, training
clock, a tiny end-to-end sweep that resumes, the training-checkpoints mode)."""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import pytest
import torch

from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from conditioning import TextEncoderConfig
import generate
from ldm.evaluate import Evaluator, build_parser, main
from ldm.generation import SAMPLERS, generate_latents
from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
from ldm.unet import UNetConfig
from common.weights import save_torch, save_weights
from conftest import load_script

SIZE = 32  # the shapes judge reads 32-pixel scenes; the tiny autoencoder halves once


sweep = load_script("bench/quality_sweep.py")


def _tiny_model(seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    ae_cfg = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(
        double_z=True, z_channels=4, resolution=SIZE, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
        num_res_blocks=1, attn_resolutions=[]))
    cfg = LatentDiffusionConfig(
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[2], num_head_channels=16),
        text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2))
    model = LatentDiffusion(cfg, build_autoencoder(ae_cfg), ae_cfg, scale_factor=1.0)
    # Zero-initialised output convs would predict 0 everywhere: every sampler and guidance scale
    # would then give the same images, and the tests could not tell settings apart.
    for p in model.unet.parameters():
        if p.abs().sum() == 0 and p.ndim > 1:
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    _tiny_model().save(path)
    return path


class CountingFeatures:
    """Wraps InceptionFeatures and counts the images it was given."""

    def __init__(self, features):
        self.features, self.images = features, 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.images += images.shape[0]
        return self.features(images)


def _evaluator(checkpoint: Path, **kwargs) -> Evaluator:
    options = {"n": 2, "batch_size": 2, "size": SIZE, "clip": None, "checkpoint": str(checkpoint)} | kwargs
    return Evaluator(LatentDiffusion.load(checkpoint), "shapes", **options)


def test_references_are_computed_once_and_shared_by_other_weights(checkpoint):
    evaluator = _evaluator(checkpoint)
    evaluator.features = counting = CountingFeatures(evaluator.features)
    first = evaluator.run("ddim", 2, 3.0)
    assert counting.images == 3 * 2  # held-out, train (data floor), generated
    other = _tiny_model(seed=1)
    evaluator.set_model(other, checkpoint="other weights")
    second = evaluator.run("ddim", 2, 3.0)
    assert counting.images == 4 * 2  # only the new generated images
    assert second["checkpoint"] == "other weights" and first["checkpoint"] == str(checkpoint)
    assert second["fid_data_floor"] == first["fid_data_floor"] > 0
    assert second["fid"] != first["fid"]  # the other weights were used
    assert first["model_evaluations"] == second["model_evaluations"] == 2
    assert set(first["shapes"]) == {*sweep.ADHERENCE_COLUMNS, "all_attributes"}


def test_cli_results_do_not_depend_on_the_batch_size(checkpoint, tmp_path, capsys):
    out = tmp_path / "results.json"
    main(["--checkpoint", str(checkpoint), "--data", "shapes", "--n", "3", "--size", str(SIZE), "--sampler", "heun",
          "--steps", "2", "--cfg", "2", "--batch-size", "2", "--no-clip", "--device", "cpu", "--out", str(out)])
    from_cli = json.loads(out.read_text())
    progress = capsys.readouterr().err  # a bar per phase, counting images
    for phase in ("held-out references", "data floor", "heun 2 steps, cfg 2"):
        assert f"{phase}:   0%" in progress and "0/3 [" in progress, (phase, progress)
    # Another batch size: image i still comes from seed + i.
    from_run = _evaluator(checkpoint, n=3, batch_size=3).run("heun", 2, 2.0)
    assert from_cli.pop("seconds").keys() == from_run.pop("seconds").keys()
    assert from_cli.keys() == from_run.keys()
    for key, value in from_cli.items():
        if isinstance(value, float):
            assert from_run[key] == pytest.approx(value, rel=1e-5), key
        elif key == "shapes":
            assert from_run[key] == pytest.approx(value), key
        else:
            assert from_run[key] == value, key
    assert from_cli["model_evaluations"] == 3  # Heun: two evaluations per step, one in the last


def test_defaults_are_generate_pys_documented_ones():
    """README: DPM-Solver++ 2M, 25 steps, guidance 3; an evaluation scores what generate.py draws."""
    evaluate_parser, generate_parser = build_parser(), generate.build_parser()
    documented = {"sampler": "dpmpp-2m", "steps": 25, "cfg": 3.0}
    assert {dest: generate_parser.get_default(dest) for dest in documented} == documented
    assert {dest: evaluate_parser.get_default(dest) for dest in documented} == documented
    run = inspect.signature(Evaluator.run).parameters
    assert {dest: run[dest].default for dest in documented} == documented


def test_evaluator_rejects_bad_settings(checkpoint):
    with pytest.raises(ValueError, match="batch_size must be positive"):
        _evaluator(checkpoint, batch_size=0)
    evaluator = _evaluator(checkpoint)
    with pytest.raises(ValueError, match="unknown sampler 'ddim2'"):
        evaluator.run("ddim2", 2, 3.0)
    with pytest.raises(ValueError, match="steps must be positive"):
        evaluator.run("ddim", 0, 3.0)


@pytest.mark.parametrize("steps", [4, 30])  # 30 does not divide 1000: LDM's uniform spacing makes 31 levels
@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_expected_evaluations_are_what_the_samplers_call(checkpoint, sampler, steps):
    model = LatentDiffusion.load(checkpoint)
    calls = []
    hook = model.unet.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    generate_latents(model, ["a red circle"], sampler=sampler, steps=steps, guidance=3.0, height=SIZE, width=SIZE)
    hook.remove()
    assert len(calls) == sweep.expected_evaluations(sampler, steps)
    assert set(calls) == {2}  # guidance: conditional and unconditional halves in one call


# -- bench/quality_sweep.py --------------------------------------------------------------------


def test_parse_grid_and_guidance():
    assert sweep.parse_grid("ddim:10,25; heun:5") == [("ddim", 10), ("ddim", 25), ("heun", 5)]
    assert sweep.parse_grid("none") == [] and sweep.parse_guidance("none") == []
    assert sweep.parse_guidance("1,2,7.5") == [1.0, 2.0, 7.5]
    assert len(sweep.parse_grid(sweep.DEFAULT_GRID)) == 15


@pytest.mark.parametrize("grid, message", [
    ("dim:10", "unknown sampler 'dim'"),
    ("ddim", "gives no step counts"),
    ("ddim:", "gives no step counts"),
    ("ddim:ten", "step count 'ten' for ddim is not a positive integer"),
    ("ddim:0", "step count '0'"),
    ("ddim:10,10", "ddim with 10 steps is listed twice"),
    (";", "lists no settings"),
])
def test_bad_grid_is_a_one_line_error(grid, message):
    with pytest.raises(ValueError, match=message) as error:
        sweep.parse_grid(grid)
    assert "\n" not in str(error.value) and str(error.value).startswith("--grid")


def test_bad_guidance_and_missing_inputs_are_one_line_errors(tmp_path, checkpoint):
    for text, message in (("1,x", "not a comma-separated list"), (",", "lists no scales")):
        with pytest.raises(ValueError, match=message) as error:
            sweep.parse_guidance(text)
        assert "\n" not in str(error.value)
    base = ["--data", "shapes", "--out", str(tmp_path / "q.json")]
    with pytest.raises(ValueError, match="give --checkpoint"):
        sweep.main(base)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        sweep.main([*base, "--checkpoint", str(tmp_path / "missing.safetensors")])
    with pytest.raises(FileNotFoundError, match="no step_XXXXXXXX checkpoint folders"):
        sweep.main([*base, "--checkpoints-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="unknown sampler"):
        sweep.main([*base, "--checkpoint", str(checkpoint), "--grid", "ddim:2;dpm:2"])
    with pytest.raises(ValueError, match="nothing to sweep"):
        sweep.main([*base, "--checkpoint", str(checkpoint), "--grid", "none", "--guidance", "none"])
    with pytest.raises(ValueError, match="give the results file a .json name"):
        sweep.main(["--data", "shapes", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "q.md")])


def test_checkpoint_selection_keeps_the_last():
    assert sweep._select(list(range(10)), 1) == [9]
    assert sweep._select(list(range(10)), 3) == [0, 4, 9]
    assert sweep._select(list(range(3)), 5) == [0, 1, 2]


def test_sweep_end_to_end_resumes(checkpoint, tmp_path, monkeypatch, capsys):
    out = tmp_path / "quality.json"
    argv = ["--checkpoint", str(checkpoint), "--data", "shapes", "--n", "2", "--size", str(SIZE), "--batch-size", "2",
            "--grid", "ddim:2;heun:2", "--cfg", "3", "--guidance", "1,3", "--sampler", "ddim", "--steps", "2",
            "--no-clip", "--out", str(out)]
    sweep.main(argv)
    saved = json.loads(out.read_text())
    settings = [(r["sampler"], r["steps"], r["cfg"]) for r in saved["results"]]
    assert settings == [("ddim", 2, 3.0), ("heun", 2, 3.0), ("ddim", 2, 1.0)]  # ddim 2 at 3 runs once
    assert [r["model_evaluations"] for r in saved["results"]] == [2, 3, 2]
    assert saved["fid_data_floor"] == saved["results"][0]["fid_data_floor"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| heun | 2 | 3 |" in table and "| 1 |" in table and "all correct" in table
    assert table in capsys.readouterr().out

    def fail(*args, **kwargs):
        raise AssertionError("a finished setting ran again")

    monkeypatch.setattr(sweep.Evaluator, "run", fail)
    sweep.main(argv)  # everything is in the results file already
    assert json.loads(out.read_text()) == saved
    with pytest.raises(ValueError, match="another configuration"):
        sweep.main([*argv[:4], "--n", "3", *argv[6:]])


def _training_run(tmp_path: Path, checkpoint: Path) -> tuple[Path, list[dict]]:
    """A run folder as train_stage2.py leaves it: model, tensorboard file, checkpoints at steps 2 and 4."""
    run = tmp_path / "run"
    (run / "tensorboard").mkdir(parents=True)
    (run / "model.safetensors").write_bytes(checkpoint.read_bytes())
    t0 = 1_790_000_000
    (run / "tensorboard" / f"events.out.tfevents.{t0}.host.1.0").touch()
    states = []
    for step, seconds in ((2, 60), (4, 180)):
        folder = run / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        state = {f"unet.{k}": v for k, v in _tiny_model(seed=step).unet.state_dict().items()}
        save_weights(state, folder / "ema.safetensors", {"num_updates": step})
        save_torch({"step": step}, folder / "trainer_state.pt")
        os.utime(folder / "trainer_state.pt", (t0 + seconds, t0 + seconds))
        states.append(state)
    return run, states


def test_training_checkpoints_are_loaded_and_timed(checkpoint, tmp_path):
    run, states = _training_run(tmp_path, checkpoint)
    model = LatentDiffusion.load(checkpoint)
    assert sweep.load_training_weights(model, run / "checkpoints" / "step_00000004") == "ema"
    for k, v in model.unet.state_dict().items():
        assert torch.equal(v, states[1][f"unet.{k}"]), k

    out = tmp_path / "training.json"
    sweep.main(["--checkpoints-dir", str(run), "--data", "shapes", "--n", "2", "--size", str(SIZE),
                "--batch-size", "2", "--sampler", "ddim", "--steps", "2", "--no-clip", "--out", str(out)])
    results = json.loads(out.read_text())["results"]
    assert [(r["step"], r["minutes"], r["weights"]) for r in results] == [(2, 1.0, "ema"), (4, 3.0, "ema")]
    assert results[0]["fid"] != results[1]["fid"]
    assert "| 4 | 3.0 |" in out.with_suffix(".md").read_text()
