"""The small wrapper around the network: preconditioning in, parameterisation out.

The U-Net knows nothing of noise schedules; this module turns it into the two
functions the diffusion math needs, given a `diffusion.spec.DiffusionSpec`:
  - `apply_network(...)`: the raw output for (x_t, logsnr) in `spec.prediction` space (losses),
  - `x0_model(...)` -> `model_fn(x_t, logsnr, cond) -> x0_hat` (samplers and guidance).
"""

from typing import Any

import jax.numpy as jnp

from diffusion import parameterization, schedules


def apply_network(unet, unet_params, x_t, logsnr, cond: dict, spec, *, train=False, rngs=None):
  """Raw U-Net output for noisy x_t at log-SNR `logsnr` ([B] or scalar) given text `cond`."""
  logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), x_t.shape[:1])
  net_in, c_noise = parameterization.network_inputs(x_t, logsnr, spec)
  if getattr(unet, 'takes_timestep', False):  # Discrete-time networks (SD): diffusers' timestep.
    c_noise = schedules.timestep_from_logsnr(logsnr, spec)
  return unet.apply({'params': unet_params}, net_in, c_noise, cond['emb'], cond['mask'],
                    cond['pooled'], train=train, rngs=rngs)


def x0_model(unet, unet_params, spec):
  """Returns model_fn(x_t, logsnr, cond) -> x0_hat, the denoiser the samplers drive."""
  def model_fn(x_t, logsnr, cond: Any):
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), x_t.shape[:1])
    out = apply_network(unet, unet_params, x_t, logsnr, cond, spec)
    return parameterization.network_output_to_x0(out.astype(jnp.float32), x_t, logsnr, spec)
  return model_fn
