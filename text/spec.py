"""The `config.text` section as a typed, frozen, checked value, and the encoders it can name.

`configs.specs.build` makes it once; `text.encoders.build`, the embedding caches and the
training step read its attributes and never see a ConfigDict. No defaults of its own
(configs/base.py holds them); a bad value is refused naming `text.field`.
"""
from __future__ import annotations

import dataclasses

from models import layers

ENCODERS = ('scratch', 'pretrained')  # text.encoder


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """Which text encoder, its tokenizer and size, and how often captions are dropped (CFG)."""
  encoder: str
  max_len: int
  vocab: str
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  dtype: str
  param_dtype: str
  pretrained_path: str
  allow_download: bool
  cache_embeddings: bool
  cond_drop_prob: float
  clip_skip: int
  finetune: bool

  def __post_init__(self):
    if self.encoder not in ENCODERS:
      raise ValueError(f'text.encoder={self.encoder!r} is not one of {ENCODERS}.')
    for name in ('max_len', 'width', 'depth', 'num_heads'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'text.{name}={value!r} must be positive.')
    if self.width % self.num_heads:
      raise ValueError(f'text.num_heads={self.num_heads} must divide text.width={self.width}.')
    layers.resolve_dtype(self.dtype, 'text.dtype')
    layers.resolve_dtype(self.param_dtype, 'text.param_dtype')
    if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or self.clip_skip < 0:
      raise ValueError(f'text.clip_skip={self.clip_skip!r} must be an int >= 0 (0: the last layer).')
    if not isinstance(self.finetune, bool):
      raise ValueError(f'text.finetune={self.finetune!r} must be True or False.')
    if self.finetune and self.encoder != 'pretrained':
      raise ValueError("text.finetune=True trains a pretrained encoder: set text.encoder='pretrained' "
                       '(a scratch encoder always trains).')
    if not 0.0 <= self.cond_drop_prob < 1.0:
      raise ValueError(f'text.cond_drop_prob={self.cond_drop_prob!r} must be in [0, 1).')

  def replace(self, **changes) -> TextSpec:
    return dataclasses.replace(self, **changes)
