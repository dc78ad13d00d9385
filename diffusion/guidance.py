"""Classifier-free guidance on x0 predictions, with rescaling, thresholding and intervals.

All strengths (w, phi, interval bounds, percentile) may be traced arrays, so changing them never
retraces a jitted sampler; w may also be a per-example [B] array.
"""
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


def _per_example(value, x):
  """Scalar or [B] value -> shape broadcastable against x ([B, 1, ..., 1])."""
  value = jnp.asarray(value, x.dtype)
  return value.reshape(value.shape + (1,) * (x.ndim - value.ndim)) if value.ndim else value


def _std(x):
  axes = tuple(range(1, x.ndim))
  return jnp.std(x, axis=axes, keepdims=True)


def cfg_combine(cond, uncond, w):
  """Ho & Salimans 2022 (our w = their 1 + w): uncond + w (cond - uncond); w=1 cond, w=0 uncond."""
  w = _per_example(w, cond)
  return w * cond + (1.0 - w) * uncond  # this form is exact at w = 0 and w = 1


def rescale(guided, cond, phi):
  """Lin et al. 2023 sec 3.4: phi * guided * std(cond)/std(guided) + (1 - phi) * guided (on x0)."""
  phi = _per_example(phi, guided)
  ratio = _std(cond) / jnp.maximum(_std(guided), jnp.finfo(guided.dtype).tiny)
  return phi * (guided * ratio) + (1.0 - phi) * guided


def dynamic_threshold(x0, percentile):
  """Saharia et al. 2022 (Imagen) sec 2.3: s = max(1, pct(|x0|)); x0 <- clip(x0, -s, s) / s.

  `percentile` is in percent (Imagen uses 99.5), per example over all non-batch axes. At 0,
  s = max(1, min |x0|): static clipping to [-1, 1] unless every |x0| exceeds 1.
  """
  flat = jnp.abs(x0.reshape(x0.shape[0], -1))
  s = jnp.maximum(jnp.percentile(flat, percentile, axis=1), 1.0)
  s = _per_example(s, x0)
  return jnp.clip(x0, -s, s) / s


def guidance_interval(w, logsnr, lo, hi):
  """Kynkaanniemi et al. 2024: guidance weight w only where lo <= logsnr <= hi, else 1.

  The paper's sigma interval (sigma_lo, sigma_hi] is logsnr in [-2 ln sigma_hi, -2 ln sigma_lo).
  """
  inside = (logsnr >= lo) & (logsnr <= hi)
  return jnp.where(inside, w, jnp.ones_like(w))


class Guidance(NamedTuple):
  """Guidance strengths, all traceable: CFG scale w (scalar or [B]), rescale phi, the log-SNR
  interval (lo, hi) where w applies (+-inf: everywhere), the thresholding percentile."""
  scale: jax.Array
  rescale: jax.Array
  interval: tuple[jax.Array, jax.Array]
  threshold_percentile: jax.Array


def guided_denoiser(model_fn: Callable, cond, uncond, strengths: Guidance, *,
                    thresholding: bool = False) -> Callable:
  """x0-space classifier-free guidance as a sampler denoiser `(x_t, logsnr) -> x0_hat`.

  model_fn(x_t[2B], logsnr[2B], cond_batch) -> x0_hat[2B] is called ONCE per evaluation on the
  batch [x_t; x_t] with conditioning concatenate(cond, uncond) along the leading axis (pytrees
  with leading dim B). `thresholding` (static) turns on dynamic thresholding at
  `strengths.threshold_percentile`.
  """
  w, lo_hi = strengths.scale, strengths.interval
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

  def denoise(x_t, logsnr):
    B = x_t.shape[0]
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, x_t.dtype), (B,))
    x0 = model_fn(jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([logsnr, logsnr]), both)
    x0_cond, x0_uncond = x0[:B], x0[B:]
    w_eff = jnp.broadcast_to(jnp.asarray(w, x_t.dtype), (B,))
    w_eff = guidance_interval(w_eff, logsnr, lo_hi[0], lo_hi[1])
    x0 = rescale(cfg_combine(x0_cond, x0_uncond, w_eff), x0_cond, strengths.rescale)
    if thresholding:
      x0 = dynamic_threshold(x0, strengths.threshold_percentile)
    return x0

  return denoise
