"""FID and KID of two sets of (Inception pool3) features, from statistics that combine over hosts.

`FeatureStats` holds per-host sums: the count, the sum of the features and the sum of their outer
products, in float64, so that `combine` of the hosts' statistics equals one pass over all the
features (to float64 rounding) and gives the mean and covariance FID needs. FID is not an average
over images, so it is computed once from the combined statistics.

KID has no such sufficient statistics (its kernel is a cubic polynomial of the features), so each
`FeatureStats` also keeps a bounded uniform sample of the features (reservoir sampling,
`max_sample` rows); `combine` merges the hosts' samples into a uniform sample of all the features.
KID is computed on those samples: with the defaults (10,000 kept, subsets of 1,000) it draws its
subsets from at most 10,000 of the features of each set rather than all of them.

- FID (Heusel et al. 2017, "GANs trained by a two time-scale update rule..."):
  |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed as pytorch-fid computes it.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs"): the unbiased MMD^2 with the kernel
  k(x, y) = (x.y / d + 1)^3, averaged over random subsets of min(1000, N) features of each set,
  as clean-fid's `kernel_distance` (and torch-fidelity) compute it.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg

SMALL_N = 10_000  # Below this many images per set FID is noticeably biased upward.


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureStats:
  """What one host (or `combine` of several) has seen of one set's features."""
  count: int          # number of feature vectors
  total: np.ndarray   # [d] float64: sum of the features
  outer: np.ndarray   # [d, d] float64: sum of their outer products x x^T
  sample: np.ndarray  # [min(count, max_sample), d] float32: a uniform sample (for KID)
  max_sample: int     # bound on `sample`'s rows
  seed: int           # seeds the sampling (a pure function of seed and count)

  @property
  def dim(self) -> int:
    return self.total.shape[0]


def empty(dim: int = 2048, max_sample: int = 10_000, seed: int = 0) -> FeatureStats:
  return FeatureStats(0, np.zeros(dim), np.zeros((dim, dim)), np.zeros((0, dim), np.float32),
                      max_sample, seed)


def accumulate(stats: FeatureStats, features) -> FeatureStats:
  """`stats` with the rows of `features` [n, d] added (the reservoir kept uniform)."""
  f = np.asarray(features, np.float32)
  if f.ndim != 2 or f.shape[1] != stats.dim:
    raise ValueError(f'fid.accumulate: features must be [n, {stats.dim}], got {f.shape}.')
  f64 = f.astype(np.float64)
  sample = np.array(stats.sample)
  rng = np.random.default_rng((stats.seed, stats.count))
  free = max(0, min(stats.max_sample - stats.count, len(f)))
  sample = np.concatenate([sample, f[:free]])
  for j in range(free, len(f)):  # Algorithm R: row t replaces a kept one with p = max_sample/(t+1).
    r = rng.integers(0, stats.count + j + 1)
    if r < stats.max_sample:
      sample[r] = f[j]
  return dataclasses.replace(stats, count=stats.count + len(f), total=stats.total + f64.sum(0),
                             outer=stats.outer + f64.T @ f64, sample=sample)


def combine(stats_list: Sequence[FeatureStats]) -> FeatureStats:
  """The statistics of all the features the hosts saw: sums added, samples merged uniformly."""
  first = stats_list[0]
  for s in stats_list[1:]:
    if (s.dim, s.max_sample, s.seed) != (first.dim, first.max_sample, first.seed):
      raise ValueError('fid.combine: the statistics differ in feature size, max_sample or seed '
                       f'({(s.dim, s.max_sample, s.seed)} vs '
                       f'{(first.dim, first.max_sample, first.seed)}); make them alike.')
  counts = [s.count for s in stats_list]
  n = sum(counts)
  rng = np.random.default_rng((first.seed, n, len(counts)))
  # How many of the kept rows come from each host: a draw without replacement from all rows.
  take = rng.multivariate_hypergeometric(counts, min(n, first.max_sample)) if n else counts
  sample = np.concatenate([first.sample[:0]] + [
      s.sample[np.sort(rng.choice(len(s.sample), k, replace=False))]
      for s, k in zip(stats_list, take)])
  return dataclasses.replace(first, count=n, total=sum(s.total for s in stats_list),
                             outer=sum(s.outer for s in stats_list), sample=sample)


def mean_cov(stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance with the n - 1 denominator, as np.cov) of the features."""
  n = stats.count
  if n < 2:
    raise ValueError(f'FID needs at least 2 images per set, got {n}.')
  mu = stats.total / n
  sigma = (stats.outer - n * np.outer(mu, mu)) / (n - 1)
  return mu, (sigma + sigma.T) / 2  # Symmetric to rounding, as np.cov's.


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """pytorch-fid's `calculate_frechet_distance`: sqrtm of S1 S2 (scipy), eps added to both
  diagonals when that is not finite, the imaginary part dropped when the diagonal's is below
  1e-3 (ValueError otherwise)."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'FID: the statistics have different sizes ({mu1.shape} vs {mu2.shape}).')
  diff = mu1 - mu2
  covmean = _sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():
    logging.warning('FID: the product of the covariances is singular; adding %g to their '
                    'diagonals.', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f'FID: the square root of the covariances\' product has an imaginary '
                       f'component of {np.max(np.abs(covmean.imag)):.3g}; use more images.')
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _sqrtm(a: np.ndarray) -> np.ndarray:
  with warnings.catch_warnings():  # Singular/ill-conditioned: handled as pytorch-fid does.
    warnings.simplefilter('ignore', linalg.LinAlgWarning)
    return linalg.sqrtm(a)


def fid(stats1: FeatureStats, stats2: FeatureStats) -> float:
  """FID of two sets' statistics; warns when either set has fewer than 10,000 images."""
  if min(stats1.count, stats2.count) < SMALL_N:
    logging.warning('FID from %d and %d images: below %d per set FID is biased upward (more so '
                    'the fewer the images); compare only FIDs computed from the same number of '
                    'images (50,000 is the usual).', stats1.count, stats2.count, SMALL_N)
  return frechet_distance(*mean_cov(stats1), *mean_cov(stats2))


@jax.jit
def _subset_mmds(f1: jax.Array, f2: jax.Array, idx1: jax.Array, idx2: jax.Array) -> jax.Array:
  """Unbiased MMD^2 (cubic polynomial kernel) of each subset pair: [S] float32."""
  d = f1.shape[1]
  hi = jax.lax.Precision.HIGHEST

  def one(ids):
    x, y = f2[ids[1]], f1[ids[0]]  # clean-fid's order: x from the second set.
    m = x.shape[0]
    kxx = (jnp.dot(x, x.T, precision=hi) / d + 1) ** 3
    kyy = (jnp.dot(y, y.T, precision=hi) / d + 1) ** 3
    kxy = (jnp.dot(x, y.T, precision=hi) / d + 1) ** 3
    total = lambda k: jnp.sum(jnp.sum(k, axis=1))  # Row sums first: less float32 rounding.
    a = total(kxx) - jnp.trace(kxx) + total(kyy) - jnp.trace(kyy)
    return (a / (m - 1) - total(kxy) * 2 / m) / m
  return jax.lax.map(one, (idx1, idx2))


def kid(features1, features2, num_subsets: int = 100, max_subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
  """(mean, standard deviation) over `num_subsets` random subset pairs of the unbiased MMD^2
  between two sets of features [n, d] (e.g. `FeatureStats.sample`).

  Each subset holds m = min(n1, n2, max_subset_size) features of each set, drawn without
  replacement by `np.random.RandomState(seed).choice` in clean-fid's order (the second set's
  first), so with `np.random.seed(seed)` clean-fid's `kernel_distance` draws the same subsets.
  The kernel sums run jitted in float32 at the highest matmul precision.
  """
  f1, f2 = np.asarray(features1, np.float32), np.asarray(features2, np.float32)
  if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
    raise ValueError(f'KID: features must be [n, d] with the same d, got {f1.shape} and '
                     f'{f2.shape}.')
  m = min(len(f1), len(f2), max_subset_size)
  if m < 2:
    raise ValueError(f'KID needs at least 2 features per set, got {len(f1)} and {len(f2)}.')
  choice = np.random.RandomState(seed).choice
  idx2, idx1 = [], []
  for _ in range(num_subsets):
    idx2.append(choice(len(f2), m, replace=False))
    idx1.append(choice(len(f1), m, replace=False))
  mmds = np.asarray(_subset_mmds(f1, f2, np.stack(idx1), np.stack(idx2)), np.float64)
  return float(mmds.mean()), float(mmds.std())


# ----------------------------------------------------------------------------- across hosts


def _pack(stats: FeatureStats) -> dict[str, np.ndarray]:
  """Same-shaped uint32 arrays on every host (float64 bits kept: jax may lack 64-bit types)."""
  sample = np.zeros((stats.max_sample, stats.dim), np.float32)
  sample[:len(stats.sample)] = stats.sample
  return {'count': np.asarray([stats.count, len(stats.sample)], np.int64).view(np.uint32),
          'total': np.ascontiguousarray(stats.total, np.float64).view(np.uint32),
          'outer': np.ascontiguousarray(stats.outer, np.float64).view(np.uint32),
          'sample': sample.view(np.uint32)}


def _unpack(packed: dict[str, np.ndarray], like: FeatureStats) -> FeatureStats:
  count, kept = np.ascontiguousarray(packed['count']).view(np.int64)
  f64 = lambda a: np.ascontiguousarray(a).view(np.float64)
  return dataclasses.replace(like, count=int(count), total=f64(packed['total']),
                             outer=f64(packed['outer']),
                             sample=np.ascontiguousarray(packed['sample']).view(np.float32)[:kept])


def gather(stats: FeatureStats) -> list[FeatureStats]:
  """Every process's statistics, on every process (`combine` them). Moves d^2 float64 and
  max_sample x d float32 per host."""
  if jax.process_count() == 1:
    return [stats]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  stacked = multihost_utils.process_allgather(_pack(stats))
  return [_unpack({k: np.asarray(v[i]) for k, v in stacked.items()}, stats)
          for i in range(jax.process_count())]
