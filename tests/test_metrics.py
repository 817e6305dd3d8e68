"""Metrics: FID against closed forms and the real Inception network, PSNR / SSIM against closed
forms and an independent implementation, the shipped shapes judge on fresh held-out scenes, CLIP
score's formula on a tiny random open_clip model, and both evaluation CLIs end to end."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from autoencoder import AutoencoderConfig, DDConfig, build_autoencoder
from autoencoder.model_file import save_autoencoder
from conditioning import TextEncoderConfig
from data import DataConfig, build_dataset
from metrics.clip_score import CLIPScorer, load_clip_scorer, try_load_clip_scorer
from metrics.fid import (
    FeatureStatistics,
    InceptionFeatures,
    fid,
    fid_from_statistics,
    frechet_distance,
    inception_input,
)
from metrics.image_quality import psnr, ssim
from metrics.shapes_judge import (
    CELL_HEADS,
    ShapesJudge,
    adherence,
    cell_targets,
    parse_shapes_prompt,
    render_scenes,
    scene_labels_from_cells,
    to_cells,
)

# -- FID -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_of_diagonal_gaussians_matches_closed_form(method):
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    # Independent coordinates: the sum of 1-D distances (m1 - m2)^2 + (s1 - s2)^2.
    expected = ((mu1 - mu2) ** 2 + (np.sqrt(var1) - np.sqrt(var2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2), method=method) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_of_scaled_covariance_matches_closed_form(method):
    # sigma2 = c^2 sigma1 (not diagonal): tr sqrtm(sigma1 sigma2) = c tr(sigma1).
    rng = np.random.default_rng(1)
    a = rng.normal(size=(24, 24))
    sigma1, c = a @ a.T / 24 + 0.1 * np.eye(24), 1.7
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    expected = ((mu1 - mu2) ** 2).sum() + (1 - c) ** 2 * np.trace(sigma1)
    assert frechet_distance(mu1, sigma1, mu2, c**2 * sigma1, method=method) == pytest.approx(expected, rel=1e-8)


def test_eigh_and_sqrtm_agree_on_rank_deficient_covariances():
    # Fewer samples than dimensions, as with few images and 2048-d features.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(10, 40)), rng.normal(size=(12, 40)) * 0.5 + 0.3
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    eigh = frechet_distance(*stats[0], *stats[1], method="eigh")
    assert eigh == pytest.approx(frechet_distance(*stats[0], *stats[1], method="sqrtm"), rel=1e-6)
    assert abs(frechet_distance(*stats[0], *stats[0])) < 1e-9
    with pytest.raises(ValueError, match="method"):
        frechet_distance(*stats[0], *stats[1], method="svd")
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(stats[0][0], stats[0][1], stats[1][0][:5], stats[1][1])


def test_feature_statistics_accumulate_in_batches_like_numpy():
    features = torch.randn(37, 12) * 3 + 100  # a large mean: sums in float32 would lose the covariance
    stats = FeatureStatistics(dim=12)
    for chunk in features.split(10):
        stats.update(chunk)
    reference = features.double().numpy()
    np.testing.assert_allclose(stats.mean, reference.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(reference, rowvar=False), rtol=1e-9, atol=1e-9)
    single = FeatureStatistics(dim=12)
    single.update(features[:1])
    with pytest.raises(ValueError, match="at least 2"):
        single.cov
    with pytest.raises(ValueError, match=r"\[N, 12\]"):
        stats.update(torch.zeros(3, 5))


def test_inception_input_is_clean_fid_resize_of_8bit_levels():
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1
    ours = inception_input(images)[0].numpy()
    # clean-fid: PIL bicubic on float channels, then the TF graph's (x - 128) / 128.
    pil = np.stack([np.asarray(Image.fromarray(pixels[..., c].astype(np.float32), mode="F")
                               .resize((299, 299), Image.Resampling.BICUBIC)) for c in range(3)])
    assert ours.shape == (3, 299, 299)
    np.testing.assert_allclose(ours, (pil - 128) / 128, atol=2e-3)
    assert inception_input(torch.ones(1, 3, 299, 299)).max() == pytest.approx(127 / 128)


@pytest.fixture(scope="module")
def shapes_images() -> torch.Tensor:
    dataset = build_dataset(DataConfig(source="shapes", size=32, split="test", shapes_length=6))
    return torch.stack([dataset[i]["image"] for i in range(6)])


def test_fid_from_kept_features_equals_fid_from_covariances():
    generator = torch.Generator().manual_seed(4)
    a, b = FeatureStatistics(dim=32), FeatureStatistics(dim=32)
    a.update(torch.randn(6, 32, generator=generator))
    a.update(torch.randn(9, 32, generator=generator))  # 15 vectors: below dim, kept
    b.update(torch.randn(40, 32, generator=generator) * 0.7 + 0.2)  # 40 > dim: statistics only
    c = FeatureStatistics(dim=32)
    c.update(torch.randn(20, 32, generator=generator) + 1)
    assert a.centered_features().shape == (15, 32) and b.centered_features() is None
    for x, y in ((a, b), (a, c), (c, a)):
        expected = frechet_distance(x.mean, x.cov, y.mean, y.cov, method="sqrtm")
        assert fid_from_statistics(x, y) == pytest.approx(expected, rel=1e-7)
    assert abs(fid_from_statistics(a, a)) < 1e-9


def test_fid_with_inception_is_zero_for_a_set_with_itself_and_grows_with_noise(shapes_images):
    features = InceptionFeatures(batch_size=6)
    noise = torch.randn(shapes_images.shape, generator=torch.Generator().manual_seed(0))
    clean = features(shapes_images)
    assert clean.shape == (6, 2048)

    def stats(vectors):
        result = FeatureStatistics()
        result.update(vectors)
        return result

    slightly = fid_from_statistics(stats(clean), stats(features((shapes_images + 0.1 * noise).clamp(-1, 1))))
    heavily = fid_from_statistics(stats(clean), stats(features((shapes_images + 0.5 * noise).clamp(-1, 1))))
    assert abs(fid_from_statistics(stats(clean), stats(clean))) < 1e-6
    assert 1.0 < slightly < heavily
    # The all-in-one helper, fed batches of 1.
    assert fid(shapes_images[:2], shapes_images[2:4], features, batch_size=1) == pytest.approx(
        fid_from_statistics(stats(clean[:2]), stats(clean[2:4])), rel=1e-4)


# -- PSNR / SSIM ---------------------------------------------------------------------------------


def _ssim_reference(x: np.ndarray, y: np.ndarray) -> float:
    """scikit-image's algorithm (gaussian_weights=True, use_sample_covariance=False), one channel:
    filter with reflection, then average away from the border the window could not cover."""
    from scipy.ndimage import gaussian_filter

    def blur(image):
        return gaussian_filter(image, sigma=1.5, truncate=3.5, mode="reflect")

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    full = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(full[5:-5, 5:-5].mean())


def test_psnr_closed_form():
    x = torch.rand(2, 3, 16, 16) * 0.8
    values = psnr(x, x + 0.1)
    assert values.shape == (2,)
    assert torch.allclose(values, torch.full((2,), 20.0, dtype=torch.float64))
    assert torch.isinf(psnr(x, x)).all()
    with pytest.raises(ValueError, match="same shape"):
        psnr(x, x[:, :, :8])


def test_ssim_closed_forms_and_independent_implementation():
    # Constant images a, b: the variance terms cancel and SSIM = (2ab + C1) / (a^2 + b^2 + C1).
    a, b = 0.3, 0.7
    expected = (2 * a * b + 0.01**2) / (a * a + b * b + 0.01**2)
    assert float(ssim(torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b))) == pytest.approx(expected)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 24, 28, generator=generator)
    y = (x + 0.15 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    assert torch.allclose(ssim(x, x), torch.ones(2, dtype=torch.float64))
    ours = ssim(x, y)
    reference = [np.mean([_ssim_reference(x[i, c].double().numpy(), y[i, c].double().numpy()) for c in range(3)])
                 for i in range(2)]
    np.testing.assert_allclose(ours.numpy(), reference, rtol=1e-6)
    noisier = (x + 0.3 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    assert float(ssim(x, noisier).mean()) < float(ours.mean()) < 1
    with pytest.raises(ValueError, match="11x11"):
        ssim(x[..., :8, :8], y[..., :8, :8])


def test_ssim_matches_scikit_image():
    from skimage import metrics  # pinned in the dev extra: a missing install fails here rather than skipping

    generator = torch.Generator().manual_seed(1)
    x = torch.rand(1, 3, 32, 32, generator=generator)
    y = (x + 0.1 * torch.randn(x.shape, generator=generator)).clamp(0, 1)
    expected = metrics.structural_similarity(x[0].numpy(), y[0].numpy(), channel_axis=0, data_range=1.0,
                                             gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    assert float(ssim(x, y)) == pytest.approx(expected, rel=1e-5)


# -- shapes judge --------------------------------------------------------------------------------


@pytest.mark.parametrize("max_objects", [1, 2])
def test_prompt_parser_round_trips_dataset_captions(max_objects):
    for split in ("train", "test"):
        dataset = build_dataset(DataConfig(source="shapes", size=16, split=split, shapes_length=150,
                                           shapes_max_objects=max_objects))
        for i in range(len(dataset)):
            item = dataset[i]
            assert parse_shapes_prompt(item["caption"]) == item["labels"], item["caption"]


@pytest.mark.parametrize("prompt", [
    "a red circle",
    "a small red circle at the left on a white background",  # "on the left" in the grammar
    "a small red circle on the right and a large blue star at the top left on a white background",  # order
    "a small pink circle at the top on a white background",
])
def test_prompt_parser_rejects_text_outside_the_grammar(prompt):
    with pytest.raises(ValueError, match="caption"):
        parse_shapes_prompt(prompt)


@pytest.fixture(scope="module")
def judge() -> ShapesJudge:
    return ShapesJudge.load()


def test_shipped_judge_reads_fresh_held_out_scenes(judge):
    images, labels = render_scenes(256, 64, "test", seed=98765)  # a seed the judge was never validated on
    scores = judge.score(images, labels)
    assert set(scores) == {"num_objects", "background", "shape", "color", "size", "position", "all_attributes"}
    for attribute in ("num_objects", "background", "shape", "color", "size", "position"):
        assert scores[attribute] > 0.98, (attribute, scores)


def test_judge_score_counts_wrong_requests_as_wrong(judge):
    dataset = build_dataset(DataConfig(source="shapes", size=64, split="test", seed=5, shapes_length=16))
    items = [dataset[i] for i in range(16)]
    images = torch.stack([item["image"] for item in items])
    labels = [item["labels"] for item in items]
    collated = torch.utils.data.default_collate(labels)  # the batch layout a DataLoader gives
    assert judge.score(images, collated) == judge.score(images, labels)
    assert judge.score_prompts(images, [item["caption"] for item in items]) == judge.score(images, labels)
    flipped = [{**label, "background": "white" if label["background"] != "white" else "black"} for label in labels]
    scores = judge.score(images, flipped)
    assert scores["background"] == 0.0 and scores["all_attributes"] == 0.0
    with pytest.raises(ValueError, match="label sets"):
        judge.score(images, labels[:3])


def test_adherence_counts_only_requested_objects():
    wanted = {"num_objects": 1, "background": "gray", "shape_0": "star", "color_0": "red", "size_0": "small",
              "position_0": "top", "shape_1": "", "color_1": "", "size_1": "", "position_1": ""}
    guess = {**wanted, "num_objects": 2, "shape_1": "circle", "color_1": "blue", "size_1": "large",
             "position_1": "left"}
    scores = adherence([guess, {**wanted, "color_0": "blue"}], [wanted, wanted])
    assert scores["num_objects"] == 0.5 and scores["color"] == 0.5 and scores["shape"] == 1.0
    assert scores["all_attributes"] == 0.0


def test_cells_are_read_in_caption_order():
    images, labels = render_scenes(24, 64, "test", seed=3)
    cells = to_cells(images)
    assert cells.shape == (24 * 9, 3, 24, 24)
    assert torch.equal(cells[5 * 9 + 7], images[5, :, 48:72, 24:48])  # image 5, cell 7 = row 2, column 1
    targets = cell_targets(labels)
    assert int((targets["shape"] != 0).sum()) == sum(label["num_objects"] for label in labels)
    # Perfectly confident cell logits read back to exactly the scene labels.
    logits = {head: torch.nn.functional.one_hot(t.clamp(min=0), len(CELL_HEADS[head])).float()
              for head, t in targets.items()}
    assert scene_labels_from_cells(logits) == labels


# -- CLIP score ----------------------------------------------------------------------------------


def _tiny_clip():
    import open_clip
    from open_clip import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model, open_clip.get_tokenizer("ViT-B-32")


def test_clip_score_is_100_times_clamped_cosine():
    model, tokenizer = _tiny_clip()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    scorer = CLIPScorer(model, tokenizer, mean, std)
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a small red circle", "a large blue star", "a cat", "a dog", "green", "a yellow hexagon on black"]
    with torch.no_grad():
        pixels = ((images + 1) / 2 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
        image_embeddings = model.encode_image(pixels)
        text_embeddings = model.encode_text(tokenizer(prompts))
    cosine = torch.nn.functional.cosine_similarity(image_embeddings, text_embeddings, dim=-1)
    scores = scorer.scores(images, prompts)
    assert torch.allclose(scores, 100 * cosine.clamp(min=0), atol=1e-4)
    assert scorer(images, prompts) == pytest.approx(float(scores.mean()), abs=1e-6)
    # Larger images are resized and centre-cropped to the model's 32x32 input.
    assert scorer.preprocess(torch.zeros(2, 3, 48, 64)).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="prompts"):
        scorer.scores(images, prompts[:2])


def test_clip_score_needs_weights_that_are_here(tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the local cache"):
        load_clip_scorer("ViT-B-32", "openai", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a weights file"):
        load_clip_scorer("ViT-B-32", str(tmp_path / "missing.safetensors"))
    scorer, note = try_load_clip_scorer("ViT-B-32", "openai", cache_dir=tmp_path)
    assert scorer is None and "openai" in note


# -- evaluation CLIs -----------------------------------------------------------------------------

TINY_DDCONFIG = dict(z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                     num_res_blocks=1, attn_resolutions=[])


def _finite(value) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def test_ldm_evaluate_end_to_end(tmp_path):
    from ldm.evaluate import main
    from ldm.latent_diffusion import LatentDiffusion, LatentDiffusionConfig
    from ldm.unet import UNetConfig

    torch.manual_seed(0)
    ae_cfg = AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(double_z=True, **TINY_DDCONFIG))
    cfg = LatentDiffusionConfig(
        unet=UNetConfig(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                        attention_resolutions=[2], num_head_channels=16),
        text=TextEncoderConfig(kind="transformer", n_embed=32, n_layer=1, n_head=2),
    )
    LatentDiffusion(cfg, build_autoencoder(ae_cfg), ae_cfg, scale_factor=1.0).save(tmp_path / "model.safetensors")
    out = tmp_path / "results.json"
    main(["--checkpoint", str(tmp_path / "model.safetensors"), "--data", "shapes", "--n", "3", "--size", "32",
          "--steps", "2", "--batch-size", "2", "--device", "cpu", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["n"] == 3 and results["size"] == 32
    assert _finite(results["fid"]) and _finite(results["fid_data_floor"])
    assert results["fid"] > results["fid_data_floor"] > 0  # an untrained model draws noise
    assert set(results["shapes"]) == {"num_objects", "background", "shape", "color", "size", "position",
                                      "all_attributes"}
    assert all(0.0 <= v <= 1.0 for v in results["shapes"].values())
    if results["clip_score"] is None:  # no CLIP weights on this machine: a note must say why
        assert "CLIP" in results["clip_note"]
    else:
        assert _finite(results["clip_score"])


def test_autoencoder_evaluate_end_to_end(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from autoencoder.evaluate import main

    torch.manual_seed(0)
    cfg = AutoencoderConfig(kind="vq", embed_dim=4, n_embed=16, ddconfig=DDConfig(double_z=False, **TINY_DDCONFIG))
    save_autoencoder(build_autoencoder(cfg), cfg, tmp_path / "ae.safetensors", scale_factor=1.0)
    # LPIPS with a (random) SqueezeNet trunk file, the smallest backbone.
    trunk = torchvision.models.squeezenet1_1(weights=None).features.state_dict()
    torch.save({f"features.{k}": v for k, v in trunk.items()}, tmp_path / "squeeze.pth")
    out = tmp_path / "results.json"
    main(["--checkpoint", str(tmp_path / "ae.safetensors"), "--data", "shapes", "--n", "3", "--batch-size", "2",
          "--device", "cpu", "--lpips-net", "squeeze", "--lpips-path", str(tmp_path / "squeeze.pth"),
          "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["n"] == 3 and results["size"] == 32 and results["kind"] == "vq"
    assert _finite(results["psnr"]) and _finite(results["rfid"]) and results["rfid"] > 0
    assert -1.0 <= results["ssim"] < 1.0
    assert _finite(results["lpips"]) and results["lpips"] > 0 and results["lpips_note"] is None
    codebook = results["codebook"]
    assert codebook["n_embed"] == 16 and 0 < codebook["usage"] <= 1
    assert 1.0 <= codebook["perplexity"] <= codebook["usage"] * 16 + 1e-9
    assert all(0.0 <= v <= 1.0 for v in results["shapes"].values())


def test_autoencoder_evaluate_judges_reconstructions_on_shapes(tmp_path, monkeypatch):
    """Perfect reconstructions score the judge's own accuracy (all right here), so the shapes
    numbers are about the reconstructions, not the originals."""
    import autoencoder.evaluate as ae_evaluate

    cfg = AutoencoderConfig(ddconfig=DDConfig(**TINY_DDCONFIG))
    save_autoencoder(build_autoencoder(cfg), cfg, tmp_path / "ae.safetensors", scale_factor=1.0)
    args = ["--checkpoint", str(tmp_path / "ae.safetensors"), "--data", "shapes", "--n", "8", "--batch-size", "4",
            "--device", "cpu", "--lpips-path", str(tmp_path / "absent.pth")]
    random_model = ae_evaluate.main([*args, "--out", str(tmp_path / "random.json")])["shapes"]
    assert random_model["all_attributes"] == 0.0
    monkeypatch.setattr(ae_evaluate, "reconstruct", lambda model, images: (images, None))
    perfect = ae_evaluate.main([*args, "--out", str(tmp_path / "perfect.json")])["shapes"]
    assert perfect == {name: 1.0 for name in perfect}


def test_autoencoder_evaluate_edges_row_and_inception_distance(tmp_path, monkeypatch):
    """Perfect reconstructions: edge F1 1 and Inception distance 0; a random model's edges disagree and
    its distance is positive. The row PNG holds the originals above the reconstructions, pixel for pixel."""
    import autoencoder.evaluate as ae_evaluate

    torch.manual_seed(0)
    cfg = AutoencoderConfig(ddconfig=DDConfig(**TINY_DDCONFIG))
    save_autoencoder(build_autoencoder(cfg), cfg, tmp_path / "ae.safetensors", scale_factor=1.0)
    args = ["--checkpoint", str(tmp_path / "ae.safetensors"), "--data", "shapes", "--n", "5", "--batch-size", "2",
            "--device", "cpu", "--lpips-net", "inception", "--row-images", "3"]
    random_model = ae_evaluate.main([*args, "--out", str(tmp_path / "r.json"), "--row", str(tmp_path / "r.png")])
    assert random_model["edges"]["f1"] < 0.5 and random_model["edges"]["tolerance"] == 1
    assert random_model["lpips_net"] == "inception" and random_model["lpips"] > 0.05
    shown = []
    real_reconstruct = ae_evaluate.reconstruct
    monkeypatch.setattr(ae_evaluate, "reconstruct", lambda model, images: (shown.append(images) or (images, None)))
    perfect = ae_evaluate.main([*args, "--out", str(tmp_path / "p.json"), "--row", str(tmp_path / "p.png")])
    assert perfect["edges"]["f1"] == 1.0 and perfect["edges"]["precision"] == 1.0
    assert perfect["lpips"] == pytest.approx(0.0, abs=1e-9)
    row = np.asarray(Image.open(tmp_path / "p.png"))
    originals = torch.cat(shown)[:3]
    assert row.shape == (64, 96, 3)  # 2 rows of 3 images of 32 px
    expected = ((originals.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(2, 0, 3, 1).reshape(32, 96, 3)
    assert np.array_equal(row[:32], expected.numpy()) and np.array_equal(row[32:], expected.numpy())
    monkeypatch.setattr(ae_evaluate, "reconstruct", real_reconstruct)
    random_row = np.asarray(Image.open(tmp_path / "r.png"))
    assert np.array_equal(random_row[:32], expected.numpy()) and not np.array_equal(random_row[32:], random_row[:32])


def test_autoencoder_evaluate_parts(tmp_path, monkeypatch):
    from autoencoder.evaluate import _try_lpips, reconstruct

    torch.manual_seed(0)
    kl = build_autoencoder(AutoencoderConfig(kind="kl", embed_dim=4, ddconfig=DDConfig(double_z=True, **TINY_DDCONFIG)))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, codes = reconstruct(kl.eval(), x)
    with torch.no_grad():
        assert codes is None and torch.equal(recon, kl.decode(kl.encode(x).mode()))  # deterministic: the mean
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no backbone weights anywhere
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # and no download
    lpips, note = _try_lpips("vgg", None, "cpu")
    assert lpips is None and "vgg16-397923af.pth" in note and "--lpips-path" in note


def test_codebook_statistics_closed_form():
    from autoencoder.evaluate import codebook_statistics

    stats = codebook_statistics(torch.tensor([3, 3, 0, 0, 3, 3]))
    assert stats == {"n_embed": 6, "usage": pytest.approx(4 / 6), "perplexity": pytest.approx(4.0)}
