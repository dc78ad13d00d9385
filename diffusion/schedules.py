"""Noise schedules, expressed as log-SNR: discrete beta tables, EDM, grids for samplers.

Every noise level in jaxdiff is a log-SNR value `logsnr = log(alpha^2 / sigma^2)` for the
variance-preserving process x_t = alpha * x0 + sigma * eps (Kingma et al. 2021, VDM).
Time t in [0, 1] runs from clean (t = 0, logsnr = +inf) to noisiest (t = 1).

Functions that depend on settings take a `diffusion.spec.DiffusionSpec` (`spec`). Discrete
(DDPM-style) tables are static functions of it and are computed once in float64 numpy; everything
that sees traced values (`get_logsnr_fn`, `sample_train_logsnr`) is jnp and jittable.
"""
from collections.abc import Callable
import math

import jax
import jax.numpy as jnp
import numpy as np

from diffusion import names, spacings

SCHEDULES = ('linear', 'scaled_linear', 'cosine', 'sigmoid', 'edm')
SAMPLING_GRIDS = names.SAMPLING_GRIDS
NOISE_SAMPLINGS = ('uniform', 'lognormal')
_MAX_BETA = 0.999  # Nichol & Dhariwal 2021 sec 3.2: clip betas to avoid singularities at t = T.


# ------------------------------------------------------------------ log-SNR <-> alpha, sigma
def alpha_sigma(logsnr):
  """VDM (Kingma et al. 2021): alpha^2 = sigmoid(logsnr), sigma^2 = sigmoid(-logsnr)."""
  logsnr = jnp.asarray(logsnr)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


def logsnr_from_log_alpha_bar(log_alpha_bar):
  """logsnr = log(alpha_bar / (1 - alpha_bar)) (Ho et al. 2020, alpha_bar_t = alpha_t^2) from
  log(alpha_bar), accurate near alpha_bar = 1 (returns +inf at 0, -inf at -inf)."""
  return log_alpha_bar - jnp.log(-jnp.expm1(log_alpha_bar))


def logsnr_from_sigma_ve(sigma_ve):
  """VE/EDM noise level s to log-SNR: logsnr = -2 log s (Karras et al. 2022, x_ve = x_t / alpha)."""
  return -2.0 * jnp.log(sigma_ve)


def sigma_ve_from_logsnr(logsnr):
  """EDM sigma of a log-SNR: s = sigma / alpha = exp(-logsnr / 2)."""
  return jnp.exp(-0.5 * jnp.asarray(logsnr))


def resolution_logsnr_shift(res: int, base_res: int = 64) -> float:
  """Hoogeboom et al. 2023 (simple diffusion) sec 3: shift logsnr by 2 log(base_res / res)."""
  if res <= 0 or base_res <= 0:
    raise ValueError(f'resolution_logsnr_shift needs positive resolutions, got {res}, {base_res}.')
  return 2.0 * math.log(base_res / res)


# ------------------------------------------------------------------ discrete beta schedules
def betas_linear(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """Ho et al. 2020 sec 4: betas linear from beta_start to beta_end over T steps."""
  return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def betas_scaled_linear(T: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> np.ndarray:
  """Stable Diffusion (Rombach et al. 2022): sqrt(beta) linear, i.e. betas = linspace(sqrt b)^2."""
  return np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2


def _betas_from_alpha_bar_fn(f, T: int) -> np.ndarray:
  """beta_k = 1 - abar(k/T) / abar((k-1)/T), clipped at 0.999 (Nichol & Dhariwal 2021 eq. 17)."""
  t = np.arange(T + 1, dtype=np.float64) / T
  abar = f(t)
  return np.minimum(1.0 - abar[1:] / abar[:-1], _MAX_BETA)


def betas_cosine(T: int, s: float = 0.008) -> np.ndarray:
  """Nichol & Dhariwal 2021 eq. 17: alpha_bar(t) = cos^2(pi/2 (t + s) / (1 + s)) / f(0)."""
  return _betas_from_alpha_bar_fn(lambda t: np.cos((t + s) / (1 + s) * np.pi / 2) ** 2, T)


def betas_sigmoid(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> np.ndarray:
  """Chen 2023 ("On the importance of noise scheduling") Alg. 1 sigmoid alpha_bar(t)."""
  v_start, v_end = 1 / (1 + np.exp(-start / tau)), 1 / (1 + np.exp(-end / tau))

  def abar(t):
    v = 1 / (1 + np.exp(-(t * (end - start) + start) / tau))
    return np.clip((v_end - v) / (v_end - v_start), 1e-9, 1.0)

  return _betas_from_alpha_bar_fn(abar, T)


def rescale_zero_terminal_snr(alpha_bar: np.ndarray) -> np.ndarray:
  """Lin et al. 2023 Alg. 1: shift/scale sqrt(alpha_bar) so alpha_bar_T = 0, alpha_bar_1 fixed."""
  sqrt_ab = np.sqrt(np.asarray(alpha_bar, dtype=np.float64))
  first, last = sqrt_ab[0], sqrt_ab[-1]
  sqrt_ab = (sqrt_ab - last) * (first / (first - last))
  return sqrt_ab**2


def betas(spec) -> np.ndarray:
  """The T betas of the discrete schedule `spec.schedule` (float64, static)."""
  name, T = spec.schedule, spec.num_train_timesteps
  if name == 'edm':
    raise ValueError("diffusion.schedule='edm' is continuous and has no beta table; "
                     'use get_logsnr_fn / sampling_logsnrs instead.')
  if name == 'linear':
    return betas_linear(T, spec.beta_start, spec.beta_end)
  if name == 'scaled_linear':
    return betas_scaled_linear(T, spec.beta_start, spec.beta_end)
  if name == 'cosine':
    return betas_cosine(T)
  return betas_sigmoid(T)


def alpha_bar_table(spec) -> np.ndarray:
  """alpha_bar_k = prod_{i<=k} (1 - beta_i) for k = 1..T (Ho et al. 2020 eq. 4), [T] float64.

  With `diffusion.zero_terminal_snr` the table is rescaled so alpha_bar_T = 0 (Lin et al. 2023).
  """
  alpha_bar = np.cumprod(1.0 - betas(spec))
  if spec.zero_terminal_snr:
    alpha_bar = rescale_zero_terminal_snr(alpha_bar)
  return alpha_bar


def discrete_logsnrs(spec) -> np.ndarray:
  """[T+1] float64 log-SNR of timesteps k = 0..T; k = 0 is clean (+inf). No shift applied."""
  alpha_bar = np.concatenate([[1.0], alpha_bar_table(spec)])
  with np.errstate(divide='ignore'):
    return np.log(alpha_bar) - np.log1p(-alpha_bar)


def timestep_from_logsnr(logsnr, spec):
  """The discrete-time network input of a noise level: diffusers' timestep t in [0, T-1].

  Timestep k of `discrete_logsnrs` (k = 1..T) is diffusers' t = k - 1 (its alphas_cumprod[t]).
  Between table entries t is interpolated linearly in log-SNR (diffusers' Euler schedulers
  interpolate in log sigma, the same up to the factor -2), so a training level taken from the
  table maps to its integer timestep exactly. `diffusion.logsnr_shift` is removed first; levels
  beyond either end clip to 0 or T-1.
  """
  if spec.schedule == 'edm':
    raise ValueError("diffusion.schedule='edm' has no timesteps; a network that takes discrete "
                     'timesteps (model.family=\'sd\') needs a discrete schedule.')
  table = discrete_logsnrs(spec)[1:]  # [T], decreasing; may end in -inf (zero terminal SNR).
  table = np.where(np.isfinite(table), table, table[np.isfinite(table)].min() - 20.0)
  ascending = jnp.asarray(table[::-1], jnp.float32)  # For searchsorted.
  level = jnp.asarray(logsnr, jnp.float32) - float(spec.logsnr_shift)
  level = jnp.clip(level, ascending[0], ascending[-1])
  i = jnp.clip(jnp.searchsorted(ascending, level, side='right') - 1, 0, len(table) - 2)
  lo, hi = ascending[i], ascending[i + 1]
  frac = (level - lo) / (hi - lo)
  k_ascending = i.astype(jnp.float32) + frac  # Position in the ascending table.
  return (len(table) - 1) - k_ascending


# ------------------------------------------------------------------ EDM / Karras
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0):
  """Karras et al. 2022 eq. 5: n sigmas from sigma_max down to sigma_min, equal in sigma^(1/rho)."""
  if n < 1:
    raise ValueError(f'karras_sigmas needs n >= 1, got {n}.')
  if not 0 < sigma_min <= sigma_max < np.inf:
    raise ValueError(f'karras_sigmas needs 0 < sigma_min <= sigma_max < inf, got '
                     f'{sigma_min}, {sigma_max} (diffusion.sigma_min / diffusion.sigma_max).')
  frac = np.arange(n, dtype=np.float64) / max(n - 1, 1)
  inv_rho = 1.0 / rho
  return (sigma_max**inv_rho + frac * (sigma_min**inv_rho - sigma_max**inv_rho)) ** rho


# ------------------------------------------------------------------ continuous view
def get_logsnr_fn(spec) -> Callable[[jax.Array], jax.Array]:
  """t in [0, 1] -> logsnr (plus `diffusion.logsnr_shift`); continuous, decreasing in t.

  Discrete schedules interpolate log(alpha_bar) linearly in t*T between table entries
  (alpha_bar_0 = 1 at t = 0, so logsnr(0) = +inf; t = k/T reproduces timestep k). A terminal
  alpha_bar_T = 0 (zero terminal SNR) is reached by interpolating alpha_bar itself on the last
  interval. 'edm' maps t to sigma by eq. 5 of Karras et al. 2022: t = 0 -> sigma_min, t = 1 ->
  sigma_max (so its logsnr(0) is finite).
  """
  shift = float(spec.logsnr_shift)
  if spec.schedule == 'edm':
    rho = float(spec.rho)
    lo, hi = float(spec.sigma_min) ** (1 / rho), float(spec.sigma_max) ** (1 / rho)

    def edm_logsnr(t):
      sigma = (lo + jnp.clip(t, 0.0, 1.0) * (hi - lo)) ** rho
      return logsnr_from_sigma_ve(sigma) + shift

    return edm_logsnr

  T = int(spec.num_train_timesteps)
  with np.errstate(divide='ignore'):
    log_ab = np.log(np.concatenate([[1.0], alpha_bar_table(spec)]))

  def discrete_logsnr(t):
    table = jnp.asarray(log_ab, dtype=jnp.result_type(float))
    pos = jnp.clip(jnp.asarray(t, table.dtype), 0.0, 1.0) * T
    k = jnp.clip(jnp.floor(pos), 0, T - 1).astype(jnp.int32)
    f = pos - k
    lo, hi = table[k], table[k + 1]
    hi_finite = jnp.isfinite(hi)
    geometric = lo + f * (jnp.where(hi_finite, hi, lo) - lo)
    to_zero = lo + jnp.log1p(-f)  # log((1 - f) * alpha_bar_lo): linear to alpha_bar = 0.
    return logsnr_from_log_alpha_bar(jnp.where(hi_finite, geometric, to_zero)) + shift

  return discrete_logsnr


# ------------------------------------------------------------------ grids and training levels
def effective_grid(spec, sampler: str | None = None) -> str:
  """`spec.sampling_grid` with 'auto' resolved: 'karras' for 'edm' or 'heun', else 'uniform_t'."""
  if spec.sampling_grid != 'auto':
    return spec.sampling_grid
  return 'karras' if spec.schedule == 'edm' or sampler == 'heun' else 'uniform_t'


def sampling_logsnrs(spec, num_steps: int, sampler: str | None = None) -> jax.Array:
  """The [num_steps + 1] log-SNR grid a sampler walks: noisiest first, last entry +inf (clean;
  diffusers' DDIM grids may end just before it).

  `spec.sampling_grid`:
    'uniform_t' -- discrete schedules: "trailing" timesteps k_i = round(T (1 - i/N)), i = 0..N
      (Lin et al. 2023 sec 3.3; starts at k = T, so a zero-terminal-SNR grid starts at -inf);
      'edm': t = 1 - i/(N-1) through `get_logsnr_fn`, which is the Karras grid.
    'karras' -- Karras et al. 2022 eq. 5 over the schedule's finite sigma_ve range clipped to
      [diffusion.sigma_min, diffusion.sigma_max] (for a zero-terminal-SNR table: -inf, then N-1
      levels). The clip matters for 'cosine', whose last level is sigma_ve ~ 2e4: starting from
      sigma_max = 80 (EDM's choice) instead keeps the first step's sigma ratio moderate.
    'uniform_logsnr' -- equal steps in log-SNR over the same clipped range (Lu et al. 2022,
      DPM-Solver's 'logSNR' spacing).
    'auto' (default) -- 'karras' for 'edm' or when `sampler` is 'heun' (its trapezoid in
      sigma_ve is inaccurate across the uniform grid's first step from sigma_ve ~ 2e4 on
      'cosine'), 'uniform_t' otherwise.
    'leading', 'trailing', 'linspace' -- diffusers' timestep spacings, as the diffusers scheduler
      `sampler` reproduces spaces them (diffusion/spacings.py; `diffusion.steps_offset`); DDIM's
      grid ends at alpha_bar of diffusers' timestep 0 unless `diffusion.set_alpha_to_one`.
  `diffusion.logsnr_shift` is added to every entry.
  """
  grid = effective_grid(spec, sampler)
  N = int(num_steps)
  if N < 1:
    raise ValueError(f'sampler.num_steps must be >= 1, got {num_steps}.')
  shift = float(spec.logsnr_shift)
  if grid in spacings.SPACINGS:
    if spec.schedule == 'edm' or sampler is None:
      raise ValueError(f"diffusion.sampling_grid={grid!r} spaces the timesteps of a discrete "
                       "schedule for a sampler; diffusion.schedule='edm' has none (use 'karras').")
    levels = spacings.grid(grid, sampler, N, discrete_logsnrs(spec), spec.steps_offset,
                           spec.set_alpha_to_one)
    return jnp.asarray(levels + shift)
  sigma_min, sigma_max, rho = float(spec.sigma_min), float(spec.sigma_max), float(spec.rho)
  if spec.schedule == 'edm':
    lead = []
  else:
    table = discrete_logsnrs(spec)  # [T+1], table[0] = +inf.
    T = len(table) - 1
    if grid == 'uniform_t':
      if N > T:
        raise ValueError(f'sampler.num_steps={N} exceeds diffusion.num_train_timesteps={T}; '
                         "the 'uniform_t' grid would repeat timesteps. Use fewer steps or "
                         "diffusion.sampling_grid='karras'.")
      k = np.round(np.linspace(T, 0, N + 1)).astype(np.int64)
      return jnp.asarray(table[k] + shift)
    sigmas = np.exp(-0.5 * table[1:][np.isfinite(table[1:])])  # the trained finite sigma_ve
    lo, hi = max(sigmas.min(), sigma_min), min(sigmas.max(), sigma_max)
    if lo > hi:
      raise ValueError(f'diffusion.sigma_min={sigma_min} / sigma_max={sigma_max} leave no part of '
                       f'the schedule\'s sigma range [{sigmas.min():.4g}, {sigmas.max():.4g}] for '
                       f'the {grid!r} grid; widen them.')
    sigma_min, sigma_max = lo, hi
    lead = [] if np.isfinite(table[T]) else [-np.inf]
  n = N - len(lead)
  if n == 0:
    levels = []
  elif grid == 'uniform_logsnr':
    levels = list(np.linspace(-2 * np.log(sigma_max), -2 * np.log(sigma_min), n))
  else:  # 'karras', and 'uniform_t' for 'edm' (the same curve, t = 1 - i/(N-1)).
    levels = list(-2 * np.log(karras_sigmas(n, sigma_min, sigma_max, rho)))
  return jnp.asarray(np.array(lead + levels + [np.inf]) + shift)


def initial_noise_scale(spec, logsnrs, sampler: str) -> float:
  """The factor on a sampler's N(0, I) start: 1 (x_T = noise), except on the diffusers grids
  where its scheduler starts elsewhere (`spacings.initial_noise_scale`: Euler on 'linspace' and
  'trailing' starts at sigma_T * noise)."""
  grid = effective_grid(spec, sampler)
  if grid not in spacings.SPACINGS:
    return 1.0
  return spacings.initial_noise_scale(grid, sampler, float(logsnrs[0]) - float(spec.logsnr_shift))


def sample_train_logsnr(rng: jax.Array, shape, spec) -> jax.Array:
  """Training noise levels: uniform timesteps k in {1..T} (Ho et al. 2020 Alg. 1) or EDM's

  log-normal ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022 sec 5) when
  `diffusion.schedule == 'edm'` or `diffusion.noise_sampling == 'lognormal'`.
  """
  shift = float(spec.logsnr_shift)
  dtype = jnp.result_type(float)
  if spec.schedule == 'edm' or spec.noise_sampling == 'lognormal':
    p_mean, p_std = float(spec.p_mean), float(spec.p_std)
    ln_sigma = p_mean + p_std * jax.random.normal(rng, shape, dtype)
    return -2.0 * ln_sigma + shift
  table = jnp.asarray(discrete_logsnrs(spec), dtype)
  k = jax.random.randint(rng, shape, 1, table.shape[0])
  return table[k] + shift


def train_logsnr_quantiles(spec, bins: int) -> np.ndarray:
  """The log-SNRs at the midpoints of `bins` equal-probability bins of `sample_train_logsnr`'s
  distribution, lowest noise first: a fixed grid of noise levels that covers training's (for a
  validation loss comparable across runs)."""
  u = (np.arange(bins) + 0.5) / bins  # Quantile midpoints.
  shift = float(spec.logsnr_shift)
  if spec.schedule == 'edm' or spec.noise_sampling == 'lognormal':
    from scipy.special import ndtri  # pylint: disable=g-import-not-at-top
    ln_sigma = float(spec.p_mean) + float(spec.p_std) * ndtri(u)
    return -2.0 * ln_sigma + shift
  table = np.asarray(discrete_logsnrs(spec), np.float64)
  k = 1 + np.floor(u * (table.shape[0] - 1)).astype(int)  # Uniform over k in {1..T-1}, as training.
  return table[k] + shift
