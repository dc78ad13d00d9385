"""Host side of text conditioning: a batch's captions -> model inputs (token ids or embeddings).

With a frozen pretrained encoder and `text.cache_embeddings`, batches carry embeddings instead
of token ids, from one of two places:
  - the records themselves, when `python -m data.prepare --text_encoder=pretrained` stored them
    (checked against this run's encoder);
  - `WORKDIR/text_cache`, built once and reused on resume: process p of P encodes the captions
    of its own part of the dataset (records p, p+P, ...), so no process reads every caption, and
    every process looks captions up in all parts (text/embedding_cache.py).
"""

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from data.sources import DataError
from text.encoders import NULL_CAPTION

_EMBEDDINGS = ('emb', 'mask', 'pooled')


def part_captions(source, part: int, num_parts: int) -> list[str]:
  """Every caption of records part, part + num_parts, ... of a source (its `captions(i)`)."""
  return [c for i in range(part, len(source), num_parts) for c in source.captions(i)]


def _precomputed_encoder(source) -> str | None:
  """The encoder fingerprint stored in the source's records by data.prepare, if any."""
  try:
    text = source[0].get('text')
  except (OSError, IndexError):
    return None
  return None if text is None else str(text.get('encoder', ''))


class TextInputs:
  """Turns a batch's captions (or its precomputed embeddings) into the text part of a batch."""

  def __init__(self, text_encoder, config, workdir: str, source=None):
    self.encoder = text_encoder
    self.cache = None
    self.precomputed = False
    if config.text.cache_embeddings:
      if text_encoder.trainable:
        raise ValueError('text.cache_embeddings=True needs a frozen encoder: set '
                         "text.encoder='pretrained' (a trained-from-scratch encoder changes).")
      stored = _precomputed_encoder(source)
      if stored is not None:
        if stored != text_encoder.fingerprint:
          raise DataError(
              f'data.path={config.data.path!r}: the records hold embeddings of another encoder '
              f'({stored}), not of text.pretrained_path={config.text.pretrained_path!r} with '
              f'text.max_len={config.text.max_len} ({text_encoder.fingerprint}); run '
              'data.prepare again with this encoder, or set text.cache_embeddings=False.')
        self.precomputed = True
        logging.info('Text embeddings come precomputed in the records.')
      else:
        self._build_cache(text_encoder, workdir, source)
    self.null = self.from_captions([NULL_CAPTION])

  def _build_cache(self, text_encoder, workdir, source):
    from text import embedding_cache  # pylint: disable=g-import-not-at-top
    path = os.path.join(os.path.abspath(workdir), 'text_cache')
    part, num_parts = jax.process_index(), jax.process_count()
    captions = part_captions(source, part, num_parts)
    logging.info('Caching embeddings of %d captions of part %d/%d in %s.', len(captions), part,
                 num_parts, path)
    embedding_cache.build_part(text_encoder, captions, path, part, num_parts,
                               params=text_encoder.init(None))
    multihost_utils.sync_global_devices('text_cache_built')
    self.cache = embedding_cache.EmbeddingCache.load(
        path, num_parts, fingerprint=embedding_cache.encoder_fingerprint(text_encoder))

  def from_captions(self, captions) -> dict:
    """Model text inputs of a list of captions (tokens, or cached/encoded embeddings)."""
    captions = [str(c) for c in captions]
    if self.cache is not None:
      emb, mask, pooled = self.cache.lookup(captions)
    elif self.precomputed:
      params = self.encoder.init(None)
      emb, mask, pooled = jax.device_get(self.encoder.encode(params,
                                                             self.encoder.tokenize(captions)))
      emb = np.asarray(emb).astype(np.float16)  # As stored in the records.
    else:
      return {'tokens': np.asarray(self.encoder.tokenize(captions), np.int32)}
    return {'emb': np.asarray(emb, np.float32), 'mask': np.asarray(mask, bool),
            'pooled': np.asarray(pooled, np.float32)}

  def __call__(self, batch: dict) -> dict:
    """The text inputs of a loader batch ('caption', and 'emb'/'mask'/'pooled' if precomputed)."""
    if self.precomputed:
      return {'emb': np.asarray(batch['emb'], np.float32), 'mask': np.asarray(batch['mask'], bool),
              'pooled': np.asarray(batch['pooled'], np.float32)}
    return self.from_captions(batch['caption'])
