"""Posterior moments of a frozen autoencoder, stored in records by `tools.prepare --autoencoder`.

Latent diffusion encodes every training image with the same frozen VAE encoder, every epoch. With
the moments (mean and log-variance of q(z|x)) precomputed once per record, a run draws a fresh
latent from them each step (as on the fly) and never runs the encoder. They are computed on the
pixels the loader would give with a centre crop and no flip at `image_size`, or with
aspect-ratio buckets (`--buckets`) at the record's bucket, so a run that reads them must use that
geometry; the record holds the VAE's fingerprint, the size and the buckets, which training checks
(training/builder.py).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from data import images

BATCH = 16  # Images per jitted encoder call (one compiled shape).


class LatentEncoder:
  """Encoded record images -> the `latent` field of each record."""

  def __init__(self, path: str, image_size: int, dtype: str = 'float32',
               buckets: tuple[tuple[int, int], ...] = ()):
    """`buckets` (height, width): the shapes records are encoded at (each its own), instead of
    image_size squares."""
    import jax  # pylint: disable=g-import-not-at-top  (only when latents are asked for)
    from models import vae_loading  # pylint: disable=g-import-not-at-top
    self.vae = vae_loading.load_vae(path, dtype)
    factor = self.vae.config.downsample_factor
    if buckets:
      if any(side % factor for shape in buckets for side in shape):
        raise ValueError(f'--buckets={tuple(map(tuple, buckets))}: each side must be a multiple '
                         f"of the autoencoder's downsampling ({factor}).")
    elif image_size < 1 or image_size % factor:
      raise ValueError(f'--image_size={image_size} must be a positive multiple of the '
                       f"autoencoder's downsampling ({factor}).")
    self.image_size, self.buckets = image_size, [list(b) for b in buckets]
    self.encode = jax.jit(self.vae.encode)
    self.device_get = jax.device_get

  def pixels(self, image: bytes | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """What the loader gives for this image at `shape` with a centre crop, no flip: f32
    [height, width, 3] in [-1, 1]."""
    img = images.from_array(image) if isinstance(image, np.ndarray) else images.load_rgb(image)
    return images.cover(img, *shape)[0].astype(np.float32) / 127.5 - 1.0

  def _moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior mean and log-variance of images `x` [n, H, W, 3], BATCH at a time."""
    means, logvars = [], []
    for lo in range(0, len(x), BATCH):
      chunk = x[lo:lo + BATCH]
      padded = np.concatenate([chunk, np.repeat(chunk[:1], BATCH - len(chunk), axis=0)])
      mean, logvar = self.device_get(self.encode(self.vae.params, padded))
      means.append(np.asarray(mean, np.float32)[:len(chunk)])
      logvars.append(np.asarray(logvar, np.float32)[:len(chunk)])
    return np.concatenate(means), np.concatenate(logvars)

  def __call__(self, record_images: list[Any],
               shapes: list[Sequence[int] | None] | None = None) -> list[dict[str, Any]]:
    """The `latent` fields of images at their `shapes` (each its bucket; default: squares)."""
    square = (self.image_size, self.image_size)
    shapes = [tuple(s) if s is not None else square for s in shapes or [None] * len(record_images)]
    out = [None] * len(record_images)
    for shape in sorted(set(shapes)):  # One encoder program per shape.
      rows = [i for i, s in enumerate(shapes) if s == shape]
      mean, logvar = self._moments(np.stack([self.pixels(record_images[i], shape) for i in rows]))
      size = list(shape) if self.buckets else self.image_size
      extra = {'buckets': self.buckets} if self.buckets else {}
      for k, i in enumerate(rows):
        out[i] = {'encoder': self.vae.fingerprint, 'image_size': size, **extra, 'mean': mean[k],
                  'logvar': logvar[k]}
    return out
