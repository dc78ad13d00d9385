"""Word-level tokenizer for the from-scratch text encoder, with a vocabulary stored as text.

Captions are lower-cased and split into runs of word characters (whitespace and punctuation
separate words and are dropped). Reserved ids: 0 = [PAD], 1 = [UNK], 2 = [BOS]. [BOS] is
prepended to every caption, so even the empty caption "" has one real token: its encoding
is the classifier-free-guidance null caption.
"""
from __future__ import annotations

import collections
import os
import re
from typing import Iterable, Sequence

import numpy as np

PAD, UNK, BOS = '[PAD]', '[UNK]', '[BOS]'
SPECIAL_TOKENS = (PAD, UNK, BOS)
PAD_ID, UNK_ID, BOS_ID = 0, 1, 2

SHAPES_COLOURS = ('red', 'green', 'blue', 'yellow', 'magenta', 'cyan', 'white')
SHAPES_SHAPES = ('square', 'circle', 'triangle')
# Every word of a Shapes caption (see docs/shapes.md, "Scenes and captions").
SHAPES_VOCAB = ('a',) + SHAPES_COLOURS + SHAPES_SHAPES + ('to', 'the', 'left', 'right', 'of')

_WORD = re.compile(r'\w+')


def split_words(caption: str) -> list[str]:
  """Lower-cases and splits on whitespace/punctuation: 'A red, square!' -> ['a', 'red', 'square']."""
  return _WORD.findall(caption.lower())


def build_vocab(captions: Iterable[str], min_count: int = 1,
                max_size: int | None = None) -> list[str]:
  """Words seen at least `min_count` times, most frequent first (ties alphabetical)."""
  if min_count < 1:
    raise ValueError(f'min_count must be >= 1, got {min_count}.')
  counts = collections.Counter(w for c in captions for w in split_words(c))
  words = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
  return words if max_size is None else words[:max_size]


class WordTokenizer:
  """Maps captions to int32 id arrays [B, max_len]: [BOS] + word ids, truncated, 0-padded."""

  def __init__(self, vocab: Sequence[str], max_len: int):
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
      raise ValueError(f'text.max_len must be a positive integer, got {max_len!r}.')
    words = list(vocab)
    bad = [w for w in words if w in SPECIAL_TOKENS or split_words(w) != [w]]
    if bad:
      raise ValueError(
          f'vocab entries must be lower-case words without spaces or punctuation and not '
          f'special tokens {SPECIAL_TOKENS}; got {bad[:5]}.')
    if len(set(words)) != len(words):
      dups = sorted({w for w in words if words.count(w) > 1})
      raise ValueError(f'vocab has duplicate words {dups[:5]}.')
    self.words = words
    self.max_len = max_len
    self._ids = {w: i + len(SPECIAL_TOKENS) for i, w in enumerate(words)}
    self._tokens = list(SPECIAL_TOKENS) + words

  @property
  def vocab_size(self) -> int:
    """Number of ids, special tokens included (the text encoder's `text.vocab_size`)."""
    return len(self._tokens)

  @property
  def pad_id(self) -> int:
    return PAD_ID

  def encode(self, captions: Sequence[str]) -> np.ndarray:
    """np.int32 [len(captions), max_len]; unknown words -> [UNK]."""
    if isinstance(captions, str):
      raise ValueError('encode takes a sequence of captions, not a single string; wrap it in a list.')
    out = np.full((len(captions), self.max_len), PAD_ID, dtype=np.int32)
    for row, caption in enumerate(captions):
      ids = [BOS_ID] + [self._ids.get(w, UNK_ID) for w in split_words(caption)]
      ids = ids[:self.max_len]
      out[row, :len(ids)] = ids
    return out

  def decode(self, ids: np.ndarray) -> list[str]:
    """Inverse of `encode` up to normalisation: drops [PAD]/[BOS], joins words by spaces."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
      raise ValueError(f'decode expects ids of shape [B, L], got {ids.shape}.')
    return [' '.join(self._tokens[i] for i in row if i not in (PAD_ID, BOS_ID)) for row in ids]

  def save(self, path: str | os.PathLike) -> None:
    """Writes one token per line; line i holds the token of id i (specials first)."""
    with open(path, 'w', encoding='utf-8') as f:
      f.write('\n'.join(self._tokens) + '\n')

  @classmethod
  def load(cls, path: str | os.PathLike, max_len: int) -> 'WordTokenizer':
    """Reads a vocabulary written by `save`."""
    return cls(load_vocab(path), max_len)


def load_vocab(path: str | os.PathLike) -> list[str]:
  """The words (special tokens stripped) of a vocabulary file written by `WordTokenizer.save`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'vocabulary file {path} not found; write one with WordTokenizer.save.')
  with open(path, encoding='utf-8') as f:
    tokens = [line.rstrip('\n') for line in f if line.strip()]
  if tuple(tokens[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
    raise ValueError(
        f'vocabulary file {path} must start with the lines {SPECIAL_TOKENS}; '
        'it was not written by WordTokenizer.save.')
  return tokens[len(SPECIAL_TOKENS):]
