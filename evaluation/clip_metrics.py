"""CLIP score and CMMD as pure functions of CLIP embeddings (evaluation/clip_model.py makes them).

CLIP score (Hessel et al. 2021, arXiv:2104.08718, as torchmetrics' `CLIPScore` computes it):
100 x the cosine of each image's embedding with its own prompt's, averaged over the pairs, then
clipped at 0. torchmetrics clips the mean, not each pair (its docstring writes max(100 cos, 0)
per pair); the two agree whenever no pair has a negative cosine, as with trained CLIP models. A
host that accumulates sums `clip_scores` over batches and counts them; `clip_score` of all pairs
is max(sum / count, 0).

CMMD (Jayasumana et al. 2024, "Rethinking FID", arXiv:2401.09603): the squared maximum mean
discrepancy between two sets of L2-normalised CLIP image embeddings under a Gaussian RBF kernel
k(x, y) = exp(-|x - y|^2 / (2 sigma^2)), sigma = 10, times 1000, as google-research/cmmd's
distance.py computes it: the minimum-variance (biased, V-statistic) estimator of Gretton et al.
2012, Eq. 5, mean(k_xx) + mean(k_yy) - 2 mean(k_xy) with every pair, the diagonal included, so
a set against itself gives exactly 0. Unlike FID it needs all embeddings at once: N x D float32
per set (ViT-L/14: D = 768, 3 KB an image, 92 MB for 30,000 images), and the kernel matrices, N x
M floats each, unless `block` bounds them to block x M. The paper's model is ViT-L/14@336.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

SIGMA = 10.0  # The RBF bandwidth of google-research/cmmd (distance.py's _SIGMA).
SCALE = 1000.0  # Its scale "to make the metric more human readable" (_SCALE).
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 dots also on accelerators (no TF32/bf16 passes).


def l2_normalize(x: jax.Array) -> jax.Array:
  """x / |x| along the last axis (a zero vector stays zero)."""
  x = jnp.asarray(x, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.jit
def clip_scores(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """Per pair [N]: 100 cos(image_embeds[i], text_embeds[i]), float32, not clipped."""
  if image_embeds.shape != text_embeds.shape:
    raise ValueError(f'image embeddings {image_embeds.shape} and text embeddings '
                     f'{text_embeds.shape} must pair up (one prompt per image).')
  return 100 * jnp.einsum('nd,nd->n', l2_normalize(image_embeds), l2_normalize(text_embeds),
                          precision=_HIGHEST)


@jax.jit
def clip_score(image_embeds: jax.Array, text_embeds: jax.Array) -> jax.Array:
  """torchmetrics' CLIPScore of the pairs: max(mean(100 cos), 0), a float32 scalar."""
  return jnp.maximum(jnp.mean(clip_scores(image_embeds, text_embeds)), 0.)


def _kernel_mean(a: jax.Array, b: jax.Array, gamma: float, block: int | None) -> jax.Array:
  """mean over all (i, j) of exp(-gamma |a_i - b_j|^2) - 1, in row blocks of `block` rows."""
  a_sq, b_sq = jnp.sum(a * a, axis=-1), jnp.sum(b * b, axis=-1)

  def rows(a_rows, a_rows_sq, valid):
    d2 = -2 * jnp.matmul(a_rows, b.T, precision=_HIGHEST) + a_rows_sq[:, None] + b_sq[None]
    return jnp.sum(jnp.where(valid[:, None], jnp.expm1(-gamma * d2), 0.))

  n = a.shape[0]
  if block is None or block >= n:
    return rows(a, a_sq, jnp.ones(n, bool)) / (n * b.shape[0])
  pad = -n % block
  chunks = (jnp.pad(a, ((0, pad), (0, 0))).reshape(-1, block, a.shape[1]),
            jnp.pad(a_sq, (0, pad)).reshape(-1, block),
            (jnp.arange(n + pad) < n).reshape(-1, block))
  return jnp.sum(jax.lax.map(lambda c: rows(*c), chunks)) / (n * b.shape[0])


def cmmd(x: jax.Array, y: jax.Array, *, sigma: float = SIGMA, scale: float = SCALE,
         block: int | None = None) -> jax.Array:
  """CMMD between CLIP image embeddings x [N, D] and y [M, D] (normalised here), a float32 scalar.

  `block`: rows of the kernel matrices computed at a time (memory block x max(N, M) floats);
  None computes each whole, as the reference does. Jitted per (shapes, sigma, scale, block).
  """
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'embeddings {x.shape} and {y.shape} must be [N, D] and [M, D] with one D.')
  if block is not None and (not isinstance(block, int) or block < 1):
    raise ValueError(f'block={block!r} must be a positive int or None.')
  return _cmmd(x, y, float(sigma), float(scale), block)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _cmmd(x, y, sigma, scale, block):
  x, y = l2_normalize(x), l2_normalize(y)
  gamma = 1 / (2 * sigma**2)
  # The kernel means are all near 1 (|x - y| <= 2 << sigma): summing k - 1 (expm1), whose 1s
  # cancel in k_xx + k_yy - 2 k_xy, keeps float32 from losing the difference to rounding.
  k_xx = _kernel_mean(x, x, gamma, block)
  k_yy = _kernel_mean(y, y, gamma, block)
  k_xy = _kernel_mean(x, y, gamma, block)
  return scale * (k_xx + k_yy - 2 * k_xy)
