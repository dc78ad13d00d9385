"""What the network predicts (eps, x0, v or EDM's F) and how to convert between them.

Notation: x_t = alpha x0 + sigma eps with alpha^2 + sigma^2 = 1, v = alpha eps - sigma x0
(Salimans & Ho 2022 sec 4), EDM preconditioning from Karras et al. 2022 Table 1 with
s = sigma / alpha and x_ve = x_t / alpha. `alpha`, `sigma` must broadcast against `x_t`.
"""

import jax.numpy as jnp

from diffusion import schedules

KINDS = ('eps', 'x0', 'v')
PREDICTIONS = ('eps', 'x0', 'v', 'edm')
# c_noise = -logsnr / 8 is clipped to this range so +-inf never reaches the network. |logsnr| <= 24
# covers every schedule here (EDM sigma in [0.002, 80] is logsnr in [-8.8, 12.4]).
C_NOISE_MAX = 3.0


def _check_kind(kind, field='kind'):
  if kind not in KINDS:
    raise ValueError(f'{field}={kind!r} is not supported; choose one of {", ".join(KINDS)}.')


def x0_from(pred, x_t, alpha, sigma, kind):
  """x0 from a prediction: x0 = (x_t - sigma eps)/alpha or alpha x_t - sigma v (safe at alpha=0)."""
  _check_kind(kind)
  if kind == 'x0':
    return pred
  if kind == 'eps':
    return (x_t - sigma * pred) / alpha
  return alpha * x_t - sigma * pred


def eps_from(pred, x_t, alpha, sigma, kind):
  """eps from a prediction: eps = (x_t - alpha x0)/sigma or sigma x_t + alpha v."""
  _check_kind(kind)
  if kind == 'eps':
    return pred
  if kind == 'x0':
    return (x_t - alpha * pred) / sigma
  return sigma * x_t + alpha * pred


def v_from(pred, x_t, alpha, sigma, kind):
  """v = alpha eps - sigma x0 from a prediction: (eps - sigma x_t)/alpha, (alpha x_t - x0)/sigma."""
  _check_kind(kind)
  if kind == 'v':
    return pred
  if kind == 'eps':
    return (pred - sigma * x_t) / alpha
  return (alpha * x_t - pred) / sigma


def convert(pred, x_t, alpha, sigma, kind, to):
  """Convert a prediction of `kind` into the space `to` (one of eps, x0, v)."""
  _check_kind(to, 'to')
  return {'eps': eps_from, 'x0': x0_from, 'v': v_from}[to](pred, x_t, alpha, sigma, kind)


def target(x0, eps, alpha, sigma, kind):
  """Regression target of `kind` for a noised pair (x0, eps) (Salimans & Ho 2022 eq. for v)."""
  _check_kind(kind)
  if kind == 'x0':
    return x0
  if kind == 'eps':
    return eps
  return alpha * eps - sigma * x0


def per_example(logsnr, x):
  """[B] (or scalar) logsnr -> alpha, sigma shaped [B, 1, ..., 1] to broadcast against x."""
  logsnr = jnp.broadcast_to(jnp.asarray(logsnr, x.dtype), x.shape[:1])
  return schedules.alpha_sigma(logsnr.reshape(x.shape[:1] + (1,) * (x.ndim - 1)))


def _edm_denominator(alpha, sigma, sigma_data):
  """sqrt(sigma^2 + sigma_data^2 alpha^2) = alpha sqrt(s^2 + sigma_data^2), never 0."""
  return jnp.sqrt(jnp.square(sigma) + sigma_data**2 * jnp.square(alpha))


def c_noise_from_logsnr(logsnr):
  """Noise conditioning c_noise = ln(s)/4 = -logsnr/8 (EDM Table 1), clipped to be finite."""
  return jnp.clip(-jnp.asarray(logsnr) / 8.0, -C_NOISE_MAX, C_NOISE_MAX)


def network_inputs(x_t, logsnr, spec):
  """What the network sees: (x_t or EDM's c_in x_t / alpha, c_noise[B]); finite at logsnr=+-inf.

  `spec`: a `diffusion.spec.DiffusionSpec` (reads `prediction` and `sigma_data`).
  """
  c_noise = c_noise_from_logsnr(jnp.broadcast_to(jnp.asarray(logsnr, x_t.dtype), x_t.shape[:1]))
  if spec.prediction != 'edm':
    return x_t, c_noise  # VP inputs already have (about) unit variance.
  alpha, sigma = per_example(logsnr, x_t)
  return x_t / _edm_denominator(alpha, sigma, float(spec.sigma_data)), c_noise


def network_output_to_x0(out, x_t, logsnr, spec):
  """Denoised x0_hat from the raw network output in `spec.prediction` space.

  'edm': D = c_skip x_ve + c_out F (Karras et al. 2022 eq. 7), written in VP terms so that it is
  finite for every logsnr: D = sd^2 alpha x_t / (sigma^2 + sd^2 alpha^2) + sigma sd F / sqrt(...).
  """
  alpha, sigma = per_example(logsnr, x_t)
  if spec.prediction != 'edm':
    return x0_from(out, x_t, alpha, sigma, spec.prediction)
  sd = float(spec.sigma_data)
  denom = _edm_denominator(alpha, sigma, sd)
  return sd**2 * alpha * x_t / jnp.square(denom) + sigma * sd * out / denom
