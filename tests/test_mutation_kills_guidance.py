"""Classifier-free guidance behaviour the mutation run (make mutation) found untested: rescale 0 is plain
guidance exactly, and the context checks of ClassifierFreeGuidance with their messages."""
import pytest
import torch

from ldm.diffusion import Diffusion
from ldm.guidance import ClassifierFreeGuidance


def model(x, t, context):
    """Any (x, t, context) -> output that depends on all three."""
    return torch.sin(x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1)) + t.view(-1, 1, 1, 1) / 1000


def test_rescale_zero_is_plain_guidance_bit_for_bit(schedule):
    """phi = 0 turns rescale off: the eps output must not take the round trip through v at all."""
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    x, t = torch.randn(2, 4, 6, 6, generator=g), torch.full((2,), 400.0)
    plain = ClassifierFreeGuidance(model, Diffusion(schedule, parameterization="eps"), cond, uncond, 6.0)
    off = ClassifierFreeGuidance(model, Diffusion(schedule, parameterization="eps"), cond, uncond, 6.0, rescale=0.0)
    u, c = model(x, t, uncond), model(x, t, cond)
    assert torch.equal(off(x, t), plain(x, t))
    assert torch.equal(off(x, t), u + 6.0 * (c - u))


def test_contexts_are_checked_only_when_guidance_needs_the_unconditional_half(schedule):
    diffusion = Diffusion(schedule)
    cond = torch.zeros(2, 3, 4)
    ClassifierFreeGuidance(model, diffusion, cond, None, scale=1.0)  # s = 1 never calls the model on uncond
    with pytest.raises(ValueError, match=r"^guidance needs an unconditional context shaped like the "
                                         r"conditional \(2, 3, 4\), got None$"):
        ClassifierFreeGuidance(model, diffusion, cond, None, scale=2.0)
    with pytest.raises(ValueError, match=r"^guidance needs an unconditional context shaped like the "
                                         r"conditional \(2, 3, 4\), got \(1, 3, 4\)$"):
        ClassifierFreeGuidance(model, diffusion, cond, torch.zeros(1, 3, 4), scale=7.5)
