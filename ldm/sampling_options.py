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


def _integer(name: str, value, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if positive and value < 1:
        raise ValueError(f"{name} must be positive, got {value!r}")


def _number(name: str, value, low: float | None = None, high: float | None = None) -> None:
    finite = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not finite or (low is not None and value < low) or (high is not None and value > high):
        if low is None:
            expected = "a finite number"
        else:
            expected = f"a number >= {low}" if high is None else f"a number in [{low}, {high}]"
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclass(frozen=True)
class SamplingOptions:
    """How to sample: every setting of a generation but the model, prompts and images.

    sampler: a name in `ldm.samplers.SAMPLERS`. steps: levels to run (LDM's "uniform" spacing may run
    more, see `steps_run`). guidance: classifier-free guidance scale s (1 = conditional model only);
    guidance_rescale: its phi in [0, 1]. eta: DDIM's stochasticity, for samplers that take it.
    spacing: noise-level spacing, one the sampler allows; None = its default for the schedule.
    seed: image i of a batch draws its noise from seed + i. height, width: output size in pixels
    (generate_latents needs them). negative: prompt(s) to guide away from instead of "".
    strength: share of the schedule run on an init image; None = 0.6 for img2img, 1.0 for inpainting.
    repaint_jump, repaint_resamples: RePaint's resampling, for samplers that support it.

    A bad field raises a one-line ValueError naming it; `resolve` fills the schedule-dependent defaults.
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
        spec = self.spec
        _integer("steps", self.steps, positive=True)
        _number("guidance", self.guidance)
        _number("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        _number("eta", self.eta, 0.0)
        if self.eta != 0 and not spec.eta:
            raise ValueError(f"eta applies to the {' / '.join(samplers_with('eta'))} sampler only, "
                             f"got eta={self.eta} with {self.sampler!r}")
        if self.spacing is not None and self.spacing not in spec.spacings:
            raise ValueError(f"spacing {self.spacing!r} does not apply to the {self.sampler} sampler "
                             f"(expected one of {', '.join(spec.spacings)})")
        _integer("seed", self.seed)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                _integer(name, getattr(self, name), positive=True)
        negative = self.negative
        single = negative is None or isinstance(negative, str)
        if not single and not (isinstance(negative, Sequence) and all(isinstance(n, str) for n in negative)):
            raise ValueError(f"negative must be a prompt or a list of prompts, got {self.negative!r}")
        if self.strength is not None:
            _number("strength", self.strength, 0.0, 1.0)
        _integer("repaint_jump", self.repaint_jump, positive=True)
        _integer("repaint_resamples", self.repaint_resamples, positive=True)
        if self.repaint_resamples > 1 and not spec.resampling:
            raise ValueError(f"repaint_resamples (RePaint) applies to the {' / '.join(samplers_with('resampling'))} "
                             f"samplers only, got {self.repaint_resamples} with {self.sampler!r}")

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
        for img2img (or, with `inpainting`, for a mask)."""
        strength = self.strength
        if strength is None:
            strength = 1.0 if inpainting else IMG2IMG_STRENGTH
        return replace(self, spacing=self.spacing or self.spec.spacing_for(schedule), strength=strength)

    def steps_run(self, levels: NoiseLevels) -> int:
        """How many steps the sampler runs with these (resolved) options: `steps`, except LDM's "uniform"
        spacing when steps does not divide the schedule's length."""
        space = self.spec.state_space
        return len(space.state_scales(levels, space.levels(levels, self.steps, self.spacing)))

    def metadata(self) -> dict:
        """The settings every generated image records (generate.py's PNG text), in a fixed order."""
        return {"negative": self.negative, "sampler": self.sampler, "steps": self.steps, "guidance": self.guidance,
                "guidance_rescale": self.guidance_rescale, "spacing": self.spacing, "eta": self.eta, "size": self.size}
