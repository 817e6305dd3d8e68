"""bench/inpainting_sweep.py: settings parsing, masks, region PSNR in closed form, and a tiny sweep that
counts RePaint's extra U-Net calls and resumes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import load_script
from test_evaluate import _tiny_model

bench = load_script("bench/inpainting_sweep.py")


def test_settings_parse_with_and_without_repaint():
    assert bench.parse_settings("ddpm:50; ddim:20:5:5") == [("ddpm", 50, 1, 1), ("ddim", 20, 5, 5)]
    assert bench.label(("ddim", 20, 5, 5)) == "ddim 20, jump 5 x 5" and bench.label(("ddpm", 50, 1, 1)) == "ddpm 50"


@pytest.mark.parametrize("text, message", [
    ("dpm:10", "unknown sampler 'dpm'"),
    ("ddpm:10:5", "is not sampler:steps"),
    ("ddpm:0", "is not sampler:steps"),
    ("dpmpp-2m:10:5:5", "RePaint .* needs one of ddpm, ddim"),
    (";", "lists no settings"),
])
def test_bad_settings_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=message) as error:
        bench.parse_settings(text)
    assert "\n" not in str(error.value)


def test_masks_cover_what_they_say():
    right, center = bench.make_mask("right", 8), bench.make_mask("center", 8)
    assert right.sum() == 32 and right[..., 4:].all() and not right[..., :4].any()
    assert center.sum() == 16 and center[..., 2:6, 2:6].all()


def test_region_psnr_closed_form():
    x = torch.zeros(2, 3, 8, 8)
    mask = bench.make_mask("right", 8)
    y = x + 0.2 * mask  # 0.1 in [0, 1] pixels: MSE 0.01 -> 20 dB in the hole, nothing outside it
    assert torch.allclose(bench.region_psnr(x, y, mask), torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.isinf(bench.region_psnr(x, y, 1 - mask)).all()


def test_tiny_sweep_counts_repaint_calls_and_resumes(tmp_path, monkeypatch, capsys):
    path = tmp_path / "model.safetensors"
    _tiny_model().save(path)
    out = tmp_path / "inpaint.json"
    argv = ["--checkpoint", str(path), "--data", "shapes", "--n", "4", "--size", "32", "--batch-size", "4",
            "--settings", "ddpm:3;ddpm:3:1:2", "--out", str(out)]
    results = bench.main(argv)
    assert [r["setting"] for r in results] == ["autoencoder round trip", "ddpm 3", "ddpm 3, jump 1 x 2"]
    # Three steps down, plus one jump back at each of levels 2 and 1 (worked by hand from the paper's
    # schedule): 0,1,0,1,2,1,2,3 has five steps down; guidance batches both halves into one call.
    assert [r["model_evaluations"] for r in results] == [0, 3, 5]
    assert all(math.isfinite(r["fid"]) and 0 <= r["shapes"]["all_attributes"] <= 1 for r in results)
    assert results[1]["hole_psnr"] != results[2]["hole_psnr"]
    assert "| ddpm 3, jump 1 x 2 | 5 |" in capsys.readouterr().out

    monkeypatch.setattr(bench, "InpaintingBench", lambda *a: pytest.fail("a finished sweep loaded its model again"))
    assert bench.main(argv) == json.loads(out.read_text())["results"]
    with pytest.raises(ValueError, match="holds another sweep"):
        bench.main([*argv[:-2], "--cfg", "2", "--out", str(out)])
