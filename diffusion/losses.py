"""Denoising training loss: per-example weighted MSE in a chosen target space (EDM loss.py style).

Every weighting is defined by its equivalent weight on the x0-space error, using
||eps_hat - eps||^2 = snr ||x0_hat - x0||^2 and ||v_hat - v||^2 = (1 + snr) ||x0_hat - x0||^2
(snr = alpha^2 / sigma^2 = exp(logsnr)), so the same option means the same thing in every space.
"""
import jax
import jax.numpy as jnp

from diffusion import parameterization as param
from diffusion import schedules

LOSS_TARGETS = ('auto',) + param.KINDS
LOSS_WEIGHTINGS = ('auto', 'none', 'min_snr', 'edm')


def loss_weight(logsnr, kind, weighting, *, min_snr_gamma, sigma_data):
  """Per-example weight of the MSE in `kind` space.

  'none': 1. 'min_snr': x0-space weight min(snr, gamma) (Hang et al. 2023, Min-SNR), i.e.
  min(snr, gamma)/snr for eps and min(snr, gamma)/(snr + 1) for v. 'edm': x0-space weight
  lambda(s) = (s^2 + sd^2)/(s sd)^2 = snr + 1/sd^2 (Karras et al. 2022 Table 1).
  """
  snr = jnp.exp(logsnr)
  if weighting == 'none':
    return jnp.ones_like(snr)
  if weighting == 'min_snr':
    x0_weight, gamma = jnp.minimum(snr, min_snr_gamma), min_snr_gamma
    return {'x0': x0_weight, 'eps': jnp.minimum(1.0, gamma / snr), 'v': x0_weight / (snr + 1)}[kind]
  if weighting == 'edm':
    inv_d2 = 1.0 / sigma_data**2
    return {'x0': snr + inv_d2, 'eps': 1.0 + inv_d2 / snr, 'v': (snr + inv_d2) / (snr + 1)}[kind]
  raise ValueError(f'diffusion.loss_weighting={weighting!r} is not supported; choose one of '
                   f'{", ".join(LOSS_WEIGHTINGS)}.')


def loss_options(spec):
  """(prediction, loss_target, loss_weighting) of a DiffusionSpec, 'auto' resolved: EDM -> ('x0', 'edm')."""
  prediction, target, weighting = spec.prediction, spec.loss_target, spec.loss_weighting
  if target == 'auto':
    target = 'x0' if prediction == 'edm' else prediction
  if weighting == 'auto':
    weighting = 'edm' if prediction == 'edm' else 'none'
  return prediction, target, weighting


def diffusion_loss(pred_fn, x0, rng, spec):
  """Ho et al. 2020 Alg. 1 / Karras et al. 2022 eq. 2: weighted denoising MSE, one per example.

  pred_fn(x_t, logsnr[B]) -> raw network output in `spec.prediction` space (called once);
  `spec` is a `diffusion.spec.DiffusionSpec`.
  Returns (loss[B], aux) with aux = {'logsnr', 'weight', 'mse'} per example.
  """
  rng_logsnr, rng_eps = jax.random.split(rng)
  logsnr = schedules.sample_train_logsnr(rng_logsnr, x0.shape[:1], spec)
  eps = jax.random.normal(rng_eps, x0.shape, x0.dtype)
  if spec.noise_offset:  # Offset noise: one extra normal per example and channel (Guttenberg 2023).
    shape = x0.shape[:1] + (1,) * (x0.ndim - 2) + x0.shape[-1:]
    eps = eps + spec.noise_offset * jax.random.normal(jax.random.fold_in(rng_eps, 1), shape,
                                                      x0.dtype)
  return loss_at(pred_fn, x0, logsnr, eps, spec)


def loss_at(pred_fn, x0, logsnr, eps, spec):
  """`diffusion_loss` at given noise levels logsnr [B] and noise eps (x0's shape): (loss[B], aux)."""
  prediction, kind, weighting = loss_options(spec)
  alpha, sigma = param.per_example(logsnr, x0)
  x_t = alpha * x0 + sigma * eps
  out = jnp.asarray(pred_fn(x_t, logsnr), x0.dtype)
  if prediction == 'edm':
    out, prediction = param.network_output_to_x0(out, x_t, logsnr, spec), 'x0'
  error = (param.convert(out, x_t, alpha, sigma, prediction, kind)
           - param.target(x0, eps, alpha, sigma, kind))
  mse = jnp.mean(jnp.square(error), axis=tuple(range(1, x0.ndim)))
  weight = loss_weight(
      logsnr, kind, weighting,
      min_snr_gamma=float(spec.min_snr_gamma), sigma_data=float(spec.sigma_data))
  return weight * mse, {'logsnr': logsnr, 'weight': weight, 'mse': mse}
