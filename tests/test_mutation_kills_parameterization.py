"""Parameterization behaviour the mutation run (make mutation) found untested: noise scales follow x_t's
device as well as its dtype."""
import pytest
import torch

from ldm.parameterization import noise_scales, parameterization


@pytest.mark.parametrize("alpha_bar", [0.25, torch.tensor(0.25, dtype=torch.float64)])
def test_noise_scales_live_on_x_t_device_and_dtype(alpha_bar):
    # meta stands in for an accelerator: the only second device of a CPU-only machine
    like = torch.zeros(2, 3, device="meta", dtype=torch.float16)
    scales = noise_scales(alpha_bar, like)
    for s in (scales.signal, scales.noise):
        assert s.device.type == "meta" and s.dtype == torch.float16
    eps, x0 = parameterization("v").to_eps_x0(like, like, alpha_bar)
    assert eps.device.type == "meta" and x0.device.type == "meta"
    # on the CPU the values are the closed forms sqrt(a), sqrt(1 - a)
    cpu = noise_scales(alpha_bar, torch.zeros(1, dtype=torch.float64))
    assert (float(cpu.signal), float(cpu.noise)) == pytest.approx((0.5, 0.75 ** 0.5))
