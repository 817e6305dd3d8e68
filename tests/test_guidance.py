"""Classifier-free guidance: one batched call, the guidance formula, variance channels, rescale."""
import numpy as np
import pytest
import torch
from sampling_helpers import T, alpha_at, conditional_gaussian_network, paper_rescaled_cfg

from ldm.denoiser import Denoiser, make_timesteps
from ldm.diffusion import Diffusion
from ldm.guidance import ClassifierFreeGuidance, guide, rescale_guided
from ldm.samplers import sample_ddim
from ldm.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr


class CountingModel:
    """(x, t, context) -> output depending nonlinearly on all three; records batch sizes."""

    def __init__(self, channels_out=None):
        self.batches, self.channels_out = [], channels_out

    def __call__(self, x, t, context):
        self.batches.append(x.shape[0])
        out = torch.tanh(x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)) + t.view(-1, 1, 1, 1) / 1000
        if self.channels_out:
            out = torch.cat([out, -out], dim=1)
        return out


def contexts(batch=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 5, 8, generator=g), torch.randn(batch, 5, 8, generator=g)


def test_guidance_scale_one_is_the_conditional_model(schedule):
    cond, uncond = contexts()
    model = CountingModel()
    cfg = ClassifierFreeGuidance(model, Diffusion(schedule), cond, uncond, scale=1.0, rescale=0.7)
    x, t = torch.randn(3, 4, 6, 6), torch.full((3,), 500.0)
    assert torch.equal(cfg(x, t), model(x, t, cond))
    assert model.batches == [3, 3]  # one call each: no unconditional half


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_guidance_formula_in_one_batched_call(schedule, parameterization):
    cond, uncond = contexts()
    model = CountingModel()
    cfg = ClassifierFreeGuidance(model, Diffusion(schedule, parameterization=parameterization), cond, uncond, 7.5)
    x, t = torch.randn(3, 4, 6, 6), torch.full((3,), 321.0)
    out = cfg(x, t)
    assert model.batches == [6]
    u, c = model(x, t, uncond), model(x, t, cond)
    torch.testing.assert_close(out, u + 7.5 * (c - u))
    assert torch.equal(guide(u, c, 0.0), u)
    torch.testing.assert_close(guide(u, c, 1.0), c)


def test_guidance_keeps_the_conditional_variance_channels(schedule):
    cond, uncond = contexts()
    model = CountingModel(channels_out=8)
    cfg = ClassifierFreeGuidance(model, Diffusion(schedule, learn_sigma=True), cond, uncond, 3.0)
    x, t = torch.randn(3, 4, 6, 6), torch.full((3,), 100.0)
    out = cfg(x, t)
    u, c = model(x, t, uncond), model(x, t, cond)
    torch.testing.assert_close(out[:, :4], u[:, :4] + 3 * (c[:, :4] - u[:, :4]))
    torch.testing.assert_close(out[:, 4:], c[:, 4:])


def v_of(output, kind, x_t, a):
    """v = sqrt(a) eps - sqrt(1 - a) x0 from a network output of `kind` at x_t, in numpy float64, from the
    closed forms (not through ldm.parameterization): eps gives (eps - sqrt(1 - a) x_t) / sqrt(a), x0 gives
    (sqrt(a) x_t - x0) / sqrt(1 - a)."""
    out, x, a = (np.asarray(v, dtype=np.float64) for v in (output, x_t, a))
    if kind == "eps":
        return (out - np.sqrt(1 - a) * x) / np.sqrt(a)
    if kind == "x0":
        return (np.sqrt(a) * x - out) / np.sqrt(1 - a)
    return out


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
@pytest.mark.parametrize("phi", [0.5, 0.7, 1.0])
def test_guidance_rescale_is_the_papers_algorithm_2_on_v(schedule, parameterization, phi):
    """Lin et al. 2024 rescale the model outputs of their v-prediction model (section 3.4, Algorithm 2):
    whatever this network predicts, the guided output is the paper's formula applied to its v."""
    cond, uncond = contexts()
    model = CountingModel()
    diffusion = Diffusion(schedule, parameterization=parameterization)
    x, t = torch.randn(3, 4, 6, 6), torch.tensor([50.0, 612.5, 900.0])
    a = alpha_at(schedule, t).view(-1, 1, 1, 1).numpy()  # also between table entries
    out = ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0, rescale=phi)(x, t)
    paper = paper_rescaled_cfg(v_of(model(x, t, cond), parameterization, x, a),
                               v_of(model(x, t, uncond), parameterization, x, a), 9.0, phi)
    np.testing.assert_allclose(v_of(out, parameterization, x, a), paper, rtol=1e-4, atol=1e-4)
    plain = v_of(ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0)(x, t), parameterization, x, a)
    assert np.abs(paper - plain).max() > 0.1  # the rescale does something here
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0, rescale=1.5)


def test_guidance_rescale_matches_diffusers_for_v_models_not_eps_models(schedule):
    """diffusers' `rescale_noise_cfg` works on the raw output: the same as here for a v network (the
    paper's case), not for an eps network (there it rescales eps, here v)."""
    pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    cond, uncond = contexts()
    model = CountingModel()
    x, t = torch.randn(3, 4, 6, 6), torch.tensor([50.0, 400.0, 900.0])
    u, c = model(x, t, uncond), model(x, t, cond)
    v_net = ClassifierFreeGuidance(model, Diffusion(schedule, parameterization="v"), cond, uncond, 7.5, rescale=0.7)
    assert torch.equal(v_net(x, t), rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.7))
    eps_net = ClassifierFreeGuidance(model, Diffusion(schedule), cond, uncond, 7.5, rescale=0.7)
    assert (eps_net(x, t) - rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.7)).abs().max() > 0.1
    phi_zero = ClassifierFreeGuidance(model, Diffusion(schedule), cond, uncond, 7.5, rescale=0.0)
    torch.testing.assert_close(phi_zero(x, t), rescale_noise_cfg(u + 7.5 * (c - u), c, guidance_rescale=0.0))


def test_guided_ddim_with_rescale_matches_diffusers_on_a_zero_snr_v_model():
    """The paper's setting end to end: zero terminal SNR, v prediction, trailing DDIM, guidance 7.5 and
    rescale 0.7, on the exact networks of two Gaussian image distributions, against diffusers'
    DDIMScheduler with `rescale_noise_cfg` on the v outputs (what its pipelines do)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    schedule = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    i = torch.arange(4.0)
    cov = 0.09 * 0.6 ** (i[:, None] - i[None, :]).abs()
    network = conditional_gaussian_network(schedule, "v", ([1.0, 0.4, -0.6, 0.8], cov), ([0.0] * 4, cov / 0.09 * 0.64))
    cond = torch.ones(8, 1, 1)
    noise = torch.randn(8, 1, 4, 16, generator=torch.Generator().manual_seed(0))
    timesteps = make_timesteps(T, 25, "trailing")
    guided = ClassifierFreeGuidance(network, Diffusion(schedule, parameterization="v"), cond, -cond, 7.5, 0.7)
    ours = sample_ddim(Denoiser(guided, Diffusion(schedule, parameterization="v")), noise, timesteps)

    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        set_alpha_to_one=False, clip_sample=False, prediction_type="v_prediction",
                                        rescale_betas_zero_snr=True, timestep_spacing="trailing")
    scheduler.set_timesteps(25)
    assert scheduler.timesteps.tolist() == timesteps
    x = noise.clone()
    for t in scheduler.timesteps:
        tt = t.float().expand(8)
        v_cond, v_uncond = network(x, tt, cond), network(x, tt, -cond)
        v = rescale_noise_cfg(v_uncond + 7.5 * (v_cond - v_uncond), v_cond, guidance_rescale=0.7)
        x = scheduler.step(v, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_guidance_rescale_leaves_a_flat_prediction_alone():
    """At t = T - 1 of a zero-terminal-SNR schedule v = -x0 is the predicted mean; for a flat image both
    stds are 0 and the paper's ratio is 0 / 0 (nan)."""
    flat, cond = torch.full((2, 4, 3, 3), -0.8), torch.full((2, 4, 3, 3), -0.3)
    assert torch.equal(rescale_guided(flat, cond, 0.7), flat)
    with np.errstate(invalid="ignore"):
        assert np.isnan(paper_rescaled_cfg(cond, cond, 7.5, 0.7)).all()
    guided = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rescale_guided(guided, cond, 0.7), 0.3 * guided)  # cond flat: its std is 0
    assert torch.equal(rescale_guided(guided, cond, 0.0), guided)
