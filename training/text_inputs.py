"""Host side of text conditioning: captions -> model inputs, as tokens or as cached embeddings.

With a frozen pretrained encoder and `text.cache_embeddings`, every caption of the
(finite) training set is encoded once into `WORKDIR/text_cache` (reused on resume and
rebuilt if the encoder changes); batches then carry embeddings instead of token ids.
"""

import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from text.encoders import NULL_CAPTION


def dataset_captions(source) -> list[str]:
  """All captions of a random-access source (reads the caption field only where it can)."""
  records = source.records
  out = []
  for i in range(len(records)):
    c = records[i]['caption']
    out.append(c.decode() if isinstance(c, bytes) else str(c))
  return out


class TextInputs:
  """Turns a list of captions into the text part of a batch."""

  def __init__(self, text_encoder, config, workdir: str, source=None):
    self.encoder = text_encoder
    self.cache = None
    if config.text.cache_embeddings:
      if text_encoder.trainable:
        raise ValueError('text.cache_embeddings=True needs a frozen encoder: set '
                         "text.encoder='pretrained' (a trained-from-scratch encoder changes).")
      from text import embedding_cache
      path = os.path.join(os.path.abspath(workdir), 'text_cache')
      params = text_encoder.init(None)
      if jax.process_index() == 0:
        captions = dataset_captions(source)
        logging.info('Caching embeddings of %d captions (%d unique) in %s.', len(captions),
                     len(set(captions)), path)
        embedding_cache.build_cache(text_encoder, captions, path, params=params)
      multihost_utils.sync_global_devices('text_cache_built')
      self.cache = embedding_cache.EmbeddingCache.load(path)
    self.null = self([NULL_CAPTION])

  def __call__(self, captions) -> dict:
    captions = [str(c) for c in captions]
    if self.cache is None:
      return {'tokens': np.asarray(self.encoder.tokenize(captions), np.int32)}
    emb, mask, pooled = self.cache.lookup(captions)
    return {'emb': emb.astype(np.float32), 'mask': mask, 'pooled': pooled.astype(np.float32)}
