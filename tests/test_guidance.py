"""Classifier-free guidance: one batched call, the guidance formula, variance channels, rescale."""
import pytest
import torch

from ldm.parameterization import parameterization as kind
from ldm.diffusion import Diffusion
from ldm.guidance import ClassifierFreeGuidance, guide, rescale_guided


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


@pytest.mark.parametrize("parameterization", ["eps", "v", "x0"])
def test_guidance_rescale_on_x0(schedule, parameterization):
    cond, uncond = contexts()
    model = CountingModel()
    diffusion = Diffusion(schedule, parameterization=parameterization)
    x, t = torch.randn(3, 4, 6, 6), torch.tensor([50.0, 400.0, 900.0])
    a = schedule.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
    to_x0 = lambda out: kind(parameterization).to_eps_x0(out, x, a)[1]  # noqa: E731
    plain = ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0)(x, t)
    full = ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0, rescale=1.0)(x, t)
    half = ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0, rescale=0.5)(x, t)
    x0_cond, x0_plain, x0_full = to_x0(model(x, t, cond)), to_x0(plain), to_x0(full)
    # phi = 1: the guided x0 gets the conditional x0's per-sample std, keeping its direction.
    torch.testing.assert_close(x0_full.std(dim=(1, 2, 3)), x0_cond.std(dim=(1, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x0_full / x0_full.std(dim=(1, 2, 3), keepdim=True),
                               x0_plain / x0_plain.std(dim=(1, 2, 3), keepdim=True), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(to_x0(half), (x0_full + x0_plain) / 2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rescale_guided(x0_plain, x0_cond, 0.0), x0_plain)
    with pytest.raises(ValueError, match="rescale"):
        ClassifierFreeGuidance(model, diffusion, cond, uncond, 9.0, rescale=1.5)
