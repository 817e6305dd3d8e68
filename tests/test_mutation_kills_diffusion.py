"""Diffusion behaviour the mutation run (make mutation) found untested: per-sample generators give each
sample its own timestep, model_kwargs reach the network, clipping and the returned eps of
p_mean_variance, min-SNR's gamma check, `to`, and the messages of bad inputs."""
import pytest
import torch
from sampling_helpers import gens

from ldm.diffusion import Diffusion, min_snr_weight
from ldm.timestep_sampler import LossSecondMomentSampler, UniformTimestepSampler


def echo_model(x_t, t, **kwargs):
    return torch.zeros_like(x_t)


def test_each_sample_draws_its_timestep_from_its_own_generator(schedule):
    diffusion = Diffusion(schedule)
    x0 = torch.zeros(3, 2, 4, 4)
    batch = diffusion.training_losses(echo_model, x0, generator=gens(10, 3))["t"]
    alone = [diffusion.training_losses(echo_model, x0[:1], generator=gens(10 + i, 1))["t"].item() for i in range(3)]
    assert batch.tolist() == alone and batch.shape == (3,)


def test_model_kwargs_reach_the_network(schedule):
    seen = {}

    def model(x_t, t, context=None):
        seen["context"] = context
        return torch.zeros_like(x_t)

    Diffusion(schedule).training_losses(model, torch.zeros(2, 1, 2, 2), model_kwargs={"context": "caption"},
                                        generator=torch.Generator().manual_seed(0))
    assert seen["context"] == "caption"


def test_p_mean_variance_clips_x0_to_the_pixel_range_and_returns_eps(schedule):
    diffusion = Diffusion(schedule)
    g = torch.Generator().manual_seed(0)
    x_t, out = torch.randn(2, 3, 4, 4, generator=g) * 3, torch.randn(2, 3, 4, 4, generator=g)
    t = torch.tensor([100, 900])
    free = diffusion.p_mean_variance(out, x_t, t)
    clipped = diffusion.p_mean_variance(out, x_t, t, clip_denoised=True)
    assert free["pred_x0"].min() < -1 and free["pred_x0"].max() > 1
    torch.testing.assert_close(clipped["pred_x0"], free["pred_x0"].clamp(-1, 1))
    torch.testing.assert_close(free["pred_eps"], out)  # an eps network's output is its eps


def test_min_snr_gamma_must_be_positive():
    snr = torch.tensor([0.1, 0.5, 4.0])
    torch.testing.assert_close(min_snr_weight(snr, 0.5, "eps"), torch.tensor([1.0, 1.0, 0.125]))
    for gamma in (0.0, -1.0):
        with pytest.raises(ValueError, match=f"^min_snr_gamma must be positive, got {gamma}$"):
            min_snr_weight(snr, gamma, "eps")


def test_to_moves_the_schedule(schedule):
    diffusion = Diffusion(type(schedule)(schedule.betas))
    assert diffusion.to("meta") is diffusion and diffusion.schedule.betas.device.type == "meta"


def test_bad_input_messages(schedule):
    with pytest.raises(ValueError, match=r"^unknown loss 'l3' \(expected 'l2' or 'l1'\)$"):
        Diffusion(schedule, loss="l3")
    diffusion = Diffusion(schedule)
    with pytest.raises(ValueError, match=r"^noise shape \(1, 2, 2, 2\) does not match x0 shape \(2, 2, 2, 2\)$"):
        diffusion.training_losses(echo_model, torch.zeros(2, 2, 2, 2), noise=torch.zeros(1, 2, 2, 2))
    with pytest.raises(ValueError, match=r"^diffusion state needs key 'timestep_sampler', got \['x'\]$"):
        diffusion.load_state_dict({"x": 1})
    learned = Diffusion(schedule, learn_sigma=True)
    with pytest.raises(ValueError, match="^learn_sigma: model output has 3 channels, expected 4$"):
        learned.p_mean_variance(torch.zeros(1, 3, 5, 5), torch.zeros(1, 2, 5, 5), torch.tensor([10]))


def _x_t_seen(diffusion, x0, **kwargs):
    seen = []
    diffusion.training_losses(lambda x_t, t: seen.append(x_t) or torch.zeros_like(x_t), x0, **kwargs)
    return seen[0]


def test_noise_comes_from_the_given_tensor_or_generators(schedule):
    diffusion = Diffusion(schedule)
    t = torch.tensor([10, 700])
    a = schedule.alphas_cumprod.double()[t].view(-1, 1, 1, 1)
    x0 = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(_x_t_seen(diffusion, x0, t=t, noise=noise), expected, rtol=1e-6, atol=1e-6)
    # given noise wins over generators, per-sample ones too
    torch.testing.assert_close(_x_t_seen(diffusion, x0, t=t, noise=noise, generator=gens(0, 2)), expected,
                               rtol=1e-6, atol=1e-6)
    # a generator: its standard normal draw in x0's dtype (float64 draws differ from float32 ones)
    drawn = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(_x_t_seen(diffusion, x0, t=t, generator=torch.Generator().manual_seed(3)),
                               a.sqrt() * x0 + (1 - a).sqrt() * drawn, rtol=1e-6, atol=1e-6)
    # per-sample generators: sample i's noise depends only on its own generator
    zeros = torch.zeros(3, 2, 3, 3)
    batch = _x_t_seen(diffusion, zeros, t=torch.tensor([5, 5, 5]), generator=gens(20, 3))
    for i in range(3):
        alone = _x_t_seen(diffusion, zeros[:1], t=torch.tensor([5]), generator=gens(20 + i, 1))
        torch.testing.assert_close(batch[i:i + 1], alone)


def test_given_timesteps_are_checked(schedule):
    diffusion = Diffusion(schedule)
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match=r"^t must have shape \[2\], got \(3,\)$"):
        diffusion.training_losses(echo_model, x0, t=torch.tensor([1, 2, 3]))
    for bad in ([-1, 5], [5, 1000]):
        with pytest.raises(ValueError, match=r"^timesteps must lie in \[0, 999\]$"):
            diffusion.training_losses(echo_model, x0, t=torch.tensor(bad))


def test_options_are_checked_by_name_and_pick_their_sampler(schedule):
    for option, value, expected in (("loss", "l3", "'l2' or 'l1'"),
                                    ("decoder_nll", "exact", "'gaussian' or 'discretized'"),
                                    ("fixed_variance", "mid", "'small' or 'large'"),
                                    ("timestep_sampling", "cosine", "'uniform' or 'importance'")):
        with pytest.raises(ValueError, match=rf"^unknown {option} '{value}' \(expected {expected}\)$"):
            Diffusion(schedule, **{option: value})
    with pytest.raises(ValueError, match="^min_snr_gamma must be positive or None, got 0$"):
        Diffusion(schedule, min_snr_gamma=0)
    assert Diffusion(schedule, min_snr_gamma=0.5).min_snr_gamma == 0.5
    assert type(Diffusion(schedule).timestep_sampler) is UniformTimestepSampler
    assert type(Diffusion(schedule, timestep_sampling="importance").timestep_sampler) is LossSecondMomentSampler


def test_a_wrong_output_shape_names_both_shapes(schedule):
    x0 = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match=r"^model output has shape \(1, 3, 2, 2\), expected \(1, 2, 2, 2\)$"):
        Diffusion(schedule).training_losses(lambda x, t: torch.zeros(1, 3, 2, 2), x0, t=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"^model output has shape \(1, 2, 2, 2\), expected \(1, 4, 2, 2\) "
                                         r"\(learn_sigma needs twice the input channels\)$"):
        Diffusion(schedule, learn_sigma=True).training_losses(echo_model, x0, t=torch.tensor([3]))
