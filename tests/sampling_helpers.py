"""Stand-in networks and small helpers shared by the sampler, denoiser and generation tests."""
import numpy as np
import torch

T = 1000  # timesteps of the test schedule


def alpha_at(schedule, t):
    """alpha_bar at fractional t by log-sigma interpolation, written independently with numpy."""
    ab = schedule.alphas_cumprod.double().numpy()
    t = t.double().cpu().numpy()
    with np.errstate(divide="ignore"):  # zero terminal SNR: the last log-sigma is inf
        log_sigma = np.interp(t, np.arange(len(ab)), 0.5 * np.log((1 - ab) / ab))
    exact = ab[np.clip(np.round(t).astype(int), 0, len(ab) - 1)]
    return torch.from_numpy(np.where(t == np.round(t), exact, 1 / (1 + np.exp(2 * log_sigma))))


def fixed_model(x, t):
    """A deterministic, nonlinear stand-in network depending on x and t."""
    t = t.float().view(-1, 1, 1, 1)
    return torch.tanh(x) * (0.3 + t / 2000) + 0.1 * torch.sin(3 * x + t / 100)


def gens(seed, n):
    """n per-image CPU generators seeded seed, seed + 1, ..."""
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]
