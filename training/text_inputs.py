"""Host side of text conditioning: a batch's captions -> model inputs (token ids or embeddings).

With a frozen pretrained encoder and `text.cache_embeddings`, batches carry embeddings instead
of token ids, from one of two places:
  - the records themselves, when `python -m tools.prepare --text_encoder=pretrained` stored them
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

from data import batch as batch_keys
from data import records
from data.sources import DataError
from runtime import workdir as paths
from text.encoders import NULL_CAPTION


def part_captions(source, part: int, num_parts: int) -> list[str]:
  """Every caption of records part, part + num_parts, ... of a source (its `captions(i)`)."""
  return [c for i in range(part, len(source), num_parts) for c in source.captions(i)]


class TextInputs:
  """Turns a batch's captions (or its precomputed embeddings) into the text part of a batch."""

  def __init__(self, text_encoder, settings, workdir: str | None, source=None):
    """`settings`: the run's (its text section; data.path for errors)."""
    self.encoder = text_encoder
    self.cache = None
    self.precomputed = False
    text = settings.text
    if text.cache_embeddings:
      if text_encoder.trainable:
        raise ValueError('text.cache_embeddings=True needs a frozen encoder: set '
                         "text.encoder='pretrained' (a trained-from-scratch encoder changes).")
      stored = None if source is None else records.stored(source, 'text')
      if source is None:  # No records (benchmarks): the captions' embeddings, as cached ones.
        self.precomputed = True
      elif stored is not None:
        stored = str(stored.get('encoder', ''))  # The fingerprint tools.prepare wrote.
        if stored != text_encoder.fingerprint:
          raise DataError(
              f'data.path={settings.data.path!r}: the records hold embeddings of another encoder '
              f'({stored}), not of text.pretrained_path={text.pretrained_path!r} with '
              f'text.max_len={text.max_len} ({text_encoder.fingerprint}); run '
              'tools.prepare again with this encoder, or set text.cache_embeddings=False.')
        self.precomputed = True
        logging.info('Text embeddings come precomputed in the records.')
      else:
        self._build_cache(text_encoder, workdir, source)
    self.null = self.from_captions([NULL_CAPTION])

  def _build_cache(self, text_encoder, workdir, source):
    from text import embedding_cache  # pylint: disable=g-import-not-at-top
    path = paths.text_cache(os.path.abspath(workdir))
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
      return {batch_keys.TOKENS: np.asarray(self.encoder.tokenize(captions), np.int32)}
    return _embeddings(emb, mask, pooled)

  def __call__(self, batch: dict) -> dict:
    """The text inputs of a loader batch ('caption', and 'emb'/'mask'/'pooled' if precomputed)."""
    if self.precomputed:
      return _embeddings(*(batch[k] for k in batch_keys.EMBEDDINGS))
    return self.from_captions(batch[batch_keys.CAPTION])


def _embeddings(emb, mask, pooled) -> dict:
  """The text inputs of precomputed embeddings, in the dtypes the step takes."""
  return dict(zip(batch_keys.EMBEDDINGS, (np.asarray(emb, np.float32), np.asarray(mask, bool),
                                          np.asarray(pooled, np.float32))))
