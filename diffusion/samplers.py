"""Samplers: one signature, any schedule, loops in `jax.lax.scan`.

    sampler(denoise_fn, noise, logsnrs, rng, **opts) -> x0

`denoise_fn(x_t, logsnr[B]) -> x0_hat` (e.g. `guidance.guided_denoiser`), `noise` ~ N(0, I) of the
image shape, `logsnrs` the [N+1] grid of `schedules.sampling_logsnrs` (noisiest first, last entry
+inf), `rng` a PRNG key (stochastic samplers draw step i's noise from fold_in(rng, i)). Options are
keyword arrays and may be traced (changing them does not retrace); N is the grid's static length.

Samplers start at x = noise (the VP/DDPM convention): exact when logsnrs[0] = -inf (zero terminal
SNR); otherwise the true x_T ~ alpha_0 x0 + sigma_0 eps is approximated, an error of order alpha_0
(alpha_0 = 0.0125 at EDM's sigma_max = 80, 0.006 for the linear DDPM schedule). Every step to
logsnr = +inf returns the denoiser output x0_hat (a first-order step, no noise). A grid may end at
a finite level (diffusers' DDIM with set_alpha_to_one=False): the sampler returns that state.
Steps work in VP form, written so that logsnr = -inf (alpha = 0) needs no special case except in
Heun's second stage, see `heun`.
"""
from collections.abc import Callable
import inspect
import math

import jax
import jax.numpy as jnp

from diffusion import names, schedules


def _walk(step, carry, logsnrs):
  """Run step(carry, i, lam_t, lam_s) over consecutive grid pairs with lax.scan."""
  N = logsnrs.shape[0] - 1
  xs = (jnp.arange(N), logsnrs[:-1], logsnrs[1:])
  carry, _ = jax.lax.scan(lambda c, inputs: (step(c, *inputs), None), carry, xs)
  return carry


def _denoise(denoise_fn, x, logsnr):
  return denoise_fn(x, jnp.full(x.shape[:1], logsnr, x.dtype))


def _normal(rng, i, x):
  return jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)


def _grid(logsnrs, noise):
  logsnrs = jnp.asarray(logsnrs, noise.dtype)
  if logsnrs.ndim != 1 or logsnrs.shape[0] < 2:
    raise ValueError(f'logsnrs must be a 1-D grid of num_steps + 1 >= 2 levels, got shape '
                     f'{logsnrs.shape}; build it with schedules.sampling_logsnrs.')
  return logsnrs


def _ddim_update(x_t, x0, lam_t, lam_s, eta, z):
  """Song et al. 2021 eq. 12 with sigma_t(eta) of eq. 16, VP form (eps_hat from x0_hat)."""
  a_t, s_t = schedules.alpha_sigma(lam_t)
  a_s, s_s = schedules.alpha_sigma(lam_s)
  eps = (x_t - a_t * x0) / s_t
  # 1 - alpha_t^2 / alpha_s^2, accurate and equal to 1 at lam_t = -inf.
  r = -jnp.expm1(jax.nn.log_sigmoid(lam_t) - jax.nn.log_sigmoid(lam_s))
  c = eta * (s_s / s_t) * jnp.sqrt(r)
  direction = jnp.sqrt(jnp.maximum(jnp.square(s_s) - jnp.square(c), 0.0))
  return a_s * x0 + direction * eps + c * z


def ddpm(denoise_fn, noise, logsnrs, rng):
  """Ho et al. 2020 ancestral sampling from the posterior q(x_s | x_t, x0_hat) (as in VDM).

  With r = sigma_{t|s}^2 / sigma_t^2 = 1 - SNR_t/SNR_s: mean = e^{(lam_t - lam_s)/2} sigma_s /
  sigma_t x_t + alpha_s r x0_hat, std = sigma_s sqrt(r). NFE = N.
  """
  logsnrs = _grid(logsnrs, noise)

  def step(x, i, lam_t, lam_s):
    x0 = _denoise(denoise_fn, x, lam_t)
    a_s, s_s = schedules.alpha_sigma(lam_s)
    _, s_t = schedules.alpha_sigma(lam_t)
    r = -jnp.expm1(lam_t - lam_s)
    mean = jnp.exp(0.5 * (lam_t - lam_s)) * (s_s / s_t) * x + a_s * r * x0
    return mean + s_s * jnp.sqrt(r) * _normal(rng, i, x)

  return _walk(step, noise, logsnrs)


def ddim(denoise_fn, noise, logsnrs, rng, *, eta=0.0):
  """Song et al. 2021 DDIM; eta = 0 deterministic (= Euler in x/alpha), eta = 1 is DDPM. NFE = N."""
  logsnrs = _grid(logsnrs, noise)
  eta = jnp.asarray(eta, noise.dtype)

  def step(x, i, lam_t, lam_s):
    x0 = _denoise(denoise_fn, x, lam_t)
    return _ddim_update(x, x0, lam_t, lam_s, eta, _normal(rng, i, x))

  return _walk(step, noise, logsnrs)


def _karras(denoise_fn, noise, logsnrs, rng, s_churn, s_tmin, s_tmax, s_noise, second_order):
  """Karras et al. 2022 Alg. 2 in VP form: x_ve = x/alpha, sigma_ve = exp(-logsnr/2)."""
  logsnrs = _grid(logsnrs, noise)
  dtype = noise.dtype
  N = logsnrs.shape[0] - 1
  s_churn, s_tmin, s_tmax, s_noise = (jnp.asarray(v, dtype) for v in (s_churn, s_tmin, s_tmax,
                                                                       s_noise))
  gamma_max = jnp.minimum(s_churn / N, math.sqrt(2.0) - 1.0)

  def step(x, i, lam_t, lam_s):
    # Churn (Alg. 2 lines 4-6): raise sigma_ve by (1 + gamma); never at sigma_ve = inf.
    sig_t = schedules.sigma_ve_from_logsnr(lam_t)
    churn = (gamma_max > 0) & jnp.isfinite(lam_t) & (sig_t >= s_tmin) & (sig_t <= s_tmax)
    gamma = jnp.where(churn, gamma_max, 0.0)
    lam_h = lam_t - 2.0 * jnp.log1p(gamma)
    a_t, _ = schedules.alpha_sigma(lam_t)
    a_h, s_h = schedules.alpha_sigma(lam_h)
    added = jnp.where(churn, sig_t, 0.0) * jnp.sqrt(gamma * (2.0 + gamma)) * s_noise
    x_h = jnp.where(churn, a_h * (x / jnp.where(churn, a_t, 1.0) + added * _normal(rng, i, x)), x)
    # Euler step (lines 7-8), which in VP form is the DDIM update and is finite at alpha_h = 0.
    x0 = _denoise(denoise_fn, x_h, lam_h)
    a_s, s_s = schedules.alpha_sigma(lam_s)
    eps = (x_h - a_h * x0) / s_h
    x_euler = a_s * x0 + s_s * eps
    if not second_order:
      return x_euler

    def correct(_):
      # Heun (lines 9-11): x_ve_s = x0 + sigma_s (eps + eps')/2 + sigma_h (eps - eps')/2.
      x0_2 = _denoise(denoise_fn, x_euler, lam_s)
      eps_2 = (x_euler - a_s * x0_2) / s_s
      sig_h = s_h / jnp.where(a_h > 0, a_h, 1.0)
      karras = a_s * x0 + 0.5 * s_s * (eps + eps_2) + 0.5 * a_s * sig_h * (eps - eps_2)
      # At sigma_h = inf the sigma_ve step is infinite: take the trapezoid in u = alpha/sigma for
      # y = x/sigma instead (dy/du = x0_hat, of which DDIM is the Euler step).
      trapezoid_u = (s_s / s_h) * x_h + 0.5 * (a_s - s_s * a_h / s_h) * (x0 + x0_2)
      return jnp.where(a_h > 0, karras, trapezoid_u)

    return jax.lax.cond(jnp.isfinite(lam_s), correct, lambda _: x_euler, None)

  return _walk(step, noise, logsnrs)


def euler(denoise_fn, noise, logsnrs, rng, *, s_churn=0.0, s_tmin=0.0, s_tmax=float('inf'),
          s_noise=1.0):
  """Karras et al. 2022 Alg. 2 without the 2nd-order correction (with churn). NFE = N."""
  return _karras(denoise_fn, noise, logsnrs, rng, s_churn, s_tmin, s_tmax, s_noise, False)


def heun(denoise_fn, noise, logsnrs, rng, *, s_churn=0.0, s_tmin=0.0, s_tmax=float('inf'),
         s_noise=1.0):
  """Karras et al. 2022 Alg. 2 (Heun 2nd order, churn); the step to +inf is Euler. NFE = 2N-1.

  A step from logsnr = -inf (sigma_ve = inf) uses the trapezoid rule in u = alpha/sigma (still
  second order, same NFE) because the sigma_ve trapezoid is undefined there.
  """
  return _karras(denoise_fn, noise, logsnrs, rng, s_churn, s_tmin, s_tmax, s_noise, True)


def _dpmpp_2m(denoise_fn, noise, logsnrs, rng, eta, s_noise):
  """Lu et al. 2022 DPM-Solver++(2M) Alg. 2, with SDE-DPM-Solver++ noise for eta > 0.

  lambda = logsnr/2, h = lambda_s - lambda_t, x0 multistep term D = x0 + (x0 - x0_prev)/(2r),
  r = h_prev/h: x_s = e^{-eta h} (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-(1+eta) h}) D
  + sigma_s sqrt(1 - e^{-2 eta h}) z ("midpoint" form as in k-diffusion). Steps with infinite h
  (from -inf or to +inf) and the step after them are first order.
  """
  logsnrs = _grid(logsnrs, noise)
  eta = jnp.asarray(eta, noise.dtype)
  s_noise = jnp.asarray(s_noise, noise.dtype)

  def step(carry, i, lam_t, lam_s):
    x, x0_prev, h_prev = carry
    x0 = _denoise(denoise_fn, x, lam_t)
    _, s_t = schedules.alpha_sigma(lam_t)
    a_s, s_s = schedules.alpha_sigma(lam_s)
    h = 0.5 * (lam_s - lam_t)
    eta_h = jnp.where(eta > 0, eta * h, 0.0)
    inv_r = jnp.where(jnp.isfinite(h), h / h_prev, 0.0)  # h_prev = inf on the first step.
    d = x0 + 0.5 * inv_r * (x0 - x0_prev)
    x = (jnp.exp(-eta_h) * (s_s / s_t) * x + a_s * -jnp.expm1(-h - eta_h) * d
         + s_s * jnp.sqrt(-jnp.expm1(-2.0 * eta_h)) * s_noise * _normal(rng, i, x))
    return x, x0, h

  init = (noise, jnp.zeros_like(noise), jnp.array(jnp.inf, noise.dtype))
  return _walk(step, init, logsnrs)[0]


def dpmpp_2m(denoise_fn, noise, logsnrs, rng):
  """Lu et al. 2022 DPM-Solver++(2M): deterministic 2nd-order multistep on x0. NFE = N."""
  return _dpmpp_2m(denoise_fn, noise, logsnrs, rng, 0.0, 1.0)


def dpmpp_2m_sde(denoise_fn, noise, logsnrs, rng, *, eta=1.0, s_noise=1.0):
  """SDE-DPM-Solver++(2M) (Lu et al. 2022; as in k-diffusion); eta=0 is dpmpp_2m. NFE = N."""
  return _dpmpp_2m(denoise_fn, noise, logsnrs, rng, eta, s_noise)


SAMPLERS: dict[str, Callable] = {
    'ddpm': ddpm,
    'ddim': ddim,
    'euler': euler,
    'heun': heun,
    'dpmpp_2m': dpmpp_2m,
    'dpmpp_2m_sde': dpmpp_2m_sde,
}
assert tuple(SAMPLERS) == names.SAMPLER_NAMES, 'diffusion/names.py lists the samplers offered'
# Keyword options each sampler accepts (all may be traced arrays), with their defaults.
SAMPLER_DEFAULTS: dict[str, dict[str, float]] = {
    name: {k: p.default for k, p in inspect.signature(fn).parameters.items()
           if p.kind is inspect.Parameter.KEYWORD_ONLY}
    for name, fn in SAMPLERS.items()
}
SAMPLER_OPTIONS: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in SAMPLER_DEFAULTS.items()}


def get_sampler(name: str) -> Callable:
  """The sampler called `name` (config field `sampler.name`)."""
  if name not in SAMPLERS:
    raise ValueError(f'sampler.name={name!r} is not a sampler; choose one of '
                     f'{", ".join(SAMPLERS)}.')
  return SAMPLERS[name]


def check_options(name: str, options) -> None:
  """Raises ValueError for an unknown sampler or an option it does not take (touches no device:
  settings are checked before jax.distributed starts)."""
  get_sampler(name)
  unknown = sorted(set(options) - set(SAMPLER_OPTIONS[name]))
  if unknown:
    takes = ', '.join(SAMPLER_OPTIONS[name]) or 'none'
    raise ValueError(f'sampler {name!r} takes no option {", ".join(unknown)}; its options: '
                     f'{takes}.')


def sampler_options(name: str, **options) -> dict:
  """All of `name`'s options as float32 scalars: `options` over the defaults, checked.

  Every option is always present, so a jitted caller keeps one program per sampler whichever
  options are given or changed (traced values do not recompile).
  """
  check_options(name, options)
  return {k: jnp.float32(v) for k, v in {**SAMPLER_DEFAULTS[name], **options}.items()}


def nfe(name: str, num_steps: int) -> int:
  """Network (denoiser) evaluations of `name` over `num_steps` steps (grid ends at +inf)."""
  get_sampler(name)
  return 2 * num_steps - 1 if name == 'heun' else num_steps
