"""diffusers' timestep spacings as sampling grids: the noise levels its schedulers walk.

`diffusion.sampling_grid` 'leading' (plus `diffusion.steps_offset`), 'trailing' and 'linspace'
(Lin et al. 2023 Table 2) are the `timestep_spacing` of a diffusers scheduler_config.json. Each
diffusers scheduler spaces them its own way, so the grid depends on the sampler, as the scheduler
that sampler reproduces computes it (diffusers 0.42's `set_timesteps`):

  ddim, ddpm            DDIMScheduler, DDPMScheduler: N integer timesteps.
  euler, heun           EulerDiscreteScheduler, HeunDiscreteScheduler: 'linspace' is not rounded
                        (fractional timesteps, sigma interpolated linearly between table entries).
  dpmpp_2m(_sde)        DPMSolverMultistepScheduler: 'leading' and 'linspace' space N + 1 points
                        and drop the last.

Timesteps are diffusers' t = 0..T-1 (its alphas_cumprod[t], our table's k = t + 1). The grid
ends where the scheduler ends: DDIM at alphas_cumprod[0] when `diffusion.set_alpha_to_one` is
False (as SD's folders set it), all others at clean data (sigma 0). diffusers' DDIM and DDPM
step from t to t - T // N, which is the grid's next timestep for 'leading', and for 'trailing'
when N divides T; otherwise they leave the grid, and ours do not.

numpy only, static: the grid is computed once per (spec, steps, sampler).
"""
import math

import numpy as np

from diffusion import names

SPACINGS = names.TIMESTEP_SPACINGS
# The diffusers scheduler whose spacing each sampler follows.
_SCHEDULER = {'ddpm': 'ddim', 'ddim': 'ddim', 'euler': 'euler', 'heun': 'euler',
              'dpmpp_2m': 'dpmsolver', 'dpmpp_2m_sde': 'dpmsolver'}
assert tuple(_SCHEDULER) == names.SAMPLER_NAMES, 'every sampler follows a diffusers scheduler'


def timesteps(spacing: str, sampler: str, num_steps: int, T: int, steps_offset: int) -> np.ndarray:
  """[num_steps] diffusers timesteps (float64, noisiest first) of `spacing` for `sampler`."""
  N, style = int(num_steps), _SCHEDULER[sampler]
  if spacing not in SPACINGS:
    raise ValueError(f'{spacing!r} is not a diffusers timestep spacing ({", ".join(SPACINGS)}).')
  if not 1 <= N <= T:
    raise ValueError(f'sampler.num_steps={N} must be in [1, diffusion.num_train_timesteps={T}] '
                     f'on the {spacing!r} grid.')
  if spacing == 'leading':
    points = N + 1 if style == 'dpmsolver' else N
    t = (np.arange(points) * (T // points))[::-1][:N] + int(steps_offset)
  elif spacing == 'trailing':
    # diffusers writes np.arange(T, 0, -T / N), which has N + 1 entries for some N (61, 103, ...).
    t = np.round(T - np.arange(N) * (T / N)) - 1
  elif style == 'euler':
    t = np.linspace(0, T - 1, N, dtype=np.float32)[::-1]  # diffusers' float32, not rounded.
  else:
    points = N + 1 if style == 'dpmsolver' else N
    t = np.linspace(0, T - 1, points).round()[::-1][:N]
  t = np.asarray(t, np.float64)
  if t.min() < 0 or t.max() > T - 1:
    raise ValueError(f'diffusion.steps_offset={steps_offset} puts the {spacing!r} grid of {N} '
                     f'steps outside the timesteps 0..{T - 1}; use a smaller steps_offset.')
  return t


def grid(spacing: str, sampler: str, num_steps: int, table: np.ndarray, steps_offset: int,
         set_alpha_to_one: bool) -> np.ndarray:
  """[num_steps + 1] log-SNR levels (float64): the timesteps' levels, then the scheduler's end.

  `table` is `schedules.discrete_logsnrs` ([T+1], table[k] of our timestep k = t + 1). A
  fractional timestep (Euler's 'linspace') takes diffusers' sigma = sqrt((1 - abar) / abar),
  interpolated linearly in t; models/denoiser.py maps its level back to t linearly in log-SNR (as
  diffusers' own _sigma_to_t does), which gives the same t to within 0.01 of a timestep (0.05 at
  t < 2, where log sigma is steepest).
  """
  T = len(table) - 1
  t = timesteps(spacing, sampler, num_steps, T, steps_offset)
  whole = t == np.round(t)
  with np.errstate(over='ignore'):
    sigmas = np.exp(-0.5 * table[1:])  # diffusers' sigmas of t = 0..T-1 (inf at zero SNR).
    fractional = -2.0 * np.log(np.interp(t, np.arange(T), sigmas))
  levels = np.where(whole, table[np.round(t).astype(np.int64) + 1], fractional)
  ends_noisy = sampler == 'ddim' and not set_alpha_to_one  # DDPMScheduler ends clean.
  return np.append(levels, table[1] if ends_noisy else np.inf)


def initial_noise_scale(spacing: str, sampler: str, first_logsnr: float) -> float:
  """What a sampler's initial noise is multiplied by to start where diffusers starts.

  diffusers' Euler-family schedulers scale the initial latents by init_noise_sigma: on 'leading',
  sqrt(sigma_max^2 + 1), which is our VP start x_T = noise; on 'linspace' and 'trailing',
  sigma_max, which is x_T = sigma_T * noise (sigma_T^2 = 1 - alpha_bar). Every other start is 1.
  """
  if _SCHEDULER[sampler] == 'euler' and spacing in ('linspace', 'trailing'):
    return math.sqrt(1.0 / (1.0 + math.exp(float(first_logsnr))))  # sigma_T = sqrt(sigmoid(-lam))
  return 1.0
