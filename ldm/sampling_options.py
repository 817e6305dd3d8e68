"""The settings of one sampling run, validated once (`SamplingOptions`).

generate.py builds them from its arguments and writes their fields into every PNG; `generate_latents`
and `sample_latents` (ldm/generation.py) take them as they are. What a sampler supports (eta, spacings,
RePaint) comes from its registry entry (`ldm.samplers.SAMPLERS`), never from its name.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from numbers import Integral, Real

from .denoiser import NoiseLevels
from .samplers import SamplerSpec, get_sampler, samplers_with
from .schedule import NoiseSchedule

IMG2IMG_STRENGTH = 0.6  # SDEdit's usual share of the schedule; inpainting starts from noise (1.0)
# torch.Generator.manual_seed takes 0 .. 2**64 - 1; it also wraps negative seeds onto that range, which
# would make seed -1 another name for 2**64 - 1, so they are refused.
MAX_SEED = 2**64 - 1
# A sanity bound (useful scales are about 1 to 30): far beyond it the guided prediction only saturates,
# and huge scales overflow into black (NaN) images.
MAX_GUIDANCE = 100.0


class OptionError(ValueError):
    """A bad sampling setting: one line naming the field (`field`), so a command line can name its flag."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field

    def for_flags(self, flags: dict[str, str]) -> ValueError:
        """This error in a command line's terms: `flags` maps fields to flags, e.g. {"guidance": "--cfg"}."""
        flag, message = flags.get(self.field), str(self)
        if flag is None:
            return ValueError(message)
        if message.startswith(self.field + " "):
            return ValueError(flag + message[len(self.field):])
        return ValueError(f"{flag}: {message}")


def _integer(name: str, value, low: int = 1, high: int | None = None) -> None:
    """`value` must be an integer >= low (and <= high when given)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise OptionError(name, f"{name} must be an integer, got {value!r}")
    if high is not None and not low <= value <= high:
        limit = "2**64 - 1" if high == MAX_SEED else high  # reads better than 18446744073709551615
        raise OptionError(name, f"{name} must be an integer in [{low}, {limit}], got {value!r}")
    if value < low:
        raise OptionError(name, f"{name} must be positive, got {value!r}" if low == 1 else
                          f"{name} must be an integer >= {low}, got {value!r}")


def _number(name: str, value, low: float | None = None, high: float | None = None) -> None:
    finite = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or (low is not None and value < low) or (high is not None and value > high):
        if low is None:
            expected = "a finite number"
        else:
            expected = f"a number >= {low}" if high is None else f"a number in [{low}, {high}]"
        raise OptionError(name, f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: every setting of a generation but the model, prompts and images.

    sampler: a name in `ldm.samplers.SAMPLERS`. steps: levels to run, at most the schedule's timesteps
    (LDM's "uniform" spacing may run more, see `steps_run`). guidance: classifier-free guidance scale s
    in [0, 100] (1 = conditional model only, 0 = unconditional); guidance_rescale: its phi in [0, 1].
    eta: DDIM's stochasticity (>= 0), for samplers that take it.
    spacing: noise-level spacing, one the sampler allows; None = its default for the schedule.
    seed: in [0, 2**64 - 1]; image i of a batch draws its noise from seed + i. height, width: output
    size in pixels (generate_latents needs them). negative: prompt(s) to guide away from instead of "".
    strength: share of the schedule run on an init image, in [0, 1] (0 returns the image's latents);
    None = 0.6 for img2img, 1.0 for inpainting.
    repaint_jump, repaint_resamples: RePaint's resampling (each >= 1), for samplers that support it.

    A bad field raises a one-line `OptionError` (a ValueError) naming it; `resolve` fills the
    schedule-dependent defaults and checks the steps against the schedule.
    """

    sampler: str = "ddim"
    steps: int = 50
    guidance: float = 5.0
    guidance_rescale: float = 0.0
    eta: float = 0.0
    spacing: str | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    negative: str | Sequence[str] | None = None
    strength: float | None = None
    repaint_jump: int = 10
    repaint_resamples: int = 1

    def __post_init__(self):
        spec = self._spec()
        _integer("steps", self.steps)
        _number("guidance", self.guidance, 0.0, MAX_GUIDANCE)
        _number("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _number("eta", self.eta, 0.0)
        if self.eta != 0 and not spec.eta:
            raise OptionError("eta", f"eta applies to the {' / '.join(samplers_with('eta'))} sampler only, "
                                     f"got eta={self.eta} with {self.sampler!r}")
        if self.spacing is not None and self.spacing not in spec.spacings:
            raise OptionError("spacing", f"spacing {self.spacing!r} does not apply to the {self.sampler} sampler "
                                         f"(expected one of {', '.join(spec.spacings)})")
        _integer("seed", self.seed, 0, MAX_SEED)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name))
        negative = self.negative
        single = negative is None or isinstance(negative, str)
        if not single and not (isinstance(negative, Sequence) and all(isinstance(n, str) for n in negative)):
            raise OptionError("negative", f"negative must be a prompt or a list of prompts, got {self.negative!r}")
        if self.strength is not None:
            _number("strength", self.strength, 0.0, 1.0)
        _integer("repaint_jump", self.repaint_jump)
        _integer("repaint_resamples", self.repaint_resamples)
        if self.repaint_resamples > 1 and not spec.resampling:
            raise OptionError("repaint_resamples",
                              f"repaint_resamples (RePaint) applies to the {' / '.join(samplers_with('resampling'))} "
                              f"samplers only, got {self.repaint_resamples} with {self.sampler!r}")

    def _spec(self) -> SamplerSpec:
        try:
            return self.spec
        except ValueError as e:  # an unknown sampler name
            raise OptionError("sampler", str(e)) from None

    @classmethod
    def build(cls, options: SamplingOptions | None = None, **fields) -> SamplingOptions:
        """`options` with `fields` replaced, or new options from `fields` alone (validated either way)."""
        if options is None:
            return cls(**fields)
        return replace(options, **fields) if fields else options

    @property
    def spec(self) -> SamplerSpec:
        """The sampler's registry entry (what it supports)."""
        return get_sampler(self.sampler)

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def resolve(self, schedule: NoiseSchedule, *, inpainting: bool = False) -> SamplingOptions:
        """These options with the defaults filled: the sampler's spacing for `schedule`, and the strength
        for img2img (or, with `inpainting`, for a mask). An OptionError if the steps do not fit `schedule`."""
        strength = self.strength
        if strength is None:
            strength = 1.0 if inpainting else IMG2IMG_STRENGTH
        resolved = replace(self, spacing=self.spacing or self.spec.spacing_for(schedule), strength=strength)
        resolved._check_steps(NoiseLevels(schedule))
        return resolved

    def _check_steps(self, levels: NoiseLevels) -> None:
        """The steps against the schedule: at most one step per timestep it was trained on (the sigma
        samplers could take more, at levels between those, but nothing is gained and a typo such as
        --steps 250000 would only allocate), and step counts for which a spacing repeats levels."""
        if self.steps > levels.num_timesteps:
            raise OptionError("steps", f"steps must be an integer in [1, {levels.num_timesteps}] (the schedule's "
                                       f"timesteps), got {self.steps}")
        try:
            self.steps_run(levels)
        except ValueError as e:
            raise OptionError("steps", str(e)) from None

    def steps_run(self, levels: NoiseLevels) -> int:
        """How many steps the sampler runs with these (resolved) options: `steps`, except LDM's "uniform"
        spacing when steps does not divide the schedule's length."""
        space = self.spec.state_space
        return len(space.state_scales(levels, space.levels(levels, self.steps, self.spacing)))

    def metadata(self) -> dict:
        """The settings every generated image records (generate.py's PNG text), in a fixed order."""
        return {"negative": self.negative, "sampler": self.sampler, "steps": self.steps, "guidance": self.guidance,
                "guidance_rescale": self.guidance_rescale, "spacing": self.spacing, "eta": self.eta, "size": self.size}
