"""training.optimizers: the fused Adam / AdamW the trainers build steps as torch's per-tensor loop does."""
import pytest
import torch

from training.optimizers import adam


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
