"""`SamplingOptions`: one validated object of sampling settings, and the sampler capabilities it reads."""
import dataclasses
import re

import pytest

from ldm.denoiser import NoiseLevels
from ldm.sampling_options import OptionError, SamplingOptions
from ldm.samplers import SAMPLERS, samplers_with
from ldm.schedule import NoiseSchedule, make_betas, rescale_zero_terminal_snr


@pytest.mark.parametrize("fields, message", [
    (dict(sampler="lms"), "unknown sampler 'lms'"),
    (dict(steps=0), "steps must be positive, got 0"),
    (dict(steps=2.5), "steps must be an integer, got 2.5"),
    (dict(steps=True), "steps must be an integer"),
    (dict(guidance=float("nan")), "guidance must be a number in [0.0, 100.0], got nan"),
    (dict(guidance=float("inf")), "guidance must be a number in [0.0, 100.0], got inf"),
    (dict(guidance=1e30), "guidance must be a number in [0.0, 100.0], got 1e+30"),
    (dict(guidance=-1.0), "guidance must be a number in [0.0, 100.0], got -1.0"),
    (dict(guidance="7"), "guidance must be a number in [0.0, 100.0]"),
    (dict(guidance_rescale=1.5), "guidance_rescale must be a number in [0.0, 1.0], got 1.5"),
    (dict(eta=-0.1), "eta must be a number >= 0.0, got -0.1"),
    (dict(sampler="euler", eta=0.5), "eta applies to the ddim sampler only, got eta=0.5 with 'euler'"),
    (dict(sampler="ddim", spacing="karras"), "spacing 'karras' does not apply to the ddim sampler"),
    (dict(spacing="cosine"), "spacing 'cosine' does not apply"),
    (dict(seed="1"), "seed must be an integer"),
    (dict(seed=-1), "seed must be an integer in [0, 2**64 - 1], got -1"),
    (dict(seed=2**64), "seed must be an integer in [0, 2**64 - 1], got 18446744073709551616"),
    (dict(height=0), "height must be positive, got 0"),
    (dict(width=-8), "width must be positive, got -8"),
    (dict(negative=3), "negative must be a prompt or a list of prompts"),
    (dict(strength=1.5), "strength must be a number in [0.0, 1.0], got 1.5"),
    (dict(repaint_jump=0), "repaint_jump must be positive"),
    (dict(repaint_resamples=0), "repaint_resamples must be positive"),
    (dict(sampler="heun", repaint_resamples=2), "repaint_resamples (RePaint) applies to the ddpm / ddim samplers"),
])
def test_bad_field_is_one_line_naming_it(fields, message):
    with pytest.raises(OptionError) as error:
        SamplingOptions(**fields)
    text = str(error.value)
    assert message in text and "\n" not in text
    assert error.value.field in fields and error.value.field in text


def test_option_errors_in_a_command_line_s_terms():
    flags = {"guidance": "--cfg", "eta": "--eta"}
    with pytest.raises(OptionError) as error:
        SamplingOptions(guidance=float("nan"))
    assert str(error.value.for_flags(flags)) == "--cfg must be a number in [0.0, 100.0], got nan"
    with pytest.raises(OptionError) as error:
        SamplingOptions(sampler="euler", eta=0.5)
    assert str(error.value.for_flags(flags)) == "--eta applies to the ddim sampler only, got eta=0.5 with 'euler'"
    with pytest.raises(OptionError) as error:
        SamplingOptions(sampler="lms")
    assert str(error.value.for_flags({"sampler": "--sampler"})).startswith("--sampler: unknown sampler 'lms'")
    with pytest.raises(OptionError) as error:
        SamplingOptions(steps=0)
    assert str(error.value.for_flags(flags)) == "steps must be positive, got 0"  # no flag given for it


@pytest.mark.parametrize("fields, message", [
    (dict(sampler="ddim", steps=1001), "steps must be an integer in [1, 1000] (the schedule's timesteps), got 1001"),
    (dict(sampler="euler", steps=250000), "got 250000"),  # karras could space them; nothing would be gained
])
def test_resolve_checks_the_steps_against_the_schedule(fields, message):
    schedule = NoiseSchedule(make_betas("ldm-linear"))
    with pytest.raises(OptionError, match=re.escape(message)) as error:
        SamplingOptions(**fields).resolve(schedule)
    assert error.value.field == "steps"
    assert SamplingOptions(sampler="ddim", steps=1000).resolve(schedule).steps == 1000


def test_good_options_and_replace_revalidates():
    options = SamplingOptions(sampler="ddim", steps=4, guidance=1, eta=1.0, negative=["a", "b"], strength=0.0)
    assert options.eta == 1.0 and options.guidance == 1
    with pytest.raises(ValueError, match="eta applies"):
        dataclasses.replace(options, sampler="plms")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 5
    assert SamplingOptions.build(options) is options
    assert SamplingOptions.build(options, seed=3).seed == 3 and SamplingOptions.build(steps=7).steps == 7


def test_resolve_fills_the_defaults_once():
    plain = NoiseSchedule(make_betas("ldm-linear"))
    zero_snr = NoiseSchedule(rescale_zero_terminal_snr(make_betas("ldm-linear")))
    assert SamplingOptions(sampler="ddim").resolve(plain).spacing == "uniform"
    assert SamplingOptions(sampler="ddpm").resolve(plain).spacing == "linspace"
    assert SamplingOptions(sampler="euler").resolve(plain).spacing == "karras"
    assert SamplingOptions(sampler="euler").resolve(zero_snr).spacing == "trailing"
    assert SamplingOptions(sampler="plms").resolve(zero_snr).spacing == "uniform"  # PLMS cannot start at T - 1
    assert SamplingOptions(sampler="ddim", spacing="leading").resolve(zero_snr).spacing == "leading"
    assert SamplingOptions().resolve(plain).strength == 0.6
    assert SamplingOptions().resolve(plain, inpainting=True).strength == 1.0
    assert SamplingOptions(strength=0.3).resolve(plain, inpainting=True).strength == 0.3


def test_steps_run_and_metadata():
    levels = NoiseLevels(NoiseSchedule(make_betas("ldm-linear")))
    plain = NoiseSchedule(make_betas("ldm-linear"))
    # 1000 // 30 = 33: LDM's uniform spacing gives t = 1, 34, ..., 991, 31 levels.
    assert SamplingOptions(sampler="ddim", steps=30).resolve(plain).steps_run(levels) == 31
    assert SamplingOptions(sampler="ddim", steps=25).resolve(plain).steps_run(levels) == 25
    assert SamplingOptions(sampler="heun", steps=30).resolve(plain).steps_run(levels) == 30
    assert SamplingOptions(sampler="heun", steps=30, spacing="uniform").resolve(plain).steps_run(levels) == 31
    options = SamplingOptions(sampler="heun", steps=3, guidance=4.0, negative="blurry", height=16, width=32)
    assert options.resolve(plain).metadata() == {
        "negative": "blurry", "sampler": "heun", "steps": 3, "guidance": 4.0, "guidance_rescale": 0.0,
        "spacing": "karras", "eta": 0.0, "size": "32x16"}


def test_registry_declares_capabilities():
    assert samplers_with("eta") == ["ddim"] and samplers_with("resampling") == ["ddpm", "ddim"]
    for name, spec in SAMPLERS.items():
        assert spec.space in ("timestep", "sigma"), name
        assert spec.default_spacing in spec.spacings and spec.zero_snr_spacing in spec.spacings, name
