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


# -- closed forms for Gaussian data: exact networks of any kind, exact sampler statistics, the paper's rescale --

def gaussian_posterior_mean(schedule, mean, cov):
    """E[x0 | x_t] at (fractional) t, float64, for images [B, C, d, P] whose columns (along dim -2) are
    independent draws of N(mean [d], cov [d, d]): mean + sqrt(a) cov (a cov + (1 - a) I)^-1 (x_t - sqrt(a) mean).
    Unlike `correlated_gaussian_model` this has a mean and stays finite at a = 0 (zero terminal SNR),
    where it is the mean."""
    mean = torch.as_tensor(mean, dtype=torch.float64).view(-1, 1)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    eye = torch.eye(len(cov), dtype=torch.float64)

    def posterior_mean(x, t):
        a = alpha_at(schedule, t).view(-1, 1, 1, 1)
        gain = a.sqrt() * cov @ torch.linalg.inv(a * cov + (1 - a) * eye)  # [B, 1, d, d]
        return mean + gain @ (x.double() - a.sqrt() * mean)

    return posterior_mean


def gaussian_network(schedule, parameterization, mean, cov):
    """The exact network (x_t, t) -> "eps", "x0" or "v" output (in x's dtype) for the Gaussian data of
    `gaussian_posterior_mean`; v = sqrt(a) eps - sqrt(1 - a) x0."""
    posterior_mean = gaussian_posterior_mean(schedule, mean, cov)

    def model(x, t):
        a = alpha_at(schedule, t).view(-1, 1, 1, 1)
        x0 = posterior_mean(x, t)
        eps = (x.double() - a.sqrt() * x0) / (1 - a).sqrt()
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[parameterization]
        return out.to(x.dtype)

    return model


def conditional_gaussian_network(schedule, parameterization, cond, uncond):
    """A stand-in text-conditional network (x_t, t, context) -> raw output: the exact network of the
    Gaussian data cond = (mean, cov) for images whose context[:, 0, 0] > 0, of uncond = (mean, cov)
    for the others (see `gaussian_network`)."""
    with_cond = gaussian_network(schedule, parameterization, *cond)
    without = gaussian_network(schedule, parameterization, *uncond)

    def model(x, t, context):
        pick = (context[:, 0, 0] > 0).view(-1, *[1] * (x.ndim - 1))
        return torch.where(pick, with_cond(x, t), without(x, t))

    return model


def affine_statistics(sample, d):
    """Exact mean [d] and covariance [d, d] of a deterministic sampler's output when its map from the
    start noise z ~ N(0, I_d) is affine, x = b + A z, as every ODE sampler on a `gaussian_network` is.

    `sample(z)` maps noise images [1, 1, d, d + 1] to outputs of that shape; the columns 0, e_1, .., e_d
    of z give b and A at once, so there is no Monte Carlo error (float64 in, float64 out).
    """
    z = torch.cat([torch.zeros(d, 1, dtype=torch.float64), torch.eye(d, dtype=torch.float64)], dim=1)
    out = sample(z.view(1, 1, d, d + 1))[0, 0].double()
    b = out[:, 0]
    A = out[:, 1:] - b[:, None]
    return b, A @ A.T


def paper_rescaled_cfg(pos, neg, weight, rescale):
    """Lin et al. 2024, Algorithm 2 ("Classifier-Free Guidance with Rescale"), written out in numpy on
    model outputs [B, ...]: cfg = neg + w (pos - neg), times rescale std(pos) / std(cfg) + 1 - rescale,
    the stds per sample over all other dims (torch's default std is Bessel-corrected: ddof=1)."""
    pos, neg = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    cfg = neg + weight * (pos - neg)
    axes = tuple(range(1, cfg.ndim))
    factor = pos.std(axis=axes, ddof=1, keepdims=True) / cfg.std(axis=axes, ddof=1, keepdims=True)
    return cfg * (rescale * factor + (1 - rescale))
