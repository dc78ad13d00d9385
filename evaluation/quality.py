"""Quality of generated images against your data: FID and KID on Inception features, CLIP score
on the prompts, CMMD on CLIP image embeddings (docs/evaluation.md).

  extractors = load_extractors(inception_path, clip_path)     # local files, fingerprinted
  features = Features(extractors)                             # per host
  features.add(images_uint8, prompts)                         # as many times as needed
  reference = load_reference('stats.npz', extractors.stamp(image_size))
  scores(reference, features.gathered(), metrics=('fid', 'kid', 'clip', 'cmmd'))

A reference file (`python -m tools.reference`) holds a dataset's Inception statistics and a
sample of its CLIP image embeddings, stamped with what made them (the extractors' fingerprints,
the image size, the resize and the count); a reference made otherwise is refused naming the field.
Each host accumulates its images' feature sums (and CLIP embeddings), never the images; the
statistics are combined across hosts before scoring.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from evaluation import fid

METRICS = ('fid', 'kid', 'clip', 'cmmd')  # What `scores` computes (clip = CLIP score).
_NEEDS = {'fid': 'inception', 'kid': 'inception', 'clip': 'clip', 'cmmd': 'clip'}
FORMAT = 'jaxdiff-reference-1'
RESIZE = 'inception: bilinear to 299 (pytorch-fid); clip: the folder\'s CLIPImageProcessor'
MAX_CLIP = 10_000  # CLIP embeddings a reference keeps (CMMD's sample of the dataset).


@dataclasses.dataclass(frozen=True)
class Extractors:
  """The loaded feature extractors (either may be None) and the batch they run at."""
  inception: Any = None  # evaluation.inception.InceptionWeights
  clip: Any = None  # evaluation.clip_model.ClipModel
  batch: int = 32

  def stamp(self, image_size: int) -> dict[str, Any]:
    """What a reference must have been made with to compare with images of `image_size`."""
    return {'format': FORMAT, 'image_size': int(image_size), 'resize': RESIZE,
            'inception': self.inception.fingerprint if self.inception else '',
            'clip': self.clip.fingerprint if self.clip else ''}


def load_extractors(inception_path: str = '', clip_path: str = '', batch: int = 32) -> Extractors:
  """The extractors of the files given ('' = without it)."""
  inception = clip = None
  if inception_path:
    from evaluation import inception as inception_lib  # pylint: disable=import-outside-toplevel
    inception = inception_lib.load(inception_path)
  if clip_path:
    from evaluation import clip_model  # pylint: disable=import-outside-toplevel
    clip = clip_model.load_clip_model(clip_path)
  return Extractors(inception, clip, batch)


def available(extractors: Extractors, metrics: Sequence[str], *, field: str) -> None:
  """Raises ValueError naming `field` if a metric is unknown or its extractor is not loaded."""
  for m in metrics:
    if m not in METRICS:
      raise ValueError(f'{field}: {m!r} is not one of {METRICS}.')
    if getattr(extractors, _NEEDS[m]) is None:
      path = 'the FID Inception weights' if _NEEDS[m] == 'inception' else 'a CLIPModel folder'
      raise ValueError(f'{field}: {m} needs {path} ({_NEEDS[m]} path not given).')


class Features:
  """One host's features of the images it saw: Inception statistics, CLIP image and prompt
  embeddings (L2-normalised)."""

  def __init__(self, extractors: Extractors, seed: int = 0):
    self.ext = extractors
    self.stats = fid.empty(seed=seed) if extractors.inception else None
    self.clip_images: list[np.ndarray] = []
    self.clip_texts: list[np.ndarray] = []

  @property
  def count(self) -> int:
    if self.stats is not None:
      return self.stats.count
    return sum(len(x) for x in self.clip_images)

  def add(self, images: np.ndarray, prompts: Sequence[str] | None = None) -> None:
    """images uint8 [N, H, W, 3] (or float in [0, 1]); `prompts` (for the CLIP score): theirs."""
    from evaluation import inception  # pylint: disable=import-outside-toplevel
    for start in range(0, len(images), self.ext.batch):
      chunk = images[start:start + self.ext.batch]
      if self.ext.inception is not None:
        feats = jax.device_get(inception.features(self.ext.inception.params, chunk))
        self.stats = fid.accumulate(self.stats, feats)
      if self.ext.clip is not None:
        clip = self.ext.clip
        self.clip_images.append(np.asarray(clip.image_embeds(clip.params, chunk, normalize=True)))
        if prompts is not None:
          ids = clip.tokenize(list(prompts[start:start + self.ext.batch]))
          self.clip_texts.append(np.asarray(clip.text_embeds(clip.params, ids, normalize=True)))

  def state(self) -> dict[str, np.ndarray]:
    """Everything as arrays (for a partial reference file; `restore` reads it back)."""
    out = {}
    if self.stats is not None:
      out.update({'fid_count': np.int64(self.stats.count), 'fid_total': self.stats.total,
                  'fid_outer': self.stats.outer, 'fid_sample': self.stats.sample})
    if self.ext.clip is not None:
      out['clip_images'] = _rows(self.clip_images, self.ext.clip.dim)
    return out

  def restore(self, arrays) -> None:
    if self.stats is not None:
      self.stats = dataclasses.replace(
          self.stats, count=int(arrays['fid_count']), total=np.asarray(arrays['fid_total']),
          outer=np.asarray(arrays['fid_outer']), sample=np.asarray(arrays['fid_sample']))
    if self.ext.clip is not None:
      self.clip_images = [np.asarray(arrays['clip_images'])]

  def gathered(self) -> Features:
    """These features combined with every other host's (the same on every host)."""
    out = Features(self.ext)
    if self.stats is not None:
      out.stats = fid.combine(fid.gather(self.stats))
    if self.ext.clip is not None:
      dim = self.ext.clip.dim
      out.clip_images = [_all_rows(_rows(self.clip_images, dim))]
      out.clip_texts = [_all_rows(_rows(self.clip_texts, dim))]
    return out


def _rows(parts: list[np.ndarray], dim: int) -> np.ndarray:
  return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def _all_rows(local: np.ndarray) -> np.ndarray:
  """Every host's rows, in process order (hosts may hold different counts)."""
  if jax.process_count() == 1:
    return local
  counts = multihost_utils.process_allgather(np.int32(len(local)))
  padded = np.zeros((int(np.max(counts)),) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  every = multihost_utils.process_allgather(padded)
  return np.concatenate([every[i, :int(n)] for i, n in enumerate(counts)])


# ----------------------------------------------------------------------------- reference files


def save_reference(path: str, features: Features, stamp: dict[str, Any]) -> str:
  """Writes combined `features` (a dataset's) as a reference .npz at `path` (atomically)."""
  arrays = features.state()
  if 'clip_images' in arrays and len(arrays['clip_images']) > MAX_CLIP:
    keep = np.random.default_rng(0).choice(len(arrays['clip_images']), MAX_CLIP, replace=False)
    arrays['clip_images'] = arrays['clip_images'][np.sort(keep)]
  stamp = dict(stamp, count=features.count)
  tmp = f'{path}.tmp-{os.getpid()}.npz'
  np.savez(tmp, stamp=json.dumps(stamp, sort_keys=True), **arrays)
  os.replace(tmp, path)
  return path


class Reference:
  """A dataset's features read back from a reference file."""

  def __init__(self, path: str, stamp: dict, features: Features):
    self.path, self.stamp, self.features = path, stamp, features


def read_stamp(path: str) -> dict[str, Any]:
  with np.load(path) as f:
    return json.loads(str(f['stamp']))


def load_reference(path: str, expected: dict[str, Any], extractors: Extractors, *,
                   field: str = 'reference') -> Reference:
  """The reference at `path`, refused (ValueError naming `field` and the stamp's entry) unless it
  was made as `expected` (`Extractors.stamp`) says: the same extractors, image size and resize."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{field}={path!r}: no such file; make it with python -m '
                            'tools.reference (docs/evaluation.md).')
  stamp = read_stamp(path)
  for key, want in expected.items():
    got = stamp.get(key)
    if want and got != want:
      raise ValueError(f'{field}={path!r} was made with {key}={got!r}, but these images need '
                       f'{key}={want!r}: make it again with python -m tools.reference and '
                       'the same extractors and image size.')
  features = Features(extractors)
  with np.load(path) as f:
    features.restore({k: f[k] for k in f.files})
  if stamp.get('count', 0) < fid.SMALL_N:
    logging.warning('%s holds %d images: FID from fewer than %d is biased upward; compare runs '
                    'at the same N only.', path, stamp.get('count', 0), fid.SMALL_N)
  return Reference(path, stamp, features)


def scores(reference: Reference | None, generated: Features, metrics: Sequence[str]
           ) -> dict[str, float]:
  """The metrics of the (gathered) generated features against the reference's."""
  from evaluation import clip_metrics  # pylint: disable=import-outside-toplevel
  out = {}
  if 'fid' in metrics or 'kid' in metrics:
    if reference is None:
      raise ValueError('FID and KID need a reference file (python -m tools.reference).')
    if 'fid' in metrics:
      out['fid'] = fid.fid(reference.features.stats, generated.stats)
    if 'kid' in metrics:
      out['kid'], out['kid_std'] = fid.kid(reference.features.stats.sample, generated.stats.sample)
  if 'clip' in metrics:
    images, texts = _rows(generated.clip_images, 0), _rows(generated.clip_texts, 0)
    if len(texts) != len(images):
      raise ValueError('The CLIP score needs the prompt of every image.')
    out['clip_score'] = float(clip_metrics.clip_score(images, texts))
  if 'cmmd' in metrics:
    if reference is None:
      raise ValueError('CMMD needs a reference file (python -m tools.reference --clip=...).')
    out['cmmd'] = float(clip_metrics.cmmd(_rows(reference.features.clip_images, 0),
                                          _rows(generated.clip_images, 0)))
  out['images'] = float(generated.count)
  return out
