"""The settings the diffusion math takes, as typed, frozen, checked values.

  DiffusionSpec    the `config.diffusion` section: schedule, parameterisation, loss.
  SamplerSettings  the `config.sampler` section: how to sample (sampler, steps, guidance).

Made once where the config enters (`configs.specs.build`); `schedules`, `parameterization`, `losses`
and the samplers' callers read their attributes and never see a ConfigDict. Neither has
defaults of its own: every value comes from the config (`configs/base.py` holds the defaults),
so a config that leaves a field out is refused instead of silently training another model.
Both are hashable, so jitted functions may close over them or take them as static arguments.
`sample.py`'s flags change a SamplerSettings with `overridden`; the generator, the eval grid
during training and the sample manifest all read that one value.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax.numpy as jnp

from diffusion import guidance, losses, parameterization, samplers, schedules

SECTION = 'diffusion'


@dataclasses.dataclass(frozen=True)
class DiffusionSpec:
  """Noise schedule, parameterisation and loss; each field is documented in configs/base.py."""
  schedule: str
  num_train_timesteps: int
  beta_start: float
  beta_end: float
  zero_terminal_snr: bool
  logsnr_shift: float
  sigma_min: float
  sigma_max: float
  rho: float
  sigma_data: float
  p_mean: float
  p_std: float
  noise_sampling: str
  sampling_grid: str
  steps_offset: int
  set_alpha_to_one: bool
  prediction: str
  loss_target: str
  loss_weighting: str
  min_snr_gamma: float
  noise_offset: float

  def __post_init__(self):
    for name, choices in (('schedule', schedules.SCHEDULES),
                          ('noise_sampling', schedules.NOISE_SAMPLINGS),
                          ('sampling_grid', schedules.SAMPLING_GRIDS),
                          ('prediction', parameterization.PREDICTIONS),
                          ('loss_target', losses.LOSS_TARGETS),
                          ('loss_weighting', losses.LOSS_WEIGHTINGS)):
      value = getattr(self, name)
      if value not in choices:
        raise ValueError(f'{SECTION}.{name}={value!r} is not supported; choose one of '
                         f'{", ".join(choices)}.')
    if self.num_train_timesteps < 1:
      raise ValueError(f'{SECTION}.num_train_timesteps must be >= 1, got '
                       f'{self.num_train_timesteps}.')
    if not 0 < self.sigma_min <= self.sigma_max:
      raise ValueError(f'{SECTION}.sigma_min={self.sigma_min} and sigma_max={self.sigma_max} '
                       'must satisfy 0 < sigma_min <= sigma_max.')
    if not self.noise_offset >= 0:
      raise ValueError(f'{SECTION}.noise_offset must be >= 0 (0: off; 0.05-0.1 is usual), got '
                       f'{self.noise_offset}.')
    if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) or (
        self.steps_offset < 0):
      raise ValueError(f'{SECTION}.steps_offset must be an integer >= 0 (diffusers\' steps_offset '
                       f'of the \'leading\' grid; SD: 1), got {self.steps_offset!r}.')
    if self.sigma_data <= 0:
      raise ValueError(f'{SECTION}.sigma_data must be > 0, got {self.sigma_data}.')
    if self.prediction == 'eps' and self.zero_terminal_snr:
      raise ValueError(f"{SECTION}.zero_terminal_snr=True cannot be used with {SECTION}."
                       "prediction='eps' (x0 is undefined at alpha=0, Lin et al. 2023 sec 3.2); "
                       "use 'v'.")

  def replace(self, **changes) -> DiffusionSpec:
    return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class SamplerSettings:
  """One sampling recipe; each field is documented in configs/base.py (`config.sampler`)."""
  name: str
  num_steps: int
  guidance_scale: float
  guidance_rescale: float
  guidance_interval: tuple[float, ...]  # () = everywhere, or (lo, hi) in log-SNR.
  thresholding: bool
  threshold_percentile: float
  use_ema: bool
  options: tuple[tuple[str, float], ...]  # The sampler's keyword options given (eta, s_churn, ...).

  def __post_init__(self):
    samplers.get_sampler(self.name)
    if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int) or self.num_steps < 1:
      raise ValueError(f'sampler.num_steps={self.num_steps!r} must be a positive integer '
                       '(sample.py --steps).')
    if isinstance(self.guidance_scale, bool) or not isinstance(
        self.guidance_scale, (int, float)) or not self.guidance_scale >= 0:
      raise ValueError(f'sampler.guidance_scale={self.guidance_scale!r} must be >= 0 (0: '
                       'unconditional, 1: conditional only, > 1: guided).')
    if len(self.guidance_interval) not in (0, 2) or (
        self.guidance_interval and not self.guidance_interval[0] <= self.guidance_interval[1]):
      raise ValueError(f'sampler.guidance_interval={self.guidance_interval!r} must be () or '
                       '(lo, hi) with lo <= hi, in log-SNR (sample.py --guidance_interval=lo,hi).')
    if not 0 <= self.threshold_percentile <= 100:
      raise ValueError(f'sampler.threshold_percentile={self.threshold_percentile!r} (sample.py '
                       '--threshold): expected a percentile in [0, 100] (e.g. 99.5; 0 clips x0 to '
                       '[-1, 1]).')
    samplers.check_options(self.name, dict(self.options))  # Unknown options raise here.

  def replace(self, **changes) -> SamplerSettings:
    return dataclasses.replace(self, **changes)

  def with_options(self, **options) -> SamplerSettings:
    """A copy with these sampler options added or changed; None values are ignored."""
    given = {**dict(self.options), **{k: float(v) for k, v in options.items() if v is not None}}
    return dataclasses.replace(self, options=tuple(sorted(given.items())))

  def sampler_kwargs(self) -> dict[str, jnp.ndarray]:
    """Every option of the sampler as a float32 scalar (the given ones over its defaults)."""
    return samplers.sampler_options(self.name, **dict(self.options))

  def guidance(self) -> guidance.Guidance:
    """The traced guidance strengths (new values never recompile a jitted sampler)."""
    lo, hi = self.guidance_interval or (-math.inf, math.inf)
    return guidance.Guidance(
        scale=jnp.float32(self.guidance_scale), rescale=jnp.float32(self.guidance_rescale),
        interval=(jnp.float32(lo), jnp.float32(hi)),
        threshold_percentile=jnp.float32(self.threshold_percentile))

  def record(self) -> dict[str, Any]:
    """What a sample manifest records of these settings (JSON-ready)."""
    return {'sampler': self.name, 'steps': self.num_steps, 'guidance': self.guidance_scale,
            'options': dict(self.options), 'guidance_rescale': self.guidance_rescale,
            'guidance_interval': list(self.guidance_interval) or None,
            'threshold': self.threshold_percentile if self.thresholding else None,
            'ema': self.use_ema}


def overridden(settings: SamplerSettings, *, sampler: str | None = None,
               options: dict[str, float | None] | None = None, **fields) -> SamplerSettings:
  """`settings` changed the way sample.py's flags change them; None leaves a value unchanged.

  A different `sampler` drops the configured options (the config's eta is DDIM's); `options`
  (eta, s_churn, ...) are then added; an option the sampler does not take raises ValueError.
  """
  if sampler and sampler != settings.name:
    settings = settings.replace(name=sampler, options=())
  given = {k: v for k, v in fields.items() if v is not None}  # Unset flags change nothing.
  return settings.replace(**given).with_options(**(options or {}))
