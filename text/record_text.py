"""Frozen-encoder outputs stored in ArrayRecord records by `python -m tools.prepare --text_encoder`.

Each record's `text` field holds, for every caption, the encoder's token embeddings (float16),
mask and pooled vector, with the encoder's fingerprint; training with the same encoder and
`text.cache_embeddings=True` reads them instead of encoding (training/text_inputs.py).
"""
from __future__ import annotations

from typing import Any

import numpy as np

BATCH = 32  # Captions per jitted text-encoder call (one compiled shape).


class Embedder:
  """Frozen text encoder: caption lists -> the `text` field of each record."""

  def __init__(self, text_cfg: dict[str, Any]):
    import jax  # pylint: disable=g-import-not-at-top  (only when embeddings are asked for)
    from text import encoders  # pylint: disable=g-import-not-at-top
    from text.spec import TextSpec  # pylint: disable=g-import-not-at-top
    self.enc = encoders.build(TextSpec(**text_cfg))
    self.params = self.enc.init(None)
    self.encode = jax.jit(self.enc.encode)
    self.device_get = jax.device_get

  def __call__(self, caption_lists: list[list[str]]) -> list[dict[str, Any]]:
    flat = [c for captions in caption_lists for c in captions]
    parts = []
    for lo in range(0, len(flat), BATCH):
      chunk = flat[lo:lo + BATCH]
      ids = np.asarray(self.enc.tokenize(chunk), np.int32)
      ids = np.concatenate([ids, np.repeat(ids[:1], BATCH - len(chunk), axis=0)])
      parts.append([np.asarray(x)[:len(chunk)] for x in self.device_get(self.encode(self.params, ids))])
    emb, mask, pooled = (np.concatenate(p) for p in zip(*parts))
    out, lo = [], 0
    for captions in caption_lists:
      hi = lo + len(captions)
      out.append({'encoder': self.enc.fingerprint, 'emb': emb[lo:hi].astype(np.float16),
                  'mask': mask[lo:hi].astype(bool), 'pooled': pooled[lo:hi].astype(np.float32)})
      lo = hi
    return out
