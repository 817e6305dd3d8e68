"""Stage-1 autoencoders: original parameter layout, math against closed forms, quantizer behaviour,
numerics, tiny overfits, checkpoints, diffusers parity (losses: test_autoencoder_losses.py)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from autoencoder_helpers import TINY_KL, TINY_VQ, pattern_images, tiny_kl, tiny_vq
from safetensors.torch import load_file, save_file

import autoencoder as ae
from autoencoder.modules import GroupNorm32
from train_stage1 import Stage1Config
from common.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "autoencoder"

SD_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
    ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)


# -- parameter layout ---------------------------------------------------------------------------

def test_kl_f8_has_original_names_shapes_and_count():
    with torch.device("meta"):
        model = ae.AutoencoderKL(ddconfig=SD_DDCONFIG, embed_dim=4)
    assert sum(p.numel() for p in model.parameters()) == 83_653_863
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "encoder.mid.attn_1.proj_out.bias": (512,),
        "encoder.conv_out.weight": (8, 512, 3, 3),
        "quant_conv.weight": (8, 8, 1, 1),
        "post_quant_conv.weight": (4, 4, 1, 1),
        "decoder.conv_in.weight": (512, 4, 3, 3),
        "decoder.mid.block_2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for key, shape in expected.items():
        assert shapes.get(key) == shape, key
    assert "encoder.down.3.downsample.conv.weight" not in shapes  # lowest level has no downsample
    assert "decoder.up.0.upsample.conv.weight" not in shapes  # full-resolution level has none
    assert not any(k.startswith("loss.") for k in shapes)
    assert model.get_last_layer() is model.decoder.conv_out.weight


def test_vq_f4_has_original_names():
    dd = {**SD_DDCONFIG, "double_z": False, "z_channels": 3, "ch_mult": [1, 2, 4]}
    with torch.device("meta"):
        model = ae.VQModel(ddconfig=dd, n_embed=8192, embed_dim=3)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["quantize.embedding.weight"] == (8192, 3)
    assert shapes["quant_conv.weight"] == (3, 3, 1, 1)
    assert shapes["post_quant_conv.weight"] == (3, 3, 1, 1)
    assert shapes["encoder.conv_out.weight"] == (3, 512, 3, 3)
    assert "decoder.up.2.upsample.conv.weight" in shapes
    assert not any("ema" in k or "steps_since_used" in k for k in shapes)


def test_original_yaml_params_splat_in():
    params = {
        "embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": dict(TINY_KL),
        "lossconfig": {"target": "ldm.modules.losses.LPIPSWithDiscriminator", "params": {"disc_start": 50001}},
        "image_key": "image", "ckpt_path": None, "ignore_keys": [],
    }
    assert isinstance(ae.AutoencoderKL(**params), ae.AutoencoderKL)
    vq_params = {
        "embed_dim": 4, "n_embed": 64, "monitor": "val/rec_loss", "ddconfig": dict(TINY_VQ),
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"},
        "remap": None, "sane_index_shape": True, "batch_resize_range": None, "use_ema": False,
    }
    assert isinstance(ae.VQModel(**vq_params), ae.VQModel)
    with pytest.raises(ValueError, match="give_pre_endd"):
        ae.AutoencoderKL(ddconfig={**TINY_KL, "give_pre_endd": True}, embed_dim=4)
    with pytest.raises(ValueError, match="double_z"):
        ae.AutoencoderKL(ddconfig=TINY_VQ, embed_dim=4)
    with pytest.raises(ValueError, match="multiples of norm_num_groups=32"):
        ae.AutoencoderKL(ddconfig={**TINY_KL, "ch": 24}, embed_dim=4)


def test_ckpt_path_loads_full_and_standalone_checkpoints(tmp_path):
    source = tiny_kl()
    full = {f"first_stage_model.{k}": v for k, v in source.state_dict().items()}
    full["model.diffusion_model.out.2.weight"] = torch.zeros(1)
    torch.save({"state_dict": full, "global_step": 3}, tmp_path / "sd.ckpt")
    standalone = {**source.state_dict(), "loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.zeros(1)}
    save_file(standalone, str(tmp_path / "ae.safetensors"))
    for name in ("sd.ckpt", "ae.safetensors"):
        torch.manual_seed(1)
        loaded = ae.AutoencoderKL(ddconfig=TINY_KL, embed_dim=4, ckpt_path=tmp_path / name)
        for k, v in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(ValueError, match="does not fit"):
        ae.AutoencoderKL(ddconfig={**TINY_KL, "ch_mult": [1, 1]}, embed_dim=4, ckpt_path=tmp_path / "ae.safetensors")


def test_configs_load_and_build():
    names = sorted(path.stem for path in CONFIGS.glob("*.yaml"))
    assert {"kl-f8", "kl-f4", "vq-f4", "kl-f4-emoji64", "kl-f2-emoji64", "tiny-kl", "tiny-vq"} <= set(names)
    for name in names:
        cfg = load_config(CONFIGS / f"{name}.yaml", Stage1Config)  # every file is a whole stage-1 config
        assert cfg.model.kind == ("vq" if name.startswith(("vq", "tiny-vq")) else "kl")
        with torch.device("meta"):
            model = ae.build_autoencoder(cfg.model)
        if name == "kl-f8":
            assert sum(p.numel() for p in model.parameters()) == 83_653_863
        if cfg.loss.perceptual_weight == 0:
            loss = ae.build_autoencoder_loss(cfg.loss)
            assert loss.perceptual is None


@pytest.mark.parametrize("name", ["kl-f2-emoji64", "kl-f2-shapes64"])
def test_f2_configs_halve_the_side_once_and_have_no_attention(name):
    # 64x64 images <-> 32x32x4 latents, and no attention block anywhere: over 1,024 positions the mid
    # block's cost a step 2.5x (bench/RESULTS.md, "Stage 1 at f2").
    model = ae.build_autoencoder(load_config(CONFIGS / f"{name}.yaml", Stage1Config).model).eval()
    assert not any(isinstance(m, ae.modules.AttnBlock) for m in model.modules())
    with torch.no_grad():
        z = model.encode(torch.rand(2, 3, 64, 64) * 2 - 1).mode()
        assert z.shape == (2, 4, 32, 32)
        assert model.decode(z).shape == (2, 3, 64, 64)


# -- KL posterior --------------------------------------------------------------------------------

def test_posterior_matches_closed_forms():
    torch.manual_seed(0)
    moments = torch.randn(2, 6, 3, 3)
    moments[0, 3, 0, 0] = 50.0  # clamped to 20
    post = ae.DiagonalGaussianDistribution(moments)
    mean, logvar = moments[:, :3], moments[:, 3:].clamp(-30, 20)
    assert post.logvar[0, 0, 0, 0] == 20.0
    normal = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    standard = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    kl = torch.distributions.kl_divergence(normal, standard).sum((1, 2, 3))
    torch.testing.assert_close(post.kl(), kl)
    other = ae.DiagonalGaussianDistribution(torch.randn(2, 6, 3, 3))
    other_normal = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(post.kl(other), torch.distributions.kl_divergence(normal, other_normal).sum((1, 2, 3)))
    sample = torch.randn(2, 3, 3, 3)
    torch.testing.assert_close(post.nll(sample), -normal.log_prob(sample).sum((1, 2, 3)))
    assert torch.equal(post.mode(), mean)
    a = post.sample(torch.Generator().manual_seed(5))
    b = post.sample(torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, post.sample(torch.Generator().manual_seed(6)))
    big = ae.DiagonalGaussianDistribution(torch.cat([torch.full((1, 1, 100, 100), 2.0), torch.full((1, 1, 100, 100), math.log(0.25))], 1))
    draws = big.sample(torch.Generator().manual_seed(0))
    assert abs(draws.mean().item() - 2.0) < 0.02 and abs(draws.std().item() - 0.5) < 0.02
    det = ae.DiagonalGaussianDistribution(moments, deterministic=True)
    assert torch.equal(det.sample(), det.mean) and torch.equal(det.kl(), torch.zeros(2))


def test_kl_forward_shapes_and_modes():
    model = tiny_kl().eval()
    x = pattern_images(2)
    posterior = model.encode(x)
    assert posterior.mean.shape == (2, 4, 16, 16)
    x_hat, post = model(x, sample_posterior=False)
    assert x_hat.shape == x.shape
    torch.testing.assert_close(x_hat, model.decode(post.mode()))
    assert model.encode_latents(x, sample=False).shape == (2, 4, 16, 16)


# -- vector quantizer ----------------------------------------------------------------------------

def _quantizer(**kw) -> ae.VectorQuantizer:
    torch.manual_seed(0)
    vq = ae.VectorQuantizer(8, 2, **kw)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[i, -i] for i in range(8)], dtype=torch.float32))
    return vq


def test_vq_picks_nearest_code_with_straight_through_gradient():
    vq = _quantizer()
    z = (torch.tensor([[0.2, 0.1], [2.9, -3.2], [6.6, -6.0], [7.4, -7.9]]).t().reshape(1, 2, 2, 2)).requires_grad_()
    z_q, loss, info = vq(z)
    assert info.indices.tolist() == [0, 3, 6, 7]
    torch.testing.assert_close(z_q.detach().reshape(2, 4).t(), vq.embedding.weight[info.indices].detach())
    upstream = torch.randn_like(z_q)
    (z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)  # gradient passes through quantisation unchanged
    assert vq.embedding.weight.grad is None  # only the loss trains the codebook


@pytest.mark.parametrize("legacy", [False, True])
def test_vq_loss_puts_beta_on_the_right_term(legacy):
    vq = _quantizer(beta=0.25, legacy=legacy)
    z = torch.tensor([[0.5, 1.0], [3.2, -2.6]]).t().reshape(1, 2, 1, 2).requires_grad_()
    z_q, loss, _ = vq(z)
    codes = torch.tensor([[0.0, 0.0], [3.0, -3.0]]).t().reshape(1, 2, 1, 2)
    mse = F.mse_loss(z.detach(), codes)
    torch.testing.assert_close(loss, 1.25 * mse)  # same value either way
    loss.backward()
    commitment_weight, codebook_weight = (1.0, 0.25) if legacy else (0.25, 1.0)
    n = z.numel()
    torch.testing.assert_close(z.grad, commitment_weight * 2 * (z.detach() - codes) / n)
    expected_w_grad = torch.zeros(8, 2)
    expected_w_grad[0] = codebook_weight * 2 * (codes - z.detach())[0, :, 0, 0] / n
    expected_w_grad[3] = codebook_weight * 2 * (codes - z.detach())[0, :, 0, 1] / n
    torch.testing.assert_close(vq.embedding.weight.grad, expected_w_grad)


def test_vq_perplexity_and_usage():
    vq = _quantizer().eval()
    z = torch.tensor([[0.0, 0.0], [1.0, -1.0], [2.0, -2.0], [3.0, -3.0]] * 2).t().reshape(1, 2, 2, 4)
    _, _, info = vq(z)
    assert info.perplexity.item() == pytest.approx(4.0, rel=1e-5)  # four codes, evenly used
    assert info.usage.item() == pytest.approx(0.5)
    _, _, info = vq(torch.zeros(1, 2, 2, 4))
    assert info.perplexity.item() == pytest.approx(1.0, rel=1e-5) and info.usage.item() == pytest.approx(1 / 8)


def test_vq_ema_codebook_update():
    decay, eps = 0.5, 1e-5
    vq = _quantizer(codebook_ema=True, ema_decay=decay, ema_eps=eps, beta=0.25).train()
    with torch.no_grad():
        vq.ema_embed_sum.copy_(vq.embedding.weight)
    old = vq.embedding.weight.detach().clone()
    z = torch.tensor([[0.2, 0.4], [-0.2, 0.0], [3.4, -3.0]]).t().reshape(1, 2, 1, 3).requires_grad_()
    _, loss, info = vq(z)
    assert info.indices.tolist() == [0, 0, 3]
    assert not vq.embedding.weight.requires_grad
    counts = torch.zeros(8)
    counts[0], counts[3] = 2, 1
    sums = torch.zeros(8, 2)
    sums[0] = torch.tensor([0.0, 0.4])
    sums[3] = torch.tensor([3.4, -3.0])
    cluster = decay * torch.ones(8) + (1 - decay) * counts
    embed_sum = decay * old + (1 - decay) * sums
    total = cluster.sum()
    smoothed = (cluster + eps) / (total + 8 * eps) * total
    torch.testing.assert_close(vq.embedding.weight, embed_sum / smoothed[:, None])
    codes = old[[0, 0, 3]].t().reshape(1, 2, 1, 3)
    torch.testing.assert_close(loss, 0.25 * F.mse_loss(z.detach(), codes))  # commitment only
    vq.eval()
    before = vq.embedding.weight.clone()
    vq(z)
    assert torch.equal(before, vq.embedding.weight)  # no updates in eval mode


def test_vq_dead_codes_are_reinitialised_from_the_batch():
    vq = _quantizer(dead_code_steps=2).train()
    z = torch.tensor([[0.1, 0.0], [0.0, 0.1], [-0.1, 0.05], [0.05, -0.1]]).t().reshape(1, 2, 2, 2)
    candidates = z.permute(0, 2, 3, 1).reshape(-1, 2)
    vq(z)
    assert torch.equal(vq.embedding.weight[1:], _quantizer().embedding.weight[1:])  # one unused step: kept
    vq(z)
    w = vq.embedding.weight.detach()
    assert torch.equal(w[0], torch.zeros(2))  # code 0 is in use: untouched
    for row in w[1:]:
        assert any(torch.equal(row, c) for c in candidates), row
    assert vq.steps_since_used.tolist() == [0] * 8
    _, loss, _ = vq(z.clone().requires_grad_())
    loss.backward()  # in-place codebook edits leave autograd intact


def test_vq_remap_and_index_shape(tmp_path):
    np.save(tmp_path / "used.npy", np.array([0, 3, 6]))
    vq = ae.VectorQuantizer(8, 2, remap=str(tmp_path / "used.npy"), unknown_index="extra", sane_index_shape=True)
    with torch.no_grad():
        vq.embedding.weight.copy_(torch.tensor([[i, -i] for i in range(8)], dtype=torch.float32))
    z = torch.tensor([[0.0, 0.0], [3.0, -3.0], [6.0, -6.0], [5.0, -5.0]]).t().reshape(1, 2, 2, 2)
    z_q, _, info = vq.eval()(z)
    assert info.indices.shape == (1, 2, 2)
    assert info.indices.flatten().tolist() == [0, 1, 2, 3]  # 5 is not in `used`: the extra index
    torch.testing.assert_close(vq.embed_indices(info.indices)[..., :1, :], z_q[..., :1, :])
    assert "used" in vq.state_dict()


def test_vq_ema_state_loads_either_way():
    plain = tiny_vq()
    ema = tiny_vq(codebook_ema=True)
    ema.load_state_dict(plain.state_dict(), strict=True)
    torch.testing.assert_close(ema.quantize.ema_embed_sum, plain.quantize.embedding.weight)
    plain.load_state_dict(ema.state_dict(), strict=True)


def test_vq_model_interfaces():
    model = tiny_vq(sane_index_shape=True).eval()
    x = pattern_images(2)
    x_hat, q_loss, info = model(x)
    assert x_hat.shape == x.shape and q_loss.dim() == 0 and info.indices.shape == (2, 16, 16)
    quant, _, _ = model.encode(x)
    # z + (z_q - z) (the straight-through form) equals z_q only up to rounding
    torch.testing.assert_close(model.decode_indices(info.indices), model.decode(quant), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(model.decode_latents(model.encode_latents(x)), x_hat)


# -- numerics and speed paths ----------------------------------------------------------------------

def test_groupnorm_runs_in_float32():
    norm = GroupNorm32(32, 64, eps=1e-6)
    x = (torch.randn(2, 64, 8, 8) * 100 + 1000).bfloat16()
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.group_norm(x.float(), 32, eps=1e-6), atol=2e-2, rtol=1e-2)


def test_channels_last_matches_nchw():
    model = tiny_kl().eval()
    x = pattern_images(2)
    with torch.no_grad():
        reference = model(x, sample_posterior=False)[0]
        model.to(memory_format=torch.channels_last)
        fast = model(x, sample_posterior=False)[0]
    torch.testing.assert_close(fast, reference, atol=1e-4, rtol=1e-3)


def test_measure_scale_factor():
    torch.manual_seed(0)
    batches = [torch.randn(3, 4) * 5 + 1, torch.randn(2, 4) * 5 + 1]
    expected = 1 / torch.cat([b.flatten() for b in batches]).double().std().item()
    assert ae.measure_scale_factor(lambda b: b, batches) == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="at least two"):
        ae.measure_scale_factor(lambda b: b, [])


# -- training and checkpoints ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["kl", "vq"])
def test_tiny_model_overfits(kind):
    cfg = load_config(CONFIGS / f"tiny-{kind}.yaml", Stage1Config, overrides=["loss.disc_start=1000000"])
    torch.manual_seed(0)
    model, loss_fn = ae.build_autoencoder(cfg.model), ae.build_autoencoder_loss(cfg.loss)
    opt = torch.optim.Adam(list(model.parameters()) + loss_fn.autoencoder_parameters(), lr=2e-3)
    x = pattern_images(4, size=16)
    losses = []
    for step in range(40):
        x_hat, reg, *_ = model(x)
        loss, logs = loss_fn.generator_loss(x, x_hat, reg, step, model.get_last_layer())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(logs["l1"])
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_safetensors_round_trip(tmp_path):
    for model, again in ((tiny_kl(), lambda: tiny_kl()), (tiny_vq(codebook_ema=True), lambda: tiny_vq(codebook_ema=True))):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        path = tmp_path / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        torch.manual_seed(123)
        restored = again()
        restored.load_state_dict(load_file(str(path)), strict=True)
        x = pattern_images(2)
        with torch.no_grad():
            a = model.eval().decode(model.encode_latents(x, sample=False))
            b = restored.eval().decode(restored.encode_latents(x, sample=False))
        assert torch.equal(a, b)


@pytest.mark.parametrize("groups", [32, 8])
def test_matches_diffusers_autoencoder_kl(groups):
    diffusers = pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    # diffusers' VAE has attention in the middle block only
    dd = {**TINY_KL, "attn_resolutions": [], "norm_num_groups": groups}
    torch.manual_seed(0)
    ours = ae.AutoencoderKL(ddconfig=dd, embed_dim=4).eval()
    with torch.no_grad():  # move norms and biases off their identity initialisation
        for name, p in ours.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    config = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=groups, sample_size=32,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 64],
    )
    theirs = diffusers.AutoencoderKL(**config).eval()
    theirs.load_state_dict(convert_ldm_vae_checkpoint(ours.state_dict(), config), strict=True)
    x = pattern_images(2)
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        ours_post, their_post = ours.encode(x), theirs.encode(x).latent_dist
        torch.testing.assert_close(ours_post.mean, their_post.mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours_post.logvar, their_post.logvar, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(ours.decode(z), theirs.decode(z).sample, atol=1e-5, rtol=1e-4)
