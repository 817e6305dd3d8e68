"""How training picks the timestep t of each sample.

`UniformTimestepSampler` is the DDPM/LDM default. `LossSecondMomentSampler` is improved DDPM's
importance sampling (Nichol & Dhariwal 2021, Sec. 3.3): p(t) proportional to the root mean square
of the last few losses seen at t, which lowers the variance of the L_vlb estimate. Both return
per-sample weights 1 / (T p(t)) so that the weighted loss stays an unbiased estimate of the
uniform-t objective. Their state is saved with the training checkpoint so a resumed run draws
the same timesteps.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _sampling_device(generator: torch.Generator | None) -> torch.device:
    # A torch.Generator only draws on its own device; sample there, then move the result.
    return generator.device if generator is not None else torch.device("cpu")


class UniformTimestepSampler:
    """t ~ U{0, ..., T-1}; all weights 1."""

    def __init__(self, num_timesteps: int):
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be positive, got {num_timesteps}")
        self.num_timesteps = num_timesteps

    def probabilities(self) -> Tensor:
        """p(t) [T], float64."""
        return torch.full((self.num_timesteps,), 1.0 / self.num_timesteps, dtype=torch.float64)

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Timesteps [B] (int64) and loss weights [B] (float32), both on `device`."""
        t = torch.randint(
            0, self.num_timesteps, (batch_size,), generator=generator, device=_sampling_device(generator)
        )
        return t.to(device), torch.ones(batch_size, device=device)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Uniform sampling ignores losses."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"uniform timestep sampler has no state, got keys {sorted(state)}")


class LossSecondMomentSampler(UniformTimestepSampler):
    """Importance sampling of t from a history of `history_per_term` losses per timestep.

    Until every timestep has a full history, t is drawn uniformly (the paper's warm-up). After
    that p(t) = (1 - uniform_prob) * rms_t / sum(rms) + uniform_prob / T, where the floor
    `uniform_prob / T` keeps every t reachable so its history never goes stale.
    Under torch.distributed, `update` gathers the losses of all ranks so the histories (and
    hence the distributions) stay identical everywhere.
    """

    def __init__(self, num_timesteps: int, history_per_term: int = 10, uniform_prob: float = 0.001):
        super().__init__(num_timesteps)
        if history_per_term < 1:
            raise ValueError(f"history_per_term must be positive, got {history_per_term}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.history_per_term = history_per_term
        self.uniform_prob = uniform_prob
        self.history = torch.zeros(num_timesteps, history_per_term, dtype=torch.float64)
        self.counts = torch.zeros(num_timesteps, dtype=torch.int64)

    @property
    def warmed_up(self) -> bool:
        return bool((self.counts == self.history_per_term).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up:
            return super().probabilities()
        rms = self.history.pow(2).mean(dim=1).sqrt()
        p = rms / rms.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(
        self, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        if not self.warmed_up:
            return super().sample(batch_size, device, generator)
        p = self.probabilities()
        sample_device = _sampling_device(generator)
        t = torch.multinomial(p.to(sample_device), batch_size, replacement=True, generator=generator).to(device)
        weights = 1.0 / (self.num_timesteps * p.to(device)[t])
        return t, weights.to(torch.float32)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses [B] at timesteps t [B] (unweighted, detached)."""
        t = t.detach().long().cpu()
        losses = losses.detach().to(torch.float64).cpu()
        if t.shape != losses.shape or t.ndim != 1:
            raise ValueError(f"t and losses must both be [B], got {tuple(t.shape)} and {tuple(losses.shape)}")
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (t, losses))
            t = torch.cat([g[0] for g in gathered])
            losses = torch.cat([g[1] for g in gathered])
        for step, loss in zip(t.tolist(), losses.tolist()):
            count = int(self.counts[step])
            if count == self.history_per_term:
                # Full: drop the oldest loss, append the newest at the end.
                self.history[step, :-1] = self.history[step, 1:].clone()
                self.history[step, -1] = loss
            else:
                self.history[step, count] = loss
                self.counts[step] = count + 1

    def state_dict(self) -> dict:
        return {"history": self.history.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"history", "counts"}:
            raise ValueError(f"loss-aware sampler state needs keys 'history' and 'counts', got {sorted(state)}")
        history, counts = state["history"], state["counts"]
        if tuple(history.shape) != tuple(self.history.shape) or tuple(counts.shape) != tuple(self.counts.shape):
            raise ValueError(
                f"sampler state has history {tuple(history.shape)}, expected {tuple(self.history.shape)} "
                f"(num_timesteps, history_per_term)"
            )
        self.history = history.detach().to(torch.float64).cpu().clone()
        self.counts = counts.detach().to(torch.int64).cpu().clone()
