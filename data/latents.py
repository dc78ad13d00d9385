"""Posterior moments of a frozen autoencoder, stored in records by `tools.prepare --autoencoder`.

Latent diffusion encodes every training image with the same frozen VAE encoder, every epoch. With
the moments (mean and log-variance of q(z|x)) precomputed once per record, a run draws a fresh
latent from them each step (as on the fly) and never runs the encoder. They are computed on the
pixels the loader would give with a centre crop and no flip at `image_size`, so a run that reads
them must use that geometry; the record holds the VAE's fingerprint and the size, which training
checks (training/loop.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from data import images

BATCH = 16  # Images per jitted encoder call (one compiled shape).


class LatentEncoder:
  """Encoded record images -> the `latent` field of each record."""

  def __init__(self, path: str, image_size: int, dtype: str = 'float32'):
    import jax  # pylint: disable=g-import-not-at-top  (only when latents are asked for)
    from models import vae_loading  # pylint: disable=g-import-not-at-top
    self.vae = vae_loading.load_vae(path, dtype)
    factor = self.vae.config.downsample_factor
    if image_size < 1 or image_size % factor:
      raise ValueError(f'--image_size={image_size} must be a positive multiple of the '
                       f"autoencoder's downsampling ({factor}).")
    self.image_size = image_size
    self.encode = jax.jit(self.vae.encode)
    self.device_get = jax.device_get

  def pixels(self, image: bytes | np.ndarray) -> np.ndarray:
    """What the loader gives for this image with a centre crop, no flip: f32 [S, S, 3] in [-1, 1]."""
    img = images.from_array(image) if isinstance(image, np.ndarray) else images.load_rgb(image)
    return images.fit(img, self.image_size).astype(np.float32) / 127.5 - 1.0

  def __call__(self, record_images: list[Any]) -> list[dict[str, Any]]:
    x = np.stack([self.pixels(image) for image in record_images])
    n = len(x)
    means, logvars = [], []
    for lo in range(0, n, BATCH):
      chunk = x[lo:lo + BATCH]
      padded = np.concatenate([chunk, np.repeat(chunk[:1], BATCH - len(chunk), axis=0)])
      mean, logvar = self.device_get(self.encode(self.vae.params, padded))
      means.append(np.asarray(mean, np.float32)[:len(chunk)])
      logvars.append(np.asarray(logvar, np.float32)[:len(chunk)])
    mean, logvar = np.concatenate(means), np.concatenate(logvars)
    return [{'encoder': self.vae.fingerprint, 'image_size': self.image_size, 'mean': mean[i],
             'logvar': logvar[i]} for i in range(n)]
