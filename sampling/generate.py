"""Text-to-image generation: tokens -> guided sampler -> images, as one jitted function.

The guidance scale, sampler options and the seed are traced arguments, so changing
them reuses the compiled program; the step count (the grid's length), the batch
shape and the sampler name are what compile.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from diffusion import guidance, samplers, schedules
from models import denoiser
from text.encoders import NULL_CAPTION


def _cond(encode, text_params, ids):
  emb, mask, pooled = encode(text_params, ids)
  return {'emb': emb, 'mask': mask, 'pooled': pooled}


def config_eta(sampler_cfg, sampler: str) -> float | None:
  """The config's `sampler.eta` where it applies (it is DDIM's eta), else None (the default)."""
  return float(sampler_cfg.eta) if sampler == 'ddim' else None


class Generator:
  """Holds the compiled sampling program for one (model, text encoder, diffusion config)."""

  def __init__(self, unet, text_encoder, config, mesh=None):
    self.unet = unet
    self.text = text_encoder
    self.config = config
    self.image_shape = (config.data.image_size, config.data.image_size, 3)
    self.null_ids = np.asarray(text_encoder.tokenize([NULL_CAPTION]))
    out_sharding = NamedSharding(mesh, P()) if mesh is not None else None
    self._jitted = jax.jit(self._sample, static_argnames=('sampler_name', 'thresholding'),
                           out_shardings=out_sharding)

  def _sample(self, unet_params, text_params, ids, logsnrs, seeds, w, phi, interval, percentile,
              opts, *, sampler_name, thresholding):
    diff_cfg = self.config.diffusion
    cond = _cond(self.text.encode, text_params, ids)
    null = jnp.broadcast_to(self.null_ids, ids.shape)
    uncond = _cond(self.text.encode, text_params, null)
    model_fn = denoiser.x0_model(self.unet, unet_params, diff_cfg)
    denoise_fn = guidance.guided_denoiser(
        model_fn, cond, uncond, w, rescale_phi=phi, interval=interval,
        threshold_percentile=percentile if thresholding else None)
    # One key per example (its seed), so a deterministic sampler's image depends on its seed alone.
    keys = jax.vmap(jax.random.PRNGKey)(seeds)
    noise = jax.vmap(lambda k: jax.random.normal(k, self.image_shape, jnp.float32))(keys)
    rng_sampler = jax.random.fold_in(keys[0], 1)
    x0 = samplers.get_sampler(sampler_name)(denoise_fn, noise, logsnrs, rng_sampler, **opts)
    return jnp.clip(x0, -1.0, 1.0)

  def __call__(self, unet_params, text_params, prompts: Sequence[str], *, seed,
               sampler: str, num_steps: int, guidance_scale: float, eta: float | None = None,
               guidance_rescale: float = 0.0, guidance_interval=None, threshold_percentile=None,
               extra_opts: dict | None = None) -> np.ndarray:
    """Samples one image per prompt; returns float32 [len(prompts), S, S, 3] in [-1, 1].

    `seed` is an int (example i gets seed + i) or a sequence of per-example seeds.
    `eta`: for the samplers that take it (ddim, default 0; dpmpp_2m_sde, default 1); None
    leaves the sampler's default. Other options (s_churn, s_noise, ...) come in `extra_opts`.
    An option the sampler does not take raises ValueError.
    `guidance_interval=(lo, hi)`: apply w only for log-SNR in [lo, hi] (None: everywhere).
    `threshold_percentile`: Imagen dynamic thresholding at that percentile in [0, 100] (0 is
    static clipping of x0 to [-1, 1]; None: off).
    All of these are traced: new values reuse the compiled program.
    """
    samplers.get_sampler(sampler)  # Validates the name with a clear error before compiling.
    if threshold_percentile is not None and not 0 <= threshold_percentile <= 100:
      raise ValueError(f'threshold percentile {threshold_percentile} (--threshold): expected a '
                       'percentile in [0, 100] (e.g. 99.5; 0 clips x0 to [-1, 1]), or none to '
                       'turn thresholding off.')
    ids = np.asarray(self.text.tokenize(list(prompts)))
    logsnrs = schedules.sampling_logsnrs(self.config.diffusion, int(num_steps), sampler)
    opts = samplers.sampler_options(sampler, **{**({} if eta is None else {'eta': eta}),
                                                **(extra_opts or {})})
    seeds = np.asarray(seed, np.int32) if np.ndim(seed) else np.int32(seed) + np.arange(
        len(ids), dtype=np.int32)
    lo, hi = guidance_interval if guidance_interval is not None else (-np.inf, np.inf)
    out = self._jitted(unet_params, text_params, ids, logsnrs, seeds,
                       jnp.float32(guidance_scale), jnp.float32(guidance_rescale),
                       (jnp.float32(lo), jnp.float32(hi)),
                       jnp.float32(99.5 if threshold_percentile is None else threshold_percentile),
                       opts, sampler_name=sampler,
                       thresholding=threshold_percentile is not None)
    return np.asarray(jax.device_get(out))

  def compiled_count(self) -> int:
    """How many programs have been compiled (tests check that w and seed do not add any)."""
    return self._jitted._cache_size()  # pylint: disable=protected-access

