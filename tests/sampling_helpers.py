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


def correlated_gaussian_model(schedule, cov):
    """The exact eps network for images [B, C, d, P] whose columns (along dim -2) are independent
    draws of N(0, cov), cov [d, d]: E[x0 | x_t] = sqrt(a) cov (a cov + (1 - a) I)^-1 x_t."""
    cov = cov.double()

    def model(x, t):
        a = alpha_at(schedule, t).view(-1, 1, 1, 1)
        eye = torch.eye(len(cov), dtype=torch.float64)
        gain = a.sqrt() * cov @ torch.linalg.inv(a * cov + (1 - a) * eye)  # [B, 1, d, d]
        x0 = gain @ x.double()
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).to(x.dtype)

    return model
