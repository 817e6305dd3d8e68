"""training.optimizers: the fused Adam / AdamW the trainers build steps as torch's per-tensor loop does; the lr schedule."""
import math

import pytest
import torch

from training.optimizers import adam, warmup_then_decay


def _trajectory(make_optimizer, steps: int = 5) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(shape, generator=generator).requires_grad_() for shape in [(7, 3), (5,), (2, 3, 3, 3)]]
    optimizer = make_optimizer(params)
    for _ in range(steps):
        loss = sum((p.sin() * torch.randn(p.shape, generator=generator)).sum() for p in params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return [p.detach() for p in params]


@pytest.mark.parametrize("decoupled", [False, True])
def test_fused_adam_steps_like_torchs_per_tensor_loop(decoupled):
    options = dict(lr=0.05, betas=(0.9, 0.99), weight_decay=0.1)
    reference = torch.optim.AdamW if decoupled else torch.optim.Adam
    fused = _trajectory(lambda ps: adam(ps, decoupled_weight_decay=decoupled, **options))
    plain = _trajectory(lambda ps: reference(ps, foreach=False, **options))
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    other = _trajectory(lambda ps: (torch.optim.Adam if decoupled else torch.optim.AdamW)(ps, **options))
    assert max((a - b).abs().max().item() for a, b in zip(fused, other)) > 1e-3  # the weight decay's kind shows


def test_fused_where_torch_has_the_kernel_only():
    on_cpu = adam([torch.zeros(3, requires_grad=True)], lr=1e-3)
    assert on_cpu.param_groups[0]["fused"] is True
    on_meta = adam([torch.zeros(3, device="meta", requires_grad=True)], lr=1e-3)
    assert not on_meta.param_groups[0]["fused"]


def _lrs(decay: str, warmup: int, total: int | None, steps: int = 11, **options) -> list[float]:
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2.0)
    schedule = warmup_then_decay(optimizer, warmup, decay, total, **options)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    return lrs


def test_warmup_then_cosine_decay_follows_the_closed_form():
    # warm-up to step 3, then the half cosine: 2 * 0.5 * (1 + cos(pi s / 10)); cos(pi / 2) = 0 at s = 5
    expected = [2 * min(1, (s + 1) / 4) * 0.5 * (1 + math.cos(math.pi * s / 10)) for s in range(11)]
    assert _lrs("cosine", 4, 10) == pytest.approx(expected)
    assert _lrs("cosine", 4, 10)[5] == pytest.approx(1.0) and _lrs("cosine", 4, 10)[10] == pytest.approx(0, abs=1e-12)
    assert _lrs("cosine", 0, 4, steps=7)[4:] == pytest.approx([0, 0, 0], abs=1e-12)  # stays at 0 past the end
    assert _lrs("constant", 4, None) == pytest.approx([0.5, 1.0, 1.5] + [2.0] * 8)


def test_warmup_then_cooldown_is_flat_then_a_straight_line_to_zero():
    # total 10, cooldown 0.4: full lr (after the warm-up) to step 6, then 2 * (10 - s) / 4 down to 0 at s = 10
    expected = [0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 2.0, 1.5, 1.0, 0.5, 0.0, 0.0]
    assert _lrs("cooldown", 4, 10, steps=12, cooldown_fraction=0.4) == pytest.approx(expected, abs=1e-12)
    assert _lrs("cooldown", 0, 10) == pytest.approx([2.0] * 8 + [2 * 2 / 2, 2 * 1 / 2, 0.0], abs=1e-12)  # 0.2


def test_lr_decay_errors_name_the_setting():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    with pytest.raises(ValueError, match="lr decay must be one of constant, cosine, cooldown, got 'linear'"):
        warmup_then_decay(optimizer, 0, "linear", 10)
    with pytest.raises(ValueError, match="train.max_steps"):
        warmup_then_decay(optimizer, 0, "cosine", None)
    with pytest.raises(ValueError, match="cooldown lr decay needs the run's total steps"):
        warmup_then_decay(optimizer, 0, "cooldown", None)
    with pytest.raises(ValueError, match="cooldown_fraction must be in"):
        warmup_then_decay(optimizer, 0, "cooldown", 10, cooldown_fraction=0)
